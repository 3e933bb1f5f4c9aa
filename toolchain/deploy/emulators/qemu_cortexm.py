"""Run code on MicroPython 1.28 for Cortex-M under QEMU, counting instructions.

Firmware built by scripts/build_micropython.sh from the vendored source (the qemu port):

- ``an385``: ``BOARD=MPS2_AN385``, Cortex-M3 (armv7m), thumb/viper emitter on, 256 KB fixed heap (the port's
  default is 140 KB; the files below live in the heap here, in flash on a board);
- ``microbit``: ``BOARD=MICROBIT``, nRF51 Cortex-M0 (armv6m, the RP2040's ISA), thumb emitter turned on
  with armv7m instructions off, 140 KB heap (the machine is given 256 KB of RAM; the real micro:bit v1
  has 16 KB: speed on this board is meaningful, heap size is not).

QEMU runs with ``-icount shift=0``: guest time advances 1 ns per executed instruction, so the firmware's
``time.ticks_us()`` (SysTick at the core clock, in guest time) reads 1 us per 1000 instructions, the same
run to run to within one tick (guest time also runs while the board waits for host input, so the tick's
phase varies) and undisturbed by host load. :func:`instructions` turns a measured ``ticks_us`` difference into
instructions.

The board is driven through its raw REPL over the UART (QEMU's stdio); files are held in a RAM file
system (a ``vfs.mount``-ed Python object, mounted at ``/ram`` and made the working directory), so they
count against the heap like files read into RAM would; ``stdin`` is streamed to the program's
``sys.stdin`` while it runs (large inputs never sit in the device heap).
"""

from __future__ import annotations

import base64
import os
import select
import shutil
import subprocess
import threading
import time
import zlib

from toolchain.contracts import paths

CACHE = paths.CACHE / "micropython"
BOARDS = {
    "an385": ("mps2-an385", CACHE / "qemu-an385.elf", "armv7m", (), 1.0),
    # (the port's board file gives the nRF51 1 MB of flash and 256 KB of RAM for its 140 KB heap)
    "microbit": ("microbit", CACHE / "qemu-microbit.elf", "armv6m",
                 ("-global", "nrf51-soc.flash-size=1048576", "-global", "nrf51-soc.sram-size=262144"), 25 / 16),
}
NS_PER_INSTRUCTION = 1  # -icount shift=0
# The firmware converts SysTick counts to us assuming a 25 MHz core clock; QEMU's nRF51 SysTick runs at
# 16 MHz, so there a reported us is 25/16 real (guest) us (checked: the same viper loop gives the same
# instructions per iteration on both boards with this factor).
MISSING = ("MicroPython qemu Cortex-M port not built or qemu-system-arm missing: run scripts/build_micropython.sh "
           "(needs gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm)")

# Device side: a read-only RAM file system filled from stdin ("name size" line, then per 2 KB of the file one line
# of base64 of its raw deflate; an empty line ends). The emulated UART moves about 11 KB/s, so data is compressed;
# small lines because a long one needs a large contiguous block of a small heap.
_SETUP = r"""
import vfs, io, os, sys, binascii

class _F(io.IOBase):
    def __init__(s, d):
        s.d = d
        s.p = 0
    def readinto(s, b):
        n = min(len(b), len(s.d) - s.p)
        b[:n] = memoryview(s.d)[s.p:s.p + n]
        s.p += n
        return n
    def read(s, n=-1):
        if n < 0:
            n = len(s.d) - s.p
        b = bytearray(min(n, len(s.d) - s.p))
        s.readinto(b)
        return bytes(b)
    def close(s):
        pass
    def ioctl(s, r, a):
        return 0 if r == 4 else -1
class _FS:
    f = {}
    def mount(s, r, m):
        pass
    def umount(s):
        pass
    def chdir(s, p):
        pass
    def getcwd(s):
        return ''
    def stat(s, p):
        p = p.lstrip('/')
        if p in s.f:
            return (0x8000, 0, 0, 0, 0, 0, len(s.f[p]), 0, 0, 0)
        if p == '':
            return (0x4000, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        raise OSError(2)
    def open(s, p, m):
        p = p.lstrip('/')
        if p not in s.f:
            raise OSError(2)
        return _F(s.f[p])
    def ilistdir(s, p):
        return iter([(k, 0x8000, 0, len(v)) for k, v in s.f.items()])
vfs.mount(_FS(), '/ram')
os.chdir('/ram')
sys.path.insert(0, '')
def _rx():
    import deflate, io
    while True:
        h = sys.stdin.readline().split()
        if not h:
            break
        d = bytearray(int(h[1]))
        for p in range(0, len(d), 2048):
            z = binascii.a2b_base64(sys.stdin.readline())
            deflate.DeflateIO(io.BytesIO(z), deflate.RAW, 9).readinto(memoryview(d)[p:p + 2048])
            z = None
        _FS.f[h[0]] = d
_rx()
del _rx
"""


