"""What every command shares: one-line usage errors and defaults in --help."""

from __future__ import annotations

import argparse
import sys

from toolchain.contracts.errors import EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong + where to look), not argparse's usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        sys.exit(EXIT_USAGE)


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's default in --help, unless its help already states it or there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required
                or action.default is None or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()
