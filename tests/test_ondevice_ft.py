"""On-device ZO fine-tuning (device_runtime/micropython/ft.py) against the host reference (toolchain.package).

Real parts: pruned int8 models converted by TensorFlow, the sparse engine and ft.py run by CPython, by MicroPython
1.29 on WebAssembly, and by the micro:bit v1 firmware (MicroPython 1.9.2) in QEMU (heap measured there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import sparse_models as sm

from toolchain.boards.profiles import get_profile
from toolchain.deploy.emulators import microbit, wasm
from toolchain.deploy.emulators.harness import run_rounds
from toolchain.export.smf_writer import tflite_to_smf
from toolchain.package.bundle import MICROBIT_TUNER_FILES, write_bundle
from toolchain.verify.reference import (
    Head,
    engine_features,
    head_accuracy,
    head_from_smf,
    reference_probe,
    reference_update,
    scalar_tolerance,
)

SEEDS = [2024, 0xDEADBEEF]
K, MU, LR = 8, 1e-3, 0.05


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "smf_models"  # shared with test_micropython_engine.py


@pytest.fixture(scope="session")
def lenet(model_dir: Path) -> tuple[Path, bytes]:
    path = sm.cached_tflite(model_dir, "lenet")
    return path, tflite_to_smf(path.read_bytes())


@pytest.fixture(scope="session")
def micro(model_dir: Path) -> tuple[Path, bytes]:
    path = sm.cached_tflite(model_dir, "microbit")
    return path, tflite_to_smf(path.read_bytes())


def replay(head: Head, feats: np.ndarray, ys: list[int], run, batches: list[list[int]], estimator: str = "forward",
           tol: float = 0.0) -> float:
    """Replay the device's rounds on the host: scalars within ``tol``, weights bit-exact after every update."""
    w = head.weights.copy()
    worst = 0.0
    for r, seed in enumerate(SEEDS):
        b = batches[r]
        ref = reference_probe(head, w, feats[b], [ys[i] for i in b], seed, K, MU, estimator)
        worst = max(worst, float(np.abs(ref.scalars - run.scalars[r]).max()))
        assert run.counts[r] == len(b)
        assert run.losses[r] == pytest.approx(ref.loss, rel=1e-12, abs=1e-12)
        w = reference_update(w, seed, run.scalars[r], LR)
        np.testing.assert_array_equal(run.weights[r], w)  # the update is bit-exact on double ports
    assert worst <= tol
    return worst


def test_head_is_the_int8_layer_in_float(lenet: tuple[Path, bytes]) -> None:
    """The float head on the engine's int8 features predicts what TFLite Micro's int8 model predicts."""
    path, smf = lenet
    head = head_from_smf(smf)
    assert (head.rows, head.cols) == (10, 84) and head.nnz == int(head.mask.sum()) > 0
    x = sm.quantized_inputs(path, 200)
    feats = engine_features(smf, x, head)
    z_int8 = sm.tflm_outputs(path, x).astype(np.int64)
    from toolchain.verify.reference import head_logits

    agree = float((head_logits(head, head.weights, feats).argmax(1) == z_int8.argmax(1)).mean())
    assert agree >= 0.9, agree  # (int8 ties and output rounding make a few differ)
    assert 0.0 <= head_accuracy(head, head.weights, feats, [0] * len(feats)) <= 1.0


@pytest.mark.parametrize("estimator", ["forward", "central", "one_point"])
def test_cpython_device_code_equals_reference(micro: tuple[Path, bytes], estimator: str) -> None:
    path, smf = micro
    head = head_from_smf(smf)
    x = sm.quantized_inputs(path, 24)
    _, labels = sm.mnist("t10k")
    ys = labels[:24].tolist()
    batches = [list(range(12)), list(range(12, 24))]
    run = run_rounds(head, {"estimator": estimator}, x, ys, SEEDS, batches, K, MU, LR, list(range(24)), smf=smf,
                     port="cpython")
    feats = engine_features(smf, x, head)
    assert replay(head, feats, ys, run, batches, estimator) == 0.0  # same code, same float: bit-identical
    assert run.accuracy == head_accuracy(head, run.weights[-1], feats, ys)


