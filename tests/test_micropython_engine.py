"""The MicroPython sparse int8 engine is bit-exact with TFLite Micro (MicroPython 1.29 on WebAssembly).

Real parts only: models trained and converted by TensorFlow, reference outputs from
``tflite_micro.runtime.Interpreter``, the engine run by the MicroPython WebAssembly build. That build's heap
grows on demand (its ``heapsize`` bounds nothing), so the ESP32-like heap budget is checked on the unix port
of MicroPython 1.28 built from source, whose ``-X heapsize`` is a real bound.
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path

import numpy as np
import pytest
from support import sparse_models as sm

from toolchain.contracts.smf import DECODERS, KERNELS
from toolchain.deploy.emulators import smf_ports, wasm
from toolchain.export.requant import quantize_multiplier
from toolchain.export.smf_writer import tflite_to_smf
from toolchain.package.load import ENGINE_DIR, engine_source, engine_tables, microbit_engine_files
from toolchain.package.microbit import MICROBIT_NAMES

needs_wasm = pytest.mark.skipif(not wasm.available(), reason="Node.js or the MicroPython WebAssembly package is missing")

N_INPUTS = 1000
HEAP = 160 * 1024  # an ESP32-class budget (enforced on the unix port only)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "smf_models"


@needs_wasm
@pytest.mark.parametrize("kind", sm.KINDS)
def test_bit_exact_with_tflite_micro(kind: str, model_dir: Path) -> None:
    path = sm.cached_tflite(model_dir, kind)
    smf = tflite_to_smf(path.read_bytes())
    x = sm.quantized_inputs(path, N_INPUTS)
    ref = sm.tflm_outputs(path, x)
    got, heap = sm.run_engine_wasm(smf, x, heap_bytes=HEAP)
    mismatched = np.flatnonzero((got != ref).any(axis=1))
    assert mismatched.size == 0, f"{mismatched.size} of {N_INPUTS} outputs differ, first at input {mismatched[:5]}"
    # (the WebAssembly heap grows on demand, so heap_bytes bounds nothing there: the bound is checked on the
    # unix port below, test_bytecode_engine_fits_a_bounded_heap)
    print(f"{kind}: {N_INPUTS} inputs bit-exact; allocated by {N_INPUTS} inferences: {heap['inference']} B")
    # buffers are allocated once: inference must not churn the heap (a bound method or so per call at most)
    assert heap["inference"] <= 64 * N_INPUTS


@needs_wasm
def test_dense_path_is_bit_exact_too(model_dir: Path) -> None:
    path = sm.cached_tflite(model_dir, "resnet")
    x = sm.quantized_inputs(path, 20, start=5000)
    got, _ = sm.run_engine_wasm(tflite_to_smf(path.read_bytes()), x, heap_bytes=HEAP, dense=True)
    np.testing.assert_array_equal(got, sm.tflm_outputs(path, x))


def _mbqm_reference(x: int, m: int, s: int) -> int:
    """TFLite's MultiplyByQuantizedMultiplier (SaturatingRoundingDoublingHighMul + RoundingDivideByPOT)."""
    x = x * (1 << max(s, 0))
    ab = x * m
    t = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    v = t >> 31 if t >= 0 else -((-t) >> 31)
    e = max(-s, 0)
    mask = (1 << e) - 1
    return (v >> e) + (1 if (v & mask) > (mask >> 1) + (1 if v < 0 else 0) else 0)


