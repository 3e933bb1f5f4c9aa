"""User-facing errors: one line saying what is wrong and how to fix it, and an exit code."""

from __future__ import annotations

EXIT_USAGE = 2  # bad input: unknown target, bad option value, missing/corrupt data
EXIT_BUDGET = 3  # the model does not fit the board
EXIT_VERIFY = 4  # an exported artifact failed verification
EXIT_CHANCE = 5  # the build finished but its model is at chance level (artifacts kept for inspection)
EXIT_INTERRUPT = 130  # Ctrl-C (128 + SIGINT); nothing was written


class ToolchainError(Exception):
    """An error the CLI reports as ``error: <message>`` with ``exit_code`` and no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DataError(ToolchainError):
    """Missing, truncated or corrupt dataset files."""


class BudgetError(ToolchainError):
    """The model does not fit the target board's RAM or flash."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BUDGET)
