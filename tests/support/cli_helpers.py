"""Running the ``toolchain`` CLI in-process from tests, and checking its one-line errors."""

from __future__ import annotations

import pytest

from toolchain.cli import main


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``toolchain ARGS``."""
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str) -> str:
    """The single ``error:`` line of ``err``; fails if there are more, none, or a traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
