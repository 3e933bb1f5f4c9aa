"""The emulated micro:bit (QEMU, MicroPython 1.9.2 firmware) and the raw-REPL client; the engine's
requantization arithmetic on the real 1.9.2 firmware."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_models as sm  # noqa: E402

from hw.emulators import microbit  # noqa: E402
from hw.repl import DeviceError, RawRepl, ReplError  # noqa: E402
from toolchain.export.sparse_format import quantize_multiplier  # noqa: E402

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
    """The engine's MultiplyByQuantizedMultiplier (15-bit digits, small ints) on the micro:bit firmware."""
    _, repl = board
    src = (sm.ENGINE_DIR / "smf_q.py").read_text()
    repl.put_file("smf_q.py", microbit.minify_source(src).encode())
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


@pytest.mark.xfail(run=False, reason=(
    "the sparse engine does not fit the micro:bit heap yet: loading model (b) from a clean boot gets through "
    "the header/CRC and table loaders and (in some runs) the weight decoding, then a MemoryError (a few "
    "hundred to ~1.8 KB contiguous) while compiling the next module; about 1 KB short of the ~9 KB heap"))
def test_model_b_bit_exact_on_microbit(board: tuple[microbit.QemuMicrobit, RawRepl], tmp_path: Path) -> None:
    import numpy as np

    from toolchain.export.sparse_format import tflite_to_smf

    _, repl = board
    path = sm.cached_tflite(tmp_path, "microbit")
    x = sm.quantized_inputs(path, 20)
    ref = sm.tflm_outputs(path, x)
    for name in ("smf", "smf_u", "smf_chk", "smf_ld", "smf_wl", "smf_w", "smf_e3", "smf_k", "smf_q", "smf_fc",
                 "smf_avgpool"):
        repl.put_file(name + ".py", microbit.minify_source((sm.ENGINE_DIR / (name + ".py")).read_text()).encode())
    repl.put_file("model.smf", tflite_to_smf(path.read_bytes()))
    repl.exec("import gc\nfrom smf import Model\nm = Model('model.smf')\ngc.collect()\nb = m.input_buffer()", timeout=60)
    outs = []
    for xi in x:
        raw = xi.reshape(-1).tobytes()
        for i in range(0, len(raw), 98):
            repl.exec(f"b[{i}:{i + 98}] = bytearray({raw[i : i + 98]!r})")
        outs.append([int(v) for v in repl.exec("print(list(m.infer()))").strip("[]\n").split(",")])
    np.testing.assert_array_equal(np.array(outs, np.int8), ref)
    print("micro:bit heap after load:", repl.exec("gc.collect()\nprint(gc.mem_alloc(), gc.mem_free())"))
