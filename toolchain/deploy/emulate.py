"""``toolchain emulate microbit|wasm [--count N]``: start emulated boards and print their serial ports.

* ``microbit``: the micro:bit v1 MicroPython 1.9.2 firmware on QEMU (``qemu-system-arm -M microbit``), UART on a pty;
* ``wasm``: MicroPython 1.29 (WebAssembly, Node.js) with its REPL on a pty (``toolchain/deploy/emulators/wasm_repl.py``).

Every command that takes ``--port`` works with the printed paths (``toolchain flash/hil``, ``mpremote connect``,
``toolchain.deploy.repl.RawRepl``, pyserial). Stays in the foreground until Ctrl-C (or SIGTERM), then stops every emulator it
started. The boards' file systems live as long as the emulator does.
"""

from __future__ import annotations

from typing import Protocol

from toolchain.contracts.errors import ToolchainError
from toolchain.deploy.emulators.microbit import EmulatorError, QemuMicrobit
from toolchain.deploy.emulators.wasm_repl import WasmBoardError, WasmReplBoard


class _Board(Protocol):
    port: str

    def running(self) -> bool: ...

    def stop(self) -> None: ...


def start_boards(kind: str, count: int, heap_bytes: int = 256 * 1024) -> list[_Board]:
    """Start ``count`` emulated boards of ``kind``; on any failure stop those already started and raise."""
    if count < 1 or count > 16:
        raise ToolchainError(f"--count must be 1..16, got {count}")
    boards: list[_Board] = []
    try:
        for _ in range(count):
            if kind == "microbit":

                try:
                    boards.append(QemuMicrobit())
                except EmulatorError as exc:
                    raise ToolchainError(f"cannot start the QEMU micro:bit ({exc}); install the Debian packages "
                                         "qemu-system-arm and firmware-microbit-micropython") from None
            elif kind == "wasm":

                try:
                    boards.append(WasmReplBoard(heap_bytes))
                except WasmBoardError as exc:
                    raise ToolchainError(f"cannot start the WebAssembly board ({exc})") from None
            else:
                raise ToolchainError(f"unknown emulated board '{kind}'; use microbit or wasm")
    except BaseException:
        for b in boards:
            b.stop()
        raise
    return boards


def board_pid(board: _Board) -> int:
    return int(board.proc.pid)  # type: ignore[attr-defined]
