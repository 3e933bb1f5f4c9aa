"""The native (viper) kernels of the .smf engine are bit-exact with TFLite Micro on real MicroPython builds.

MicroPython 1.28 from the vendored source (scripts/build_micropython.sh): the unix port (x64 native code)
and the qemu Cortex-M3 board (armv7m native code, -icount shift=0); the engine compiled by mpy-cross per
architecture, as toolchain/ondevice/bundle.py does for a board. Reference outputs from
``tflite_micro.runtime.Interpreter``. Models: the default ``toolchain build --target esp32`` pipeline (LeNet-5,
global magnitude pruning to 10 %; 2 federated rounds to keep the test short) and the test models of
tests/sparse_models.py covering every operator (conv, depthwise, pad, add, mean, pooling, fully connected).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_models as sm  # noqa: E402

from hw.emulators import smf_ports  # noqa: E402
from toolchain.export.sparse_format import tflite_to_smf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_INPUTS = 1000
PORTS = ("unix", "an385")


def _need(port: str) -> None:
    if not smf_ports.available(port):
        pytest.skip(smf_ports.missing_reason(port))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "smf_models"  # shared with test_micropython_engine.py


@pytest.fixture(scope="module")
def esp32_default(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.tflite of `toolchain build --target esp32` (default model, algorithm and density; 2 rounds)."""
    out = tmp_path_factory.mktemp("viper") / "esp32"
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "toolchain"), "build", "--target", "esp32", "--rounds", "2",
                           "--clients", "4", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "model.tflite"


def _check(path: Path, port: str, n: int, layout: str = "auto") -> dict[str, object]:
    smf = tflite_to_smf(path.read_bytes())
    x = sm.quantized_inputs(path, n)
    ref = sm.tflm_outputs(path, x)
    got, info = smf_ports.run_engine(smf, x, port, layout=layout)
    assert info["engine"] == "viper"
    bad = np.flatnonzero((got != ref).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {n} outputs differ from TFLite Micro, first at input {bad[:5]}"
    return info


@pytest.mark.parametrize("port", PORTS)
def test_default_esp32_model_bit_exact(port: str, esp32_default: Path) -> None:
    _need(port)
    info = _check(esp32_default, port, N_INPUTS)
    print(f"esp32 default model on {port}: {N_INPUTS} inputs bit-exact; {info}")


@pytest.mark.parametrize("port", PORTS)
@pytest.mark.parametrize("kind", sm.KINDS)
def test_every_operator_bit_exact(kind: str, port: str, model_dir: Path) -> None:
    _need(port)
    info = _check(sm.cached_tflite(model_dir, kind), port, N_INPUTS)
    print(f"{kind} on {port}: {N_INPUTS} inputs bit-exact; {info}")


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_both_layouts_bit_exact(layout: str, model_dir: Path) -> None:
    """Each layout on its own (the 'auto' default mixes them per layer)."""
    _need("unix")
    for kind in ("lenet", "resnet"):
        _check(sm.cached_tflite(model_dir, kind), "unix", 200, layout)


def test_cortex_m0_armv6m_bit_exact(model_dir: Path) -> None:
    """The RP2040's instruction set (armv6m, thumb emitter turned on for the nRF51 board)."""
    _need("microbit")
    _check(sm.cached_tflite(model_dir, "lenet"), "microbit", 100)


def test_fallback_without_native_emitter_is_the_bytecode_engine(model_dir: Path) -> None:
    """native=False (what a port without a native emitter gets) gives the same outputs, far slower."""
    _need("an385")
    path = sm.cached_tflite(model_dir, "lenet")
    smf = tflite_to_smf(path.read_bytes())
    x = sm.quantized_inputs(path, 3)
    got_bc, bc = smf_ports.run_engine(smf, x, "an385", native=False)
    got_v, v = smf_ports.run_engine(smf, x, "an385")
    assert bc["engine"] == "bytecode" and v["engine"] == "viper"
    np.testing.assert_array_equal(got_bc, sm.tflm_outputs(path, x))
    np.testing.assert_array_equal(got_v, got_bc)
    ratio = bc["instructions_per_inference"] / v["instructions_per_inference"]
    print(f"lenet on Cortex-M3: bytecode {bc['instructions_per_inference']} vs viper "
          f"{v['instructions_per_inference']} instructions per inference ({ratio:.1f}x)")
    assert ratio >= 10
