"""``toolchain emulate microbit|wasm [--count N]``: start emulated boards and print their serial ports.

* ``microbit``: the micro:bit v1 MicroPython 1.9.2 firmware on QEMU (``qemu-system-arm -M microbit``), UART on a pty;
* ``wasm``: MicroPython 1.29 (WebAssembly, Node.js) with its REPL on a pty (``hw/emulators/wasm_repl.py``).

Every command that takes ``--port`` works with the printed paths (``toolchain flash/hil``, ``mpremote connect``,
``hw.repl.RawRepl``, pyserial). Stays in the foreground until Ctrl-C (or SIGTERM), then stops every emulator it
started. The boards' file systems live as long as the emulator does.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Protocol

from toolchain.errors import ToolchainError


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
                from hw.emulators.microbit import EmulatorError, QemuMicrobit

                try:
                    boards.append(QemuMicrobit())
                except EmulatorError as exc:
                    raise ToolchainError(f"cannot start the QEMU micro:bit ({exc}); install the Debian packages "
                                         "qemu-system-arm and firmware-microbit-micropython") from None
            elif kind == "wasm":
                from hw.emulators.wasm_repl import WasmBoardError, WasmReplBoard

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


def _pid(board: _Board) -> int:
    return int(board.proc.pid)  # type: ignore[attr-defined]


def cmd_emulate(args: argparse.Namespace) -> int:
    boards = start_boards(args.board, args.count, args.heap)

    def _term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        time.sleep(1.0)  # let the firmware boot before anyone talks to it
        for i, b in enumerate(boards, 1):
            print(f"{args.board}-{i} {b.port} pid {_pid(b)}", flush=True)
        print(f"{len(boards)} emulated {args.board} board(s) running; use the ports above with --port; Ctrl-C stops "
              "them", file=sys.stderr, flush=True)
        while True:
            dead = [b for b in boards if not b.running()]
            if dead:
                raise ToolchainError(f"emulated board on {dead[0].port} exited; restart `toolchain emulate`")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"stopping {len(boards)} emulated board(s)", file=sys.stderr, flush=True)
        return 0
    finally:
        for b in boards:
            b.stop()
        signal.signal(signal.SIGTERM, old)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("emulate", help="start emulated boards (QEMU micro:bit, MicroPython WebAssembly) on ptys")
    p.add_argument("board", choices=["microbit", "wasm"], help="microbit (QEMU, MicroPython 1.9.2) or wasm (1.29)")
    p.add_argument("--count", type=int, default=1, help="number of boards (default 1)")
    p.add_argument("--heap", type=int, default=256 * 1024, help="wasm: heap bytes (default 262144)")
    p.set_defaults(func=cmd_emulate)
