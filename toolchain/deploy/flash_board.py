"""Talking to a MicroPython board on a serial port: open, identify, hash and list files.

Shared by ``toolchain flash`` (``toolchain/deploy/flash.py``) and the conformance suite (``toolchain/deploy/hil/``). Every failure
is a :class:`toolchain.contracts.errors.ToolchainError` with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import stat
from dataclasses import dataclass

from toolchain.contracts.errors import ToolchainError
from toolchain.deploy.repl import DeviceError, RawRepl, ReplError

# sys.platform of the firmware each board profile expects; "webassembly" is the emulated board
# (toolchain/deploy/emulators/wasm_stream.py), accepted as a stand-in for MicroPython boards of the same version.
PLATFORMS = {"microbit": "microbit", "esp32": "esp32", "esp32s3": "esp32", "rp2040": "rp2"}
EMULATED_PLATFORMS = ("webassembly",)

_IDENTIFY = """import sys,gc
try:
 import os
except ImportError:
 os=None
v=sys.implementation.version
m=getattr(sys.implementation,'_mpy',0)
try:
 import hashlib
 h=1 if hasattr(hashlib,'sha256') else 0
except ImportError:
 h=0
s=-1
try:
 t=os.statvfs('/')
 s=t[0]*t[3]
except Exception:
 pass
