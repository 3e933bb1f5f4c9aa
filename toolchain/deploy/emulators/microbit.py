"""The micro:bit v1 (nRF51822, MicroPython 1.9.2) emulated by QEMU, with its UART on a pty.

Two separate steps, so that a CLI can start the emulator and print the port for other tools:

* :class:`QemuMicrobit` starts ``qemu-system-arm -M microbit`` and exposes the pty path (``.port``);
* :class:`toolchain.deploy.repl.RawRepl` connects to any port and runs code / copies files.

:func:`microbit_session` does both for tests.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from toolchain.deploy.repl import RawRepl
from toolchain.package.microbit import DEFAULT_FIRMWARE, build_hex_with_script

QEMU = "qemu-system-arm"
_PTY_RE = re.compile(rb"char device redirected to (/dev/pts/\d+)")


class EmulatorError(RuntimeError):
    """QEMU could not be started or did not expose the board's serial port."""


def available(firmware: Path = DEFAULT_FIRMWARE) -> bool:
    return shutil.which(QEMU) is not None and Path(firmware).is_file()


class QemuMicrobit:
    """A running emulated micro:bit. ``port`` is the pty of its UART (115200 baud)."""

    def __init__(self, hex_path: Path | None = None, start_timeout: float = 30.0) -> None:
        hex_path = Path(hex_path or DEFAULT_FIRMWARE)
        if shutil.which(QEMU) is None:
            raise EmulatorError(f"{QEMU} is not installed (Debian package qemu-system-arm)")
        if not hex_path.is_file():
            raise EmulatorError(f"firmware hex not found: {hex_path} (Debian package firmware-microbit-micropython)")
        cmd = [QEMU, "-M", "microbit", "-device", f"loader,file={hex_path}",
               "-nographic", "-serial", "pty", "-monitor", "none"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.log = bytearray()
        self.port = self._wait_for_pty(start_timeout)
        # Keep reading QEMU's output so its pipe never fills and blocks the emulator.
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _wait_for_pty(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        found: list[str] = []

        def scan() -> None:
            assert self.proc.stdout is not None
            for line in iter(self.proc.stdout.readline, b""):
                self.log += line
                m = _PTY_RE.search(line)
                if m:
                    found.append(m.group(1).decode())
                    return

        t = threading.Thread(target=scan, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.stop()
            raise EmulatorError(
                f"QEMU printed no pty path within {timeout:.0f} s; its output: {bytes(self.log).decode(errors='replace')!r}"
            )
        return found[0]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.log += line

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> QemuMicrobit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def microbit_session(script: str | None = None, timeout: float = 60.0, *, hex_path: Path | None = None,
                     files: dict[str, bytes] | None = None) -> Iterator[tuple[QemuMicrobit, RawRepl]]:
    """Start an emulated micro:bit and yield it with a raw REPL.

    It runs ``script`` as main.py, or the built ``hex_path`` (a bundle's ``microbit.hex``), or the bare firmware.
    ``files`` (name -> bytes) are copied onto it first, then it is soft-rebooted so that its main.py runs with
    them (:class:`EmulatorError` if the boot raised); the emulated UART drops a byte now and then (no flow
    control), so each copy is verified and retried."""
    with tempfile.TemporaryDirectory() as tmp:
        if hex_path is None:
            hex_path = build_hex_with_script(script, Path(tmp) / "app.hex") if script else DEFAULT_FIRMWARE
        with QemuMicrobit(hex_path) as board:
            time.sleep(0.5)  # let the firmware boot before interrupting it
            repl = RawRepl(board.port, timeout=timeout)
            try:
                repl.enter_raw()
                if files:
                    for name, data in files.items():
                        repl.put_file(name, data, attempts=12)
                    boot = repl.reboot_to_main()
                    if "Traceback" in boot:
                        raise EmulatorError(f"main.py raised at boot: {boot.strip()[-300:]}")
                yield board, repl
            finally:
                repl.close()