class MicroPythonError(RuntimeError):
    """The MicroPython program raised; the message holds its traceback."""


def available(board: str = "an385") -> bool:
    return shutil.which("qemu-system-arm") is not None and BOARDS[board][1].is_file()


def march(board: str = "an385") -> str:
    """The ``mpy-cross -march=`` of ``board``'s native emitter."""
    return BOARDS[board][2]


def instructions(ticks_us: float, board: str = "an385") -> int:
    """Instructions executed in a ``time.ticks_us()`` interval measured on ``board`` under ``-icount shift=0``."""
    return round(ticks_us * 1000 * BOARDS[board][4] / NS_PER_INSTRUCTION)


class Board:
    """One QEMU instance of ``board`` running MicroPython, driven through the raw REPL."""

    def __init__(self, board: str = "an385", timeout: float = 60.0) -> None:
        if not available(board):
            raise RuntimeError(MISSING)
        machine, elf, _, extra, _ = BOARDS[board]
        self.proc = subprocess.Popen(
            ["qemu-system-arm", "-machine", machine, "-nographic", "-monitor", "none", "-semihosting",
             "-serial", "stdio", "-icount", "shift=0", *extra, "-kernel", str(elf)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._buf = b""
        self._send(b"\r\x03\x03\x01")  # interrupt, then raw REPL
        self._until(b"raw REPL; CTRL-B to exit\r\n>", timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _until(self, token: bytes, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while token not in self._buf:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise TimeoutError(f"no {token!r} from the board; got {self._buf[-500:]!r}")
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                self._buf += os.read(fd, 65536)
        out, _, self._buf = self._buf.partition(token)
        return out

    def exec(self, code: str, stdin: bytes = b"", timeout: float = 600.0) -> str:
        """Run ``code`` (one raw-REPL unit; globals persist) with ``stdin`` streamed to it; its output."""
        if b"\x04" in code.encode():
            raise ValueError("code may not contain Ctrl-D")
        self._send(code.encode() + b"\x04")
        self._until(b"OK", 30)
        # a writer thread: the board only takes input as fast as the program reads it, and it prints
        # while we write (one pipe each way: writing everything first could deadlock)
        writer = threading.Thread(target=self._send, args=(stdin,), daemon=True) if stdin else None
        if writer:
            writer.start()
        out = self._until(b"\x04", timeout)
        err = self._until(b"\x04>", 30)
        if writer:
            writer.join(timeout=30)
        if err.strip():
            raise MicroPythonError(err.decode(errors="replace").strip())
        return out.decode(errors="replace").replace("\r\n", "\n")

    def put_files(self, files: dict[str, bytes]) -> None:
        """Mount the RAM file system at ``/ram`` (the working directory) holding ``files``."""
        lines = []
        for name, data in files.items():
            lines.append(f"{name.lstrip('/')} {len(data)}\n".encode())
            lines += [pack(data[p:p + 2048]) for p in range(0, len(data), 2048)]
        lines.append(b"\n")
        self.exec(_SETUP, stdin=b"".join(lines))


def pack(data: bytes) -> bytes:
    """``data`` as one line the board decodes with ``unpack`` (raw deflate, base64): MNIST-like int8 inputs
    shrink about 4x, which matters at the emulated UART's speed."""
    c = zlib.compressobj(9, zlib.DEFLATED, -9)  # a 512-byte window: the board decodes with wbits=9
    return base64.b64encode(c.compress(data) + c.flush()) + b"\n"


# Device-side counterpart of pack(): fills bytearray d from one stdin line.
UNPACK = """
def unpack(d):
    import deflate, io, binascii, sys
    deflate.DeflateIO(io.BytesIO(binascii.a2b_base64(sys.stdin.readline())), deflate.RAW, 9).readinto(d)
"""


def run_micropython(code: str, *, files: dict[str, bytes] | None = None, stdin: bytes = b"",
                    board: str = "an385", timeout: float = 600.0) -> str:
    """Run ``code`` on a fresh ``board`` with ``files`` in its working directory; what it printed."""
    with Board(board) as b:
        b.put_files(files or {})
        return b.exec(code, stdin=stdin, timeout=timeout)