@pytest.mark.skipif(not wasm.available(), reason="Node.js or the MicroPython WebAssembly package is missing")
def test_wasm_rounds_equal_reference(lenet: tuple[Path, bytes]) -> None:
    """Engine + ft.py on MicroPython 1.29 (WebAssembly, double floats), started with the ESP32 profile's heap size
    (the WebAssembly port grows its heap on demand, so that size is not a bound: heap is measured on the micro:bit)."""
    path, smf = lenet
    head = head_from_smf(smf)
    x = sm.quantized_inputs(path, 32, start=100)
    _, labels = sm.mnist("t10k")
    ys = labels[100:132].tolist()
    batches = [list(range(16)), list(range(16, 32))]
    heap = get_profile("esp32").ram_bytes
    run = run_rounds(head, {"estimator": "forward", "batch_max": 16}, x, ys, SEEDS, batches, K, MU, LR,
                     list(range(32)), smf=smf, port="wasm", heap_bytes=heap)
    worst = replay(head, engine_features(smf, x, head), ys, run, batches, tol=1e-6)  # libm exp/log may differ
    print(f"WebAssembly: max |scalar - reference| = {worst:.2e}")


def _files_in_mpy_bundle(bundle: Path) -> dict[str, bytes]:
    return {f"/lib/{p.name}": p.read_bytes() for p in bundle.glob("*.mpy")} | {
        f"/{n}": (bundle / n).read_bytes() for n in ("model.smf", "head.bin", "config.json")}


