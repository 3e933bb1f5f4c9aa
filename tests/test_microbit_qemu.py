"""The emulated micro:bit (QEMU, MicroPython 1.9.2 firmware) and the raw-REPL client; the engine's
requantization arithmetic on the real 1.9.2 firmware; the model that ``toolchain build --target microbit``
produces, run by the micro:bit engine (``microbit_*``, shipped as ``smf_mb*``) bit-exact with TFLite Micro, and a ZO
round on it."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import sparse_models as sm
from support.repl_helpers import soft_reset

from toolchain.deploy.emulators import microbit
from toolchain.deploy.repl import DeviceError, RawRepl, ReplError
from toolchain.export.requant import quantize_multiplier
from toolchain.package.load import engine_source, microbit_engine_files
from toolchain.package.microbit import microbit_source

pytestmark = pytest.mark.skipif(not microbit.available(), reason="qemu-system-arm or the micro:bit firmware is missing")


@pytest.fixture(scope="module")
def board() -> tuple[microbit.QemuMicrobit, RawRepl]:
    with microbit.microbit_session() as session:
        yield session


def test_emulator_exposes_a_port_and_the_repl_runs_code(board: tuple[microbit.QemuMicrobit, RawRepl]) -> None:
    qemu, repl = board
    assert qemu.running() and qemu.port.startswith("/dev/pts/")
    assert repl.exec("import sys\nprint(sys.implementation.version[:2], 6 * 7)").strip() == "(1, 9) 42"
    with pytest.raises(DeviceError, match="ZeroDivisionError"):
        repl.exec("1 // 0")
    assert repl.exec("print('still alive')").strip() == "still alive"  # the session survives an exception


def test_put_file_is_verified(board: tuple[microbit.QemuMicrobit, RawRepl]) -> None:
    _, repl = board
    data = bytes(random.Random(3).randrange(256) for _ in range(700))
    repl.put_file("blob.bin", data)
    assert repl.exec("import os\nprint('blob.bin' in os.listdir(), os.size('blob.bin'))").split() == ["True", "700"]
    repl.exec("os.remove('blob.bin')")


def test_bad_port_is_a_clear_error() -> None:
    with pytest.raises(ReplError, match="cannot open serial port"):
        RawRepl("/dev/does-not-exist")


def _reference(x: int, m: int, s: int) -> int:
    x = x * (1 << max(s, 0))
    ab = x * m
    t = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    v = t >> 31 if t >= 0 else -((-t) >> 31)
    e = max(-s, 0)
    mask = (1 << e) - 1
    return (v >> e) + (1 if (v & mask) > (mask >> 1) + (1 if v < 0 else 0) else 0)


def test_requantization_is_exact_on_micropython_1_9_2(board: tuple[microbit.QemuMicrobit, RawRepl]) -> None:
    """The engine's MultiplyByQuantizedMultiplier (smf_requant: 15-bit digits, small ints) on the micro:bit firmware,
    as the micro:bit gets it (smf_q.py)."""
    _, repl = board
    name, data = microbit_source("smf_requant", engine_source)
    assert name == "smf_q.py"
    repl.put_file(name, data)
    rng = random.Random(11)
    cases = []
    for _ in range(40):
        m, s = quantize_multiplier(rng.uniform(1e-5, 2.0))
        x = rng.choice([rng.randint(-(2**15), 2**15), rng.randint(-(2**24), 2**24), rng.randint(-(2**29), 2**29)])
        cases.append((x >> max(s, 0), m, s))
    repl.exec("from smf_q import mbqm")
    got = []
    for i in range(0, len(cases), 8):  # small commands: the raw REPL buffers them in the ~9 KB heap
        chunk = cases[i : i + 8]
        got += repl.exec(f"for x, m, s in {chunk!r}:\n print(mbqm(x, m & 0x7FFF, m >> 15, s))").split()
    assert [int(v) for v in got] == [_reference(*c) for c in cases]


# ---------------------------------------------------------------- the model built for the micro:bit

N_MNIST = 20  # MNIST test images, sent over the raw REPL (the flash file system holds ~15 KB)
N_RANDOM = 300  # uniform int8 inputs generated on the device (16-bit LCG, replayed here)
HEAP_BYTES = 9744  # free heap of the 1.9.2 firmware after a soft reset (gc.mem_free)


def _lcg_inputs(n: int, size: int, seed: int = 1) -> np.ndarray:
    """What the device's ``s = (s * 75 + 74) % 65537`` generator writes into the input (small ints only)."""
    out = np.empty((n, size), np.int8)
    s = seed
    for k in range(n):
        for i in range(size):
            s = (s * 75 + 74) % 65537
            out[k, i] = (s & 255) - 128
    return out



