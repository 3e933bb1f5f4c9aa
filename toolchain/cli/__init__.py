"""The ``toolchain`` command line: one module per command, each with ``add_parser(sub)`` (docs/architecture.md)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from toolchain import __version__
from toolchain.cli import build, emulate, flash, hil, report, serve, targets, train
from toolchain.cli.common import OneLineParser
from toolchain.contracts.errors import EXIT_INTERRUPT, ToolchainError

COMMANDS = (targets, build, report, train, flash, emulate, hil, serve)  # --help lists them in this order


def make_parser() -> OneLineParser:
    parser = OneLineParser(prog="toolchain", description="Federated pruning -> int8 TinyML models -> devices.")
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which options were given (build --config)
    try:
        return args.func(args)
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # the reader went away (`toolchain report --json | head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

