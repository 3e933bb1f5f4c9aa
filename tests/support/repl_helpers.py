"""Raw-REPL helpers for tests that drive emulated MicroPython boards directly."""

from __future__ import annotations

import time

from toolchain.deploy.repl import RawRepl


def soft_reset(repl: RawRepl, timeout: float = 10.0) -> None:
    """Ctrl-D at the raw REPL's empty prompt: soft reboot (fresh heap, files kept, main.py not run), back at the
    raw prompt. Raises TimeoutError when the prompt does not come back within ``timeout`` seconds."""
    repl.serial.write(b"\x04")
    got, deadline = b"", time.monotonic() + timeout
    while not got.endswith(b"raw REPL; CTRL-B to exit\r\n>"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no raw REPL prompt after soft reset: {got[-200:]!r}")
        got += repl.serial.read(max(1, repl.serial.in_waiting))