@pytest.mark.skipif(not wasm.available(), reason="Node.js or the MicroPython WebAssembly package is missing")
def test_esp32_bundle_mpy_imports_and_runs_on_wasm(lenet: tuple[Path, bytes], tmp_path: Path) -> None:
    """The ESP32 bundle's .mpy files (mpy-cross -march=xtensawin, bytecode v6) import on MicroPython 1.29.

    They contain bytecode only (no @native code), so mpy-cross writes no architecture into the header and the
    files are byte-identical to bytecode-only .mpy: the WebAssembly port imports exactly what an ESP32 gets."""
    path, smf = lenet
    (tmp_path / "model.smf").write_bytes(smf)
    written = write_bundle(tmp_path, get_profile("esp32"))
    bundle = tmp_path / "bundle"
    cfg = json.loads((bundle / "config.json").read_text())
    import hashlib

    assert set(cfg["files"]) | {"config.json"} == {n.removeprefix("bundle/") for n in written}
    for name, digest in cfg["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    assert {"zo.mpy", "ft.mpy", "smf.mpy", "smf_fc.mpy"} <= {p.name for p in bundle.glob("*.mpy")}
    assert not list(bundle.glob("*.py"))
    for p in bundle.glob("*.mpy"):
        assert p.read_bytes()[:2] == b"M\x06"
    x = sm.quantized_inputs(path, 8)
    head = head_from_smf(smf)
    code = ("import sys\nprint(sys.implementation._mpy & 255)\nimport ft, zo, smf\nprint(ft.__file__, zo.__file__)\n"
            "import json\nspec = json.loads(open('/config.json').read())\nspec['head']['file'] = '/head.bin'\n"
            "t = ft.FineTuner(smf.Model(open('/model.smf', 'rb').read()), spec)\n"
            "f = open('/x.bin', 'rb')\nxs = [f.read(784) for i in range(8)]\n"
            f"g, l, n = t.probe(77, 4, 0.001, xs, {[int(v) for v in range(8)]})\nprint(repr(l), n)\n"
            "print(' '.join([repr(v) for v in g]))\n")
    out = wasm.run_micropython(code, heap_bytes=get_profile("esp32").ram_bytes,
                               files=_files_in_mpy_bundle(bundle) | {"/x.bin": x.tobytes()}).split("\n")
    assert out[0] == "6" and out[1] == "/lib/ft.mpy /lib/zo.mpy"
    ref = reference_probe(head, head.weights, engine_features(smf, x, head), list(range(8)), 77, 4, 1e-3)
    assert float(out[2].split()[0]) == pytest.approx(ref.loss, abs=1e-12) and out[2].split()[1] == "8"
    np.testing.assert_allclose([float(v) for v in out[3].split()], ref.scalars, rtol=1e-6, atol=1e-6)


# --- micro:bit (MicroPython 1.9.2, 30-bit floats, ~9 KB heap) in QEMU -------------------------------------------

@pytest.mark.skipif(not microbit.available(), reason="qemu-system-arm or the micro:bit firmware is missing")
def test_microbit_hex_boots_tuner_and_zo_round_in_qemu(micro: tuple[Path, bytes], tmp_path: Path) -> None:
    """The bundle's hex boots zo + ft on the micro:bit (1.9.2, ~9 KB heap, QEMU) once the local head inputs are on
    its file system (here computed by the host engine, bit-exact with the device's); a ZO round matches the host
    reference within the 30-bit-float bound of docs/zo.md, and the fine-tuner's heap (state + data + round) is
    within the profile's RAM for the model."""
    import ast

    path, smf = micro
    profile = get_profile("microbit")
    (tmp_path / "model.smf").write_bytes(smf)
    write_bundle(tmp_path, profile)
    bundle = tmp_path / "bundle"
    head = head_from_smf(smf)
    n = 16
    x = sm.quantized_inputs(path, n, start=200)
    _, labels = sm.mnist("t10k")
    ys = labels[200 : 200 + n].tolist()
    feats = engine_features(smf, x, head)
    seed = SEEDS[1]
    k = json.loads((bundle / "config.json").read_text())["k_max"]  # preallocated by the tuner
    files = {**{name: (bundle / name).read_bytes() for name in MICROBIT_TUNER_FILES}, "feats.bin": feats.tobytes()}
    # main.py of the hex builds the tuner
    with microbit.microbit_session(hex_path=bundle / "microbit.hex", files=files) as (_board, repl):
        assert repl.exec("print('tuner' in globals())").strip() == "True"
        tuned = int(repl.exec("import gc\ngc.collect()\nprint(gc.mem_alloc())"))  # runtime + tuner
        repl.exec(f"f=open('feats.bin','rb')\nxs=[f.read({head.cols}) for i in range({n})]\nf.close()\n"
                  f"ys={ys!r}")
        # short commands: the raw REPL's own buffers are garbage that gc.disable() would keep
        repl.exec(f"gc.collect()\na1=gc.mem_alloc()\ngc.disable()\ng,l,n=tuner.probe({seed},{k},{MU},xs,ys)\n"
                  f"tuner.update({seed},g,{LR})\na2=gc.mem_alloc()\ngc.enable()", timeout=300)
        # scalars and weights as their float32 bytes (exact, not the 6 printed digits)
        lines = repl.exec("del xs\ngc.collect()\nprint(a1,a2,gc.mem_free())\nprint(repr(l),n)\n"
                          "print(bytes(tuner.g))\nprint(bytes(tuner.w))").split("\n")
        rt = int(repl.exec("del tuner, g, l, n, ys\ngc.collect()\nprint(gc.mem_alloc())"))  # zo + ft code only
    a1, a2, free = map(int, lines[0].split())
    loss, count = float(lines[1].split()[0]), int(lines[1].split()[1])
    g = np.frombuffer(ast.literal_eval(lines[2]), "<f4").astype(np.float64)
    w = np.frombuffer(ast.literal_eval(lines[3]), "<f4")
    ref = reference_probe(head, head.weights, feats, ys, seed, k, MU)
    assert count == n and loss == pytest.approx(ref.loss, rel=1e-5)
    tol = scalar_tolerance(ref.loss, MU, profile.float_bits)
    assert np.abs(g - ref.scalars).max() <= tol
    want = reference_update(head.weights, seed, g, LR)  # the server would send back the device's own scalars
    assert np.allclose(w, want, rtol=2.0**-18, atol=1e-6)  # docs/zo.md section 9: 30-bit arithmetic
    tuner, data, rnd = tuned - rt, a1 - tuned, a2 - a1  # (gc disabled during the round: nothing reused)
    print(f"micro:bit heap: runtime (zo + ft code) {rt} B, tuner state {tuner} B, {n} samples {data} B, round "
          f"{rnd} B, free after {free} B; max |scalar - reference| {np.abs(g - ref.scalars).max():.2e} "
          f"(bound {tol:.2e})")
    assert tuner + data + rnd <= profile.ram_bytes  # what fine-tuning needs beside the code fits the model budget
