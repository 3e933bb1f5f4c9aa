"""MicroPython 1.29 (WebAssembly) as a REPL board on a pseudo-terminal (for flashing and HIL).

``start_wasm_board()`` starts Node.js running ``wasm_repl.mjs`` with the master side of a fresh pty as its
stdin/stdout and returns ``(slave path, process)``. The slave (``/dev/pts/N``) is opened like a board's port by
every serial tool: ``toolchain.deploy.repl.RawRepl``, ``mpremote connect /dev/pts/N`` (exec, run, fs ls/cp/cat/rm/mkdir,
sha256sum), microfs, pyserial, ``toolchain flash/hil --port``. MicroPython's own event-driven REPL answers
(friendly and raw REPL, Ctrl-C, soft reset with Ctrl-D keeping the file system like a board's flash); the heap
is bounded (``heap_bytes``) as on a board. Two emulator adaptations (both in ``wasm_repl.mjs``): raw-paste
mode is declined (this build's event-driven raw paste aborts at once), and file-system errno values are
mapped to a board's (Emscripten's ENOENT is 44, tools test 2).

(``toolchain/deploy/emulators/wasm_stream.py`` is a different board: a long-running app whose UART carries the binary
protocol, for the fleet tests.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tty
from pathlib import Path

from toolchain.deploy.emulators.wasm import PACKAGE, node_modules_dir

RUNNER = Path(__file__).with_name("wasm_repl.mjs")


class WasmBoardError(RuntimeError):
    """Node.js or the MicroPython WebAssembly package is missing, or the board did not start."""


def available() -> bool:
    return shutil.which("node") is not None and node_modules_dir() is not None


def start_wasm_board(heap_bytes: int = 256 * 1024, settle: float = 0.5) -> tuple[str, subprocess.Popen]:
    """Start a WebAssembly MicroPython REPL board; return (pty path, Node.js process). Stop: ``stop_wasm_board``."""
    nm = node_modules_dir()
    if nm is None or shutil.which("node") is None:
        raise WasmBoardError(f"MicroPython WebAssembly is not installed: run `npm ci` in the repository root ({PACKAGE})")
    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # no echo, no CR/LF translation: a serial line
        path = os.ttyname(slave)
        env = dict(os.environ, NODE_PATH=str(nm))
        # Node keeps the slave open too (inherited fd), so the master never sees a hang-up between clients.
        proc = subprocess.Popen(["node", str(RUNNER), str(int(heap_bytes))], stdin=master, stdout=master,
                                stderr=subprocess.DEVNULL, pass_fds=(slave,), cwd=nm.parent, env=env,
                                start_new_session=True)
    finally:
        os.close(master)
        os.close(slave)
    time.sleep(settle)
    if proc.poll() is not None:
        raise WasmBoardError(f"the WebAssembly board exited at start (code {proc.returncode})")
    return path, proc


def stop_wasm_board(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class WasmReplBoard:
    """Context manager around :func:`start_wasm_board`; ``port`` is the pty path, ``proc`` the Node process."""

    def __init__(self, heap_bytes: int = 256 * 1024) -> None:
        self.port, self.proc = start_wasm_board(heap_bytes)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_wasm_board(self.proc)

    def __enter__(self) -> WasmReplBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
