"""``toolchain hil --port P``: run the conformance suite (toolchain/deploy/hil/suite.py) against a flashed board."""

from __future__ import annotations

import argparse
import json
import sys

from toolchain.contracts.errors import EXIT_VERIFY, ToolchainError
from toolchain.deploy.hil import CHECKS
from toolchain.deploy.hil.suite import run_suite


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hil", help="conformance suite against a flashed board (docs/hil.md)")
    p.add_argument("--port", required=True, help="serial port of the board (`toolchain emulate` prints emulated ones)")
    p.add_argument("--target", help="board name; default: the build's target")
    p.add_argument("--build", metavar="DIR", help="build folder that was flashed (default: build/<target>)")
    p.add_argument("--check", action="append", choices=CHECKS, help="run only this check (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=cmd_hil)


def cmd_hil(args: argparse.Namespace) -> int:
    results = run_suite(args.port, args.target, args.build, args.check, log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)
    failed = [r for r in results if r.status == "fail"]
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped", file=sys.stderr)
    if failed:
        raise ToolchainError(f"{len(failed)} conformance check(s) failed: {', '.join(r.name for r in failed)} "
                             f"({failed[0].detail[:120]}); see docs/hil.md", EXIT_VERIFY)
    return 0