def _put_module(repl: RawRepl, name: str) -> None:
    repl.put_file(*microbit_source(name, engine_source))


def _ints(line: str) -> list[int]:
    return [int(v) for v in line.split()]


@pytest.fixture(scope="module")
def microbit_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``toolchain build --target microbit`` (tiny training budget): model.tflite + model.smf."""
    out = tmp_path_factory.mktemp("mb") / "microbit"
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "build", "--target", "microbit", "--rounds", "2",
                           "--clients", "2", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return out


# with the model loaded only short commands fit the heap (each is compiled on the device)
LCG = "gc.collect()\nfor i in range(784):\n s = (s * 75 + 74) % 65537\n b[i] = (s & 255) - 128\nprint(list(m.infer()))"
ALLOC = "gc.collect()\ngc.disable()\na = gc.mem_alloc()\nm.infer()\na = gc.mem_alloc() - a\ngc.enable()\nprint(a)"
MEM = "gc.collect()\nprint(gc.mem_alloc(), gc.mem_free())"


def test_toolchain_microbit_model_bit_exact_on_microbit(microbit_build: Path) -> None:
    """The built model runs on the micro:bit (QEMU, 1.9.2) bit-exact with TFLite Micro; heap measured."""
    from toolchain.contracts.smf import FULLY_CONNECTED, read_smf

    tflite = microbit_build / "model.tflite"
    smf = (microbit_build / "model.smf").read_bytes()
    # the exporter's 1x1 CONV_2D on a 1x1 map (dense layers) are stored as FULLY_CONNECTED
    assert [o.opcode for o in read_smf(smf).ops if o.weights is not None] == [FULLY_CONNECTED, FULLY_CONNECTED]
    x_mnist = sm.quantized_inputs(tflite, N_MNIST)
    x_lcg = _lcg_inputs(N_RANDOM, 784).reshape(N_RANDOM, 28, 28, 1)
    ref_mnist, ref_lcg = sm.tflm_outputs(tflite, x_mnist), sm.tflm_outputs(tflite, x_lcg)
    with microbit.microbit_session(timeout=120) as (_board, repl):
        used, a0, a1, a2, free = _boot_with_model(repl, smf)
        got_mnist, infer_alloc = [], 0
        for x in x_mnist:
            _send_input(repl, x)
            infer_alloc = max(infer_alloc, int(repl.exec(ALLOC)))  # (gc disabled: garbage counts too)
            got_mnist.append(_ints(repl.exec("print(list(m.infer()))").strip("[]\n").replace(",", " ")))
        got_mnist = np.array(got_mnist, np.int8)
        got_lcg = np.array([_ints(repl.exec(LCG).strip("[]\n").replace(",", " ")) for _ in range(N_RANDOM)], np.int8)
        after = _ints(repl.exec("gc.collect()\nprint(gc.mem_alloc(), gc.mem_free())"))
    np.testing.assert_array_equal(got_mnist, ref_mnist)
    np.testing.assert_array_equal(got_lcg, ref_lcg)
    runtime, model = a1 - a0, a2 - a1
    print(f"micro:bit: {N_MNIST} MNIST + {N_RANDOM} random inputs bit-exact with TFLite Micro; converter boot "
          f"{used} B used; runtime code {runtime} B, model (buffers included) {model} B, "
          f"mem_alloc after load {a2} B ({free} B free), per inference {infer_alloc} B, after {after}")
    assert infer_alloc <= 64  # buffers are allocated once: inference allocates (almost) nothing
    assert model <= 4096  # toolchain/boards/builtin/microbit.toml: ram_bytes for model + activations
    assert a2 + infer_alloc <= HEAP_BYTES - 2048  # peak heap: room left for the application


def _boot_with_model(repl: RawRepl, smf: bytes) -> tuple[int, int, int, int, int]:
    """Copy the engine and ``smf``, convert at a first boot, load at a second. Heap (gc.mem_alloc): after the
    conversion, at the second boot, after the runtime's import, after the model's load; then gc.mem_free."""
    # the converter (first boot, then deleted) and the runtime, under their micro:bit names
    for name, data in microbit_engine_files(smf, converter=True).items():
        repl.put_file(name, data)
    repl.put_file("model.smf", smf)
    soft_reset(repl, timeout=20.0)
    used, _ = _ints(repl.exec("import gc\nimport smf_mbc\nsmf_mbc.convert('model.smf', 'model.smc')\n" + MEM,
                              timeout=120))
    soft_reset(repl, timeout=20.0)
    from toolchain.deploy.flash_board import read_file
    from toolchain.package.bundle import smc_from_smf

    # the board's conversion writes what the bundle ships (the same converter, run on the host under CPython)
    assert read_file(repl, "model.smc") == smc_from_smf(smf)
    soft_reset(repl, timeout=20.0)
    a0, _ = _ints(repl.exec("import gc\n" + MEM))
    a1, _ = _ints(repl.exec("import smf_mbk\nimport smf_mb\n" + MEM, timeout=120))
    a2, free = _ints(repl.exec("m = smf_mb.Model('model.smc')\n" + MEM, timeout=120))
    repl.exec("b = m.input_buffer()\ns = 1")
    return used, a0, a1, a2, free


def _send_input(repl: RawRepl, x: np.ndarray) -> None:
    v = [int(c) for c in np.asarray(x, np.int8).reshape(-1)]
    for i in range(0, len(v), 28):  # short, flat commands: the parser needs contiguous blocks
        part = v[i:i + 28]
        for _ in range(4):  # read back: a burst of bytes lost on the UART can leave a valid, different tuple
            got = repl.exec(f"gc.collect()\nX = {tuple(part)!r}\nprint(repr(X))")  # (a tuple: no qstrs)
            if got.strip() == repr(tuple(part)):
                break
        else:
            raise AssertionError(f"the board kept reading input bytes {i}..{i + 27} differently")
        repl.exec(f"for i in range(28): b[{i} + i] = X[i]")


# the ZO round at the third boot, one short command each (each is compiled on the device)
ZO_ROUND = ("import zo",  # (the bigger compile first, on the clean heap)
            "import gc",
            "gc.collect()",
            "import ft",
            "gc.collect()\na3 = gc.mem_alloc()",
            "f = open('feats.bin', 'rb')\nxs = [f.read(%(cols)d) for i in range(%(n)d)]\nf.close()",
            "t = ft.FineTuner(None, %(spec)r)\ngc.collect()\na4 = gc.mem_alloc()",
            "P = [0]\nL = t._loss\ndef W():\n P[0] = max(P[0], gc.mem_alloc())\n return L()\nt._loss = W",
            "g, l0, n = t.probe(%(seed)d, %(k)d, %(mu)r, xs, %(ys)r)\nprint(' '.join([repr(v) for v in g]), repr(l0), n)",
            "t.update(%(seed)d, g, %(lr)r)",
            "for v in t.w: print(repr(v), end=' ')",
            "gc.collect()\nprint(a3, a4, P[0], gc.mem_alloc(), gc.mem_free())")


def test_zo_round_on_microbit(microbit_build: Path) -> None:
    """A ZO round of the built model on the micro:bit: the engine computes the head's int8 inputs (bit-exact
    with the host), then at the next boot ``ft.FineTuner(None, spec).probe`` + ``update`` over the last layer
    (float), scalars within the docs/zo.md tolerance of the host reference. On 1.9.2 the engine and zo + ft do
    not fit one heap (each module compiles on the device), so the features go through the flash file system."""
    from toolchain.verify.reference import (
        engine_features,
        head_from_smf,
        reference_probe,
        reference_update,
        scalar_tolerance,
    )

    smf = (microbit_build / "model.smf").read_bytes()
    head = head_from_smf(smf)
    n, k, mu, seed, lr = 8, 4, 1e-3, 2024, 0.5
    # inputs from the device's 16-bit LCG (nothing to transfer), labels fixed: the round's mechanics and
    # numbers are what is checked here, against the host reference on the same features and labels
    xs = _lcg_inputs(n, 784).reshape(n, 28, 28, 1)
    ys = [j % 10 for j in range(n)]
    feats = engine_features(smf, xs, head)
    with microbit.microbit_session(timeout=120) as (_board, repl):
        _boot_with_model(repl, smf)
        repl.exec(f"FB = bytearray({n * head.cols})\nh = m.bufs[m.tensors[m.ops[{head.op}][2]][3]]")
        for j in range(n):  # the engine's layers before the head, on the device
            repl.exec(LCG.rsplit("\n", 1)[0])
            repl.exec(f"for i in range({head.op}): m.ops[i][0](m, m.ops[i])")
            repl.exec(f"for i in range({head.cols}): FB[{j * head.cols} + i] = h[i]")  # (low byte)
            repl.exec("gc.collect()")  # (garbage left by the commands themselves)
        for cmd in ("m = b = h = None", "gc.collect()", "F = open('feats.bin', 'wb')", "F.write(FB)", "F.close()"):
            repl.exec(cmd)  # (one statement each: the parser needs contiguous blocks)
        repl.exec("import os\nfor f in os.listdir():\n if f.startswith('smf_') or f == 'model.smf': os.remove(f)")
        repl.put_file("head.bin", head.to_bytes())  # (the engine's files are removed: the flash holds ~15 KB)
        for name in ("zo", "ft"):
            _put_module(repl, name)
        soft_reset(repl, timeout=20.0)  # third boot: zo + ft on a clean heap
        spec = {"head": head.spec(), "estimator": "forward"}
        params = dict(cols=head.cols, n=n, spec=spec, seed=seed, k=k, mu=mu, ys=ys, lr=lr)
        out = [line for cmd in ZO_ROUND for line in repl.exec(cmd % params, timeout=300).strip().splitlines()]
        repl.exec("t = L = W = xs = None\ngc.collect()")
        got_feats = np.frombuffer(bytes(int(v) & 255 for v in repl.exec(
            "f = open('feats.bin', 'rb')\nfor v in f.read(): print(v, end=' ')\nf.close()").split()), np.int8)
    np.testing.assert_array_equal(got_feats.reshape(n, head.cols), feats)  # device features bit-exact
    *g, loss, n_used = out[0].split()
    g, loss = np.array(g, np.float64), float(loss)
    ref = reference_probe(head, head.weights, feats, ys, seed, k, mu)
    assert int(n_used) == n and loss == pytest.approx(ref.loss, rel=1e-4)
    assert np.max(np.abs(g - ref.scalars)) <= scalar_tolerance(ref.loss, mu, 30)  # 30-bit floats
    w = np.array(out[1].split(), np.float64)
    want = reference_update(head.weights, seed, np.asarray(g, np.float32), lr)  # the device's own scalars
    print("max |w - host update|", np.max(np.abs(w - want)), "max |w|", np.max(np.abs(want)))
    assert np.allclose(w, want, rtol=2.0**-16, atol=1e-5)  # 30-bit floats (docs/zo.md section 9)
    a3, a4, peak, after, free = _ints(out[2])
    print(f"micro:bit ZO round (K={k}, {n} samples, {head.nnz}+{head.rows} trainable): zo+ft code {a3} B, "
          f"after FineTuner {a4} B, peak mem_alloc during probe {peak} B, after {after} B ({free} B free); "
          f"max |g - host| {np.max(np.abs(g - ref.scalars)):.2e}")
    assert peak <= HEAP_BYTES - 1024