@needs_wasm
def test_requantization_arithmetic_on_micropython() -> None:
    """smf_requant.mbqm on MicroPython against the reference formula, edge cases included."""
    rng = random.Random(7)
    cases = []
    for _ in range(3000):
        m, s = quantize_multiplier(rng.uniform(1e-6, 4.0))
        x = rng.choice([rng.randint(-(2**15), 2**15), rng.randint(-(2**24), 2**24), rng.randint(-(2**30), 2**30),
                        rng.choice([0, 1, -1, 32767, 32768, -32768, 2**30 - 1, -(2**30)])])
        cases.append((x >> max(s, 0), m, s))
    text = "".join(f"{x} {m} {s}\n" for x, m, s in cases).encode()
    code = ("from smf_requant import mbqm\nfor line in open('/cases.txt'):\n    x, m, s = [int(v) for v in line.split()]\n"
            "    print(mbqm(x, m & 0x7FFF, m >> 15, s))\n")
    out = wasm.run_micropython(code, files={**sm.engine_files(), "/cases.txt": text})
    got = [int(v) for v in out.split()]
    want = [_mbqm_reference(x, m, s) for x, m, s in cases]
    assert got == want


@pytest.mark.parametrize("kind", sm.KINDS)
def test_bytecode_engine_fits_a_bounded_heap(kind: str, model_dir: Path) -> None:
    """The bytecode engine (what a port without a native emitter runs) loads and infers bit-exactly within
    HEAP on a heap that is really bounded: the unix port's -X heapsize (x64 objects are larger than on a
    32-bit board, so this is conservative)."""
    if not smf_ports.available("unix"):
        pytest.skip(smf_ports.missing_reason("unix"))
    path = sm.cached_tflite(model_dir, kind)
    x = sm.quantized_inputs(path, 50)
    got, info = smf_ports.run_engine(tflite_to_smf(path.read_bytes()), x, "unix", native=False, heap_bytes=HEAP)
    assert info["engine"] == "bytecode"
    np.testing.assert_array_equal(got, sm.tflm_outputs(path, x))
    print(f"{kind}: bytecode engine within a {HEAP // 1024} KB unix heap; the model holds {info['model_heap']} B")


def test_the_engine_carries_the_format_modules_tables() -> None:
    """One opcode table: the engine's KERNELS (smf_tables) and DECODERS (smf_bodies) are the blocks generated from
    toolchain.contracts.smf (what every bundle ships), and name modules and functions that exist."""
    for name in engine_tables():
        src = (ENGINE_DIR / f"{name}.py").read_text()
        assert src == engine_source(name), f"{name}.py's generated table is stale: write engine_tables()['{name}']"
    for module, function in KERNELS.values():
        assert f"\ndef {function}(" in (ENGINE_DIR / f"{module}.py").read_text()
    for module in DECODERS.values():
        assert "\ndef load(d, p, rows, n):" in (ENGINE_DIR / f"{module}.py").read_text()


def test_the_microbit_gets_short_names_and_the_shared_kernels_linked(model_dir: Path) -> None:
    """The micro:bit's files: short names, imports rewritten to them, and the general engine's mbqm and avgpool
    linked into smf_mbk (no import of their modules, which are not shipped there)."""
    smf = tflite_to_smf(sm.cached_tflite(model_dir, "microbit").read_bytes())
    files = microbit_engine_files(smf, converter=True)
    assert {"smf_mbk.py", "smf_mb.py", "smf_mbc.py", "smf_mb1.py", "smf_mb4.py"} <= set(files)
    for name, data in files.items():
        tree = ast.parse(data.decode())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert imported <= {"array", "gc", "sys", "smf_mbk", "smf_mbc"}, (name, imported)
        assert "microbit_" not in data.decode(), name
    kernels = {n.name for n in ast.parse(files["smf_mbk.py"].decode()).body if isinstance(n, ast.FunctionDef)}
    assert kernels == {"mbqm", "fc", "avgpool"}


def test_the_readme_glossary_is_what_the_microbit_gets() -> None:
    """device_runtime/micropython/README.md lists the micro:bit's short names: the bundle's MICROBIT_NAMES."""
    text = (ENGINE_DIR / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|$", text, flags=re.M))
    assert rows == MICROBIT_NAMES
    for module in MICROBIT_NAMES:
        assert (ENGINE_DIR / f"{module}.py").is_file(), module
