"""Helpers for tests that drive the CLI in a subprocess."""

from __future__ import annotations

import signal


def ctrl_c_as_in_a_terminal() -> None:
    """``preexec_fn`` for a CLI the test stops with SIGINT: a shell starts background jobs (``make test &``,
    ``nohup ... &``) with SIGINT ignored and children inherit that, so Ctrl-C would never reach the command
    (measured: both Ctrl-C tests hung in a backgrounded fresh-clone run). Give it the terminal's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