gc.collect()
print('ID',sys.platform,v[0],v[1],v[2],m,h,s,gc.mem_free())
del v,m,h,s
"""


@dataclass(frozen=True)
class BoardInfo:
    port: str
    platform: str  # sys.platform: microbit, esp32, rp2, webassembly, ...
    version: tuple[int, int, int]  # sys.implementation.version
    mpy: int  # sys.implementation._mpy (0 when the firmware cannot import .mpy)
    has_sha256: bool
    fs_free: int  # bytes free on the file system, -1 when the firmware cannot tell
    mem_free: int

    @property
    def version_text(self) -> str:
        return ".".join(str(v) for v in self.version)

    @property
    def emulated(self) -> bool:
        return self.platform in EMULATED_PLATFORMS

    def describe(self) -> str:
        mpy = f"mpy {self.mpy & 0xFF}.{(self.mpy >> 8) & 3}" if self.mpy else "no .mpy"
        free = f"{self.fs_free} B free" if self.fs_free >= 0 else "free space unknown"
        return (f"{self.platform}, MicroPython {self.version_text}, {mpy}, "
                f"{'hashlib.sha256' if self.has_sha256 else 'no hashlib'}, {free}, heap {self.mem_free} B free")


def check_port(port: str) -> None:
    """A clear error for a port that cannot be a serial device, before anything touches it."""
    if not os.path.exists(port):
        raise ToolchainError(f"serial port {port} does not exist; plug the board in and pass its port "
                             "(Linux: /dev/ttyUSB0, /dev/ttyACM0; `toolchain emulate` prints emulated ones), "
                             "see docs/boards/")
    mode = os.stat(port).st_mode
    if not stat.S_ISCHR(mode):
        raise ToolchainError(f"{port} is not a serial device; pass the board's port (e.g. /dev/ttyUSB0), see docs/boards/")


def connect(port: str, timeout: float = 20.0, attempts: int = 4) -> RawRepl:
    """Open ``port`` and enter the raw REPL, or raise a one-line :class:`ToolchainError`."""
    check_port(port)
    try:
        repl = RawRepl(port, timeout=timeout)
    except ReplError as exc:
        hint = ("add yourself to the 'dialout' group or install the udev rules in docs/boards/"
                if "ermission" in str(exc) else "close other programs using it (screen, minicom, Thonny, mpremote)")
        raise ToolchainError(f"cannot open {port} ({str(exc).splitlines()[0]}); {hint}") from None
    try:
        repl.enter_raw(attempts=attempts)
    except ReplError:
        repl.close()
        raise ToolchainError(f"no MicroPython REPL answers on {port}; press the board's reset button, check that it "
                             "runs MicroPython (flash the firmware, docs/boards/) and that no program holds the port") from None
    return repl


def run(repl: RawRepl, code: str, what: str, timeout: float | None = None, attempts: int = 3) -> str:
    """Run read-only ``code`` (a query: running it twice is harmless); a device exception or a lost link become
    one-line errors naming ``what``.

    A UART without flow control can drop a burst of bytes and leave valid but different code (measured under
    load on the QEMU micro:bit: ``f.close()\ndel f,b`` arrived as ``f.closeb``, an AttributeError), so a device
    exception is asked again before it is believed."""
    for i in range(attempts):
        try:
            return repl.exec(code, timeout=timeout)
        except DeviceError as exc:
            if i + 1 < attempts:
                continue
            last = exc.traceback.strip().splitlines()[-1] if exc.traceback.strip() else "error"
            raise ToolchainError(f"{what} failed on the board: {last}; reset the board and retry") from None
        except ReplError as exc:
            raise ToolchainError(f"{what}: the board stopped answering ({str(exc).splitlines()[0][:120]}); "
                                 "reset it and retry") from None
    raise AssertionError("unreachable")


def identify(repl: RawRepl) -> BoardInfo:
    try:
        out = run(repl, _IDENTIFY, "identifying the board")
    except ToolchainError as exc:
        if "MemoryError" not in str(exc):
            raise
        soft_reset(repl)  # a program left the heap full (a micro:bit has ~9 KB): start from a fresh heap
        out = run(repl, _IDENTIFY, "identifying the board")
    line = next((ln for ln in out.splitlines() if ln.startswith("ID ")), None)
    if line is None:
        raise ToolchainError(f"the board on {repl.serial.port} did not identify itself (got {out[-80:]!r}); "
                             "is it running MicroPython?")
    _, plat, a, b, c, mpy, h, s, free = line.split()
    return BoardInfo(repl.serial.port, plat, (int(a), int(b), int(c)), int(mpy), h == "1", int(s), int(free))


def list_files(repl: RawRepl) -> dict[str, int]:
    """Files at the root of the board's file system -> size (works on 1.9.2's micro:bit ``os``)."""
    out = run(repl, "import os\nfor n in os.listdir():\n try:\n  f=open(n,'rb')\n  k=0\n  while 1:\n   b=f.read(256)\n"
                    "   if not b:break\n   k+=len(b)\n  f.close()\n  print(repr(n),k)\n except Exception:\n  pass\n",
              "listing the board's files", timeout=60)
    files = {}
    for line in out.splitlines():
        name, _, size = line.rpartition(" ")
        if name:
            files[ast.literal_eval(name)] = int(size)
    return files


def read_file(repl: RawRepl, name: str, timeout: float = 120) -> bytes:
    """Read a file back from the board (``repr`` of 48-byte chunks: portable down to 1.9.2)."""
    out = run(repl, f"f=open({name!r},'rb')\nwhile 1:\n b=f.read(48)\n if not b:break\n print(repr(b))\nf.close()\ndel f,b",
              f"reading {name} back", timeout=timeout)
    data = bytearray()
    for line in out.splitlines():
        if line.strip():
            data += ast.literal_eval(line.strip())
    return bytes(data)


def board_sha256(repl: RawRepl, name: str, info: BoardInfo) -> str:
    """sha256 of a file on the board: computed there when it has hashlib, else read back and hashed here."""
    if info.has_sha256:
        out = run(repl, f"import hashlib,ubinascii\nh=hashlib.sha256()\nf=open({name!r},'rb')\nwhile 1:\n b=f.read(256)\n"
                        " if not b:break\n h.update(b)\nf.close()\nprint(ubinascii.hexlify(h.digest()).decode())\ndel h,f,b",
                  f"hashing {name}", timeout=120)
        return out.strip().splitlines()[-1]
    return hashlib.sha256(read_file(repl, name)).hexdigest()


def soft_reset(repl: RawRepl, settle: float = 1.0) -> None:
    """Soft-reset the board (fresh heap; files stay) and re-enter the raw REPL; a board that does not come back
    is a ToolchainError with what to do."""
    if not repl.in_raw:
        repl.enter_raw()
    try:
        repl.soft_reset(settle)
    except ReplError:
        raise ToolchainError(f"the board on {repl.serial.port} did not come back after a soft reset; "
                             "press its reset button and retry") from None
