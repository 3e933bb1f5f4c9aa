"""``toolchain build``: train, prune, quantize, export, verify and package a model for one board."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

from toolchain.cli.common import DefaultsFormatter
from toolchain.contracts.errors import ToolchainError
from toolchain.learning import options
from toolchain.learning.pruning import ALGORITHMS
from toolchain.pipelines.build import BuildOptions, ChanceLevel, build, summary_lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="train, prune, quantize, export and verify a model for a board",
                       formatter_class=DefaultsFormatter,
                       epilog="exit codes: 0 built, 2 bad input, 3 does not fit the board, 4 verification failed, "
                              "5 built but at chance level (files kept), 130 interrupted")
    p.add_argument("--config", metavar="MANIFEST", default=None,
                   help="replay the build recorded in a manifest.json (or its folder); options given here "
                        "override it, --out defaults to build/<target> as usual")
    p.add_argument("--target", default=None,
                   help="board name or alias (`toolchain targets`); required unless --board-file is given")
    p.add_argument("--board-file", metavar="FILE", default=None,
                   help="your own board profile (TOML, the keys of toolchain/boards/builtin/*.toml; "
                        "docs/boards/README.md)")
    p.add_argument("--algo", default="gmp", help=f"pruning algorithm: {', '.join(ALGORITHMS)} (default: gmp)")
    p.add_argument("--out", default=None, help="output folder (default: build/<target>)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a non-empty folder that is not an earlier build")
    p.add_argument("--keep-fully-connected", action="store_true",
                   help="export dense layers as FULLY_CONNECTED instead of 1x1 CONV_2D")
    options.add_arguments(p, options.BUILD_DEFAULTS, "zoo model (default: the largest that fits the target)")
    p.set_defaults(func=cmd_build, parser=p)


# BuildOptions field -> the build option that sets it, where the names differ
_REPLAY_DEST = {"dense_as_conv": "keep_fully_connected", "algo_options": "algo_opt"}
_NOT_REPLAYED = ("out", "quiet", "force")  # where to write, how to show it, and permission are asked anew


def _given(argv: Sequence[str], parser: argparse.ArgumentParser) -> set[str]:
    """Destinations of the options present on the command line (``--opt value`` or ``--opt=value``)."""
    dests = set()
    for action in parser._actions:
        if any(tok == o or tok.startswith(o + "=") for o in action.option_strings for tok in argv):
            dests.add(action.dest)
    return dests


def _replay(opts, path: str, given: set[str]):
    """``opts`` with every option recorded in the manifest's ``config`` that the command line did not give."""
    p = Path(path)
    p = p / "manifest.json" if p.is_dir() else p
    try:
        config = json.loads(p.read_text())["config"]
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"cannot read --config {p} ({getattr(exc, 'strerror', None) or exc})") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ToolchainError(f"--config {p} is not a manifest.json written by `toolchain build` (no 'config')") from None
    if "alpha" in given or "partition" in given:
        given = given | {"alpha", "partition"}
    if "target" in given or "board_file" in given:  # a new board: do not carry the old one's file or name
        given = given | {"target", "board_file"}
    keep = {f.name: config[f.name] for f in fields(opts)
            if f.name in config and f.name not in _NOT_REPLAYED and _REPLAY_DEST.get(f.name, f.name) not in given}
    if keep.get("board_file") and not Path(keep["board_file"]).is_file():
        raise ToolchainError(f"the build in {p} used --board-file {keep['board_file']}, which is gone; pass "
                             "--board-file FILE or --target BOARD")
    return replace(opts, **keep)


def cmd_build(args: argparse.Namespace) -> int:
    opts = BuildOptions(**options.from_args(args), target=args.target, out=args.out,
                        dense_as_conv=not args.keep_fully_connected, force=args.force, board_file=args.board_file)
    if args.config:
        opts = _replay(opts, args.config, _given(args.argv, args.parser))
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        manifest = build(opts, log=log)
    except ChanceLevel as exc:  # outputs were written: show them, then fail with the one-line reason
        for line in summary_lines(exc.manifest):
            print(line)
        print(f"  output     {opts.out or f'build/{exc.manifest.target}'}/manifest.json (kept for inspection)")
        raise
    for line in summary_lines(manifest):
        print(line)
    print(f"  output     {opts.out or f'build/{manifest.target}'}/manifest.json")
    return 0
