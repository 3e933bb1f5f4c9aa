"""The micro:bit v1 (nRF51822, MicroPython 1.9.2) emulated by QEMU, with its UART on a pty.

Two separate steps, so that a CLI can start the emulator and print the port for other tools:

* :class:`QemuMicrobit` starts ``qemu-system-arm -M microbit`` and exposes the pty path (``.port``);
* :class:`hw.repl.RawRepl` connects to any port and runs code / copies files.

:func:`microbit_session` does both for tests.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import tempfile
import threading
import time
import tokenize
from collections.abc import Iterator
from pathlib import Path

from hw.repl import RawRepl

DEFAULT_FIRMWARE = Path("/usr/share/firmware-microbit-micropython/firmware.hex")
QEMU = "qemu-system-arm"
_PTY_RE = re.compile(rb"char device redirected to (/dev/pts/\d+)")


class EmulatorError(RuntimeError):
    """QEMU could not be started or did not expose the board's serial port."""


def available(firmware: Path = DEFAULT_FIRMWARE) -> bool:
    return shutil.which(QEMU) is not None and Path(firmware).is_file()


def build_hex_with_script(script: str, out: Path, firmware: Path = DEFAULT_FIRMWARE) -> Path:
    """Write a hex of ``firmware`` with ``script`` embedded as main.py (runs at boot); needs uflash 1.x."""
    import uflash  # uflash 1.3.0: 2.x cannot embed into the Debian firmware

    runtime = Path(firmware).read_text()
    out = Path(out)
    out.write_text(uflash.embed_hex(runtime, uflash.hexlify(script.encode())))
    return out


_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_SHORT = _LETTERS + [c + d for c in _LETTERS for d in "0123456789"]


def _local_renames(src: str, keep: frozenset[str]) -> dict[tuple[int, int], dict[str, str]]:
    """Per function (line span): its local names and parameters -> short names not used otherwise there."""
    import ast
    import builtins
    import symtable

    tree = ast.parse(src)
    table = symtable.symtable(src, "<device>", "exec")
    spans: dict[str, list[tuple[int, int]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            spans.setdefault(node.name, []).append((node.lineno, node.end_lineno or node.lineno))
    out: dict[tuple[int, int], dict[str, str]] = {}

    def visit(t: symtable.SymbolTable) -> None:
        for child in t.get_children():
            if child.get_type() == "function" and child.get_name() in spans:
                syms = child.get_symbols()
                local = [x.get_name() for x in syms if x.is_local() and not x.is_global() and not x.is_imported()
                         and x.get_name() not in keep and not x.get_name().startswith("__")]
                taken = {x.get_name() for x in syms} | set(dir(builtins))
                names = iter(n for n in _SHORT if n not in taken)
                span = spans[child.get_name()].pop(0)
                out[span] = {n: next(names) for n in sorted(local, key=len, reverse=True) if len(n) > 1}
            visit(child)

    visit(table)
    return out


def minify_source(src: str, rename: bool = True, keep: frozenset[str] = frozenset({"self", "dense"})) -> str:
    """Drop comments and blank lines, indent by one space per level and give function locals short names.

    The micro:bit compiles ``.py`` files on the device (1.9.2 cannot import ``.mpy``): every identifier
    becomes a heap-allocated qstr and every character costs lexer/parser heap, so shipped modules should
    be as small as possible. Assumes 4-space indentation; parameters named in ``keep`` are not renamed
    (they are passed by keyword).
    """
    renames = _local_renames(src, keep) if rename else {}
    lines = src.splitlines()
    edits: list[tuple[int, int, int, str]] = []  # row, start col, end col, replacement
    prev = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            edits.append((tok.start[0], tok.start[1], len(lines[tok.start[0] - 1]), ""))
        elif tok.type == tokenize.NAME and not (prev is not None and prev.string == "."):
            row = tok.start[0]
            spans = [sp for sp in renames if sp[0] <= row <= sp[1]]
            if spans:
                inner = max(spans, key=lambda sp: sp[0])
                new = renames[inner].get(tok.string)
                if new:
                    edits.append((row, tok.start[1], tok.end[1], new))
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            prev = tok
    for row, a, b, new in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = (line[:a] + new + line[b:]).rstrip() if new == "" else line[:a] + new + line[b:]
    out = []
    for line in lines:
        if line.strip():
            n = len(line) - len(line.lstrip(" "))
            out.append(" " * (n // 4) + line.lstrip(" "))
    return "\n".join(out) + "\n"


class QemuMicrobit:
    """A running emulated micro:bit. ``port`` is the pty of its UART (115200 baud)."""

    def __init__(self, hex_path: Path | None = None, start_timeout: float = 30.0) -> None:
        hex_path = Path(hex_path or DEFAULT_FIRMWARE)
        if shutil.which(QEMU) is None:
            raise EmulatorError(f"{QEMU} is not installed (Debian package qemu-system-arm)")
        if not hex_path.is_file():
            raise EmulatorError(f"firmware hex not found: {hex_path} (Debian package firmware-microbit-micropython)")
        cmd = [QEMU, "-M", "microbit", "-device", f"loader,file={hex_path}",
               "-nographic", "-serial", "pty", "-monitor", "none"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.log = bytearray()
        self.port = self._wait_for_pty(start_timeout)
        # Keep reading QEMU's output so its pipe never fills and blocks the emulator.
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _wait_for_pty(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        found: list[str] = []

        def scan() -> None:
            assert self.proc.stdout is not None
            for line in iter(self.proc.stdout.readline, b""):
                self.log += line
                m = _PTY_RE.search(line)
                if m:
                    found.append(m.group(1).decode())
                    return

        t = threading.Thread(target=scan, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.stop()
            raise EmulatorError(
                f"QEMU printed no pty path within {timeout:.0f} s; its output: {bytes(self.log).decode(errors='replace')!r}"
            )
        return found[0]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.log += line

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> QemuMicrobit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def microbit_session(script: str | None = None, timeout: float = 60.0) -> Iterator[tuple[QemuMicrobit, RawRepl]]:
    """Start an emulated micro:bit (optionally with ``script`` as main.py) and yield it with a raw REPL."""
    with tempfile.TemporaryDirectory() as tmp:
        hex_path = build_hex_with_script(script, Path(tmp) / "app.hex") if script else DEFAULT_FIRMWARE
        with QemuMicrobit(hex_path) as board:
            time.sleep(0.5)  # let the firmware boot before interrupting it
            repl = RawRepl(board.port, timeout=timeout)
            try:
                repl.enter_raw()
                yield board, repl
            finally:
                repl.close()
