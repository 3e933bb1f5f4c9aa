"""``toolchain targets``: the boards a build can target (shipped profiles and the user's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolchain.boards.profiles import BOARDS_DIR, all_profiles
from toolchain.cli.common import DefaultsFormatter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list the boards (toolchain/boards/builtin/*.toml and TOOLCHAIN_BOARDS folders)",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--json", action="store_true", help="every profile field, as JSON")
    p.set_defaults(func=cmd_targets)


def cmd_targets(args: argparse.Namespace) -> int:
    profiles = all_profiles()
    if args.json:
        print(json.dumps({n: p.as_dict() for n, p in profiles.items()}, indent=2))
        return 0
    print(f"{'target':<18} {'runtime':<12} {'RAM for model':>14} {'flash':>12}  {'transport':<9} description")
    for name, p in profiles.items():
        also = f" (also: {', '.join(p.aliases)})" if p.aliases else ""
        user = "" if Path(p.source).parent == BOARDS_DIR else f" [{p.source}]"
        print(f"{name:<18} {p.runtime:<12} {p.ram_bytes:>12} B {p.flash_bytes:>10} B  {p.default_transport:<9} "
              f"{p.description}{also}{user}")
    return 0
