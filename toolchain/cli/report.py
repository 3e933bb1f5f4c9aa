"""``toolchain report``: re-render a build's report.md and plots from its manifest.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolchain.cli.common import DefaultsFormatter
from toolchain.contracts.errors import ToolchainError
from toolchain.pipelines.report import load_build, summary_json, write_report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="re-render a build's report.md and plots from its manifest.json",
                       formatter_class=DefaultsFormatter)
    p.add_argument("dir", metavar="DIR", help="a `toolchain build` output folder")
    p.add_argument("--json", action="store_true", help="print the report's facts as JSON instead of writing files")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    m, rounds = load_build(folder)
    if args.json:
        print(json.dumps(summary_json(m, rounds), indent=1))
        return 0
    try:
        write_report(folder, m, rounds)
    except OSError as exc:
        raise ToolchainError(f"cannot write the report into {folder} ({exc.strerror or exc})") from None
    print(f"{folder / 'report.md'}")
    return 0
