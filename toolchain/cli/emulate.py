"""``toolchain emulate``: emulated boards on ptys until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from toolchain.contracts.errors import ToolchainError
from toolchain.deploy.emulate import board_pid, start_boards


def cmd_emulate(args: argparse.Namespace) -> int:
    boards = start_boards(args.board, args.count, args.heap)

    def _term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        time.sleep(1.0)  # let the firmware boot before anyone talks to it
        for i, b in enumerate(boards, 1):
            print(f"{args.board}-{i} {b.port} pid {board_pid(b)}", flush=True)
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
