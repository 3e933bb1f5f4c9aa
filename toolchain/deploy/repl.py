"""A MicroPython raw-REPL client over a serial port (a real board or an emulator's pty).

Protocol (MicroPython >= 1.9): Ctrl-C interrupts, Ctrl-A enters the raw REPL, which answers
``raw REPL; CTRL-B to exit\\r\\n>``. Code is sent followed by Ctrl-D; the board answers
``OK<stdout>\\x04<stderr>\\x04>``. A non-empty stderr part is a Python exception.
"""

from __future__ import annotations

import time

import serial

CTRL_A, CTRL_B, CTRL_C, CTRL_D = b"\x01", b"\x02", b"\x03", b"\x04"
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n>"


class ReplError(RuntimeError):
    """The board did not answer the raw-REPL protocol as expected (no board, wrong port, timeout)."""


class DeviceError(ReplError):
    """Code run on the board raised; ``traceback`` holds MicroPython's error text."""

    def __init__(self, traceback: str, stdout: str = "") -> None:
        super().__init__(f"the device raised:\n{traceback.strip()}")
        self.traceback = traceback
        self.stdout = stdout


class RawRepl:
    """Raw-REPL session on ``port``. Use as a context manager or call :meth:`close`."""

    def __init__(self, port: str, baudrate: int = 115200, timeout: float = 10.0, chunk: int = 24) -> None:
        self.timeout = timeout
        # Small write chunks with a pause: the raw REPL of 1.9.2 has no flow control and the micro:bit's
        # UART ring buffer drops bytes when flooded (measured on QEMU: 64 B/10 ms lost bytes often, 32 B/10 ms
        # rarely); put_file verifies and retries.
        self.chunk = chunk
        self.chunk_delay = 0.01
        self.ok_timeout = 20.0
        try:
            self.serial = serial.Serial(port, baudrate=baudrate, timeout=0.05, write_timeout=timeout)
        except serial.SerialException as exc:
            raise ReplError(f"cannot open serial port {port}: {exc}") from exc
        self.in_raw = False
        self._pending = bytearray()

    def __enter__(self) -> RawRepl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.serial.is_open:
            if self.in_raw:
                try:
                    self.serial.write(b"\r" + CTRL_B)  # back to the friendly REPL
                    self.serial.flush()
                except (serial.SerialException, OSError):
                    pass
            self.serial.close()
        self.in_raw = False

    def _read_until(self, marker: bytes, timeout: float, what: str) -> bytes:
        """Return bytes up to and including ``marker``; bytes after it stay pending for the next read."""
        deadline = time.monotonic() + timeout
        while True:
            i = self._pending.find(marker)
            if i >= 0:
                out = bytes(self._pending[: i + len(marker)])
                del self._pending[: i + len(marker)]
                return out
            if time.monotonic() > deadline:
                tail = bytes(self._pending[-200:])
                raise ReplError(f"timed out after {timeout:.0f} s waiting for {what}; last bytes received: {tail!r}")
            self._pending += self.serial.read(max(1, self.serial.in_waiting))

    def _drain(self, quiet: float = 0.2) -> bytes:
        """Read until the port stays silent for ``quiet`` seconds."""
        buf = self._pending
        self._pending = bytearray()
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            data = self.serial.read(max(1, self.serial.in_waiting))
            if data:
                buf += data
                last = time.monotonic()
        return bytes(buf)

    def _write(self, data: bytes) -> None:
        for i in range(0, len(data), self.chunk):
            self.serial.write(data[i : i + self.chunk])
            self.serial.flush()
            if len(data) > self.chunk:
                time.sleep(self.chunk_delay)

    def enter_raw(self, attempts: int = 5) -> None:
        """Interrupt whatever runs and enter the raw REPL."""
        for _ in range(attempts):
            self.serial.write(b"\r" + CTRL_C + CTRL_C)
            self.serial.flush()
            self._drain(0.3)
            self.serial.write(b"\r" + CTRL_A)
            self.serial.flush()
            try:
                self._read_until(RAW_BANNER, 3.0, "the raw REPL banner")
            except ReplError:
                continue
            self.in_raw = True
            return
        raise ReplError(f"no raw REPL on {self.serial.port} after {attempts} attempts (is a MicroPython board there?)")

    def soft_reset(self, settle: float = 1.0) -> None:
        """Soft-reset the board (fresh heap; files stay) and re-enter the raw REPL (ReplError when it does not
        come back)."""
        if not self.in_raw:
            self.enter_raw()
        self.serial.write(CTRL_D)  # Ctrl-D on an empty raw-REPL line: soft reset
        self.serial.flush()
        time.sleep(settle)
        self._drain(0.3)
        self.in_raw = False
        self.enter_raw()

    def reboot_to_main(self, timeout: float = 30.0) -> str:
        """Soft-reboot from the friendly REPL, so that ``main.py`` runs (it does not after a raw-REPL reset),
        wait for its prompt, and re-enter the raw REPL; returns what the boot printed."""
        self.serial.write(b"\r" + CTRL_B)
        self.serial.flush()
        time.sleep(0.3)
        self._pending.clear()
        self.serial.reset_input_buffer()
        self.serial.write(CTRL_D)
        self.serial.flush()
        got, deadline = b"", time.monotonic() + timeout
        while not got.endswith(b">>> "):
            if time.monotonic() > deadline:
                raise ReplError(f"no prompt after the soft reboot: {got[-300:]!r}")
            got += self.serial.read(max(1, self.serial.in_waiting))
        self.in_raw = False
        self.enter_raw()
        return got.decode(errors="replace")

    def exec_raw(self, code: str, timeout: float | None = None) -> tuple[str, str]:
        """Run ``code``; return (stdout, stderr) without raising on a device exception."""
        if not self.in_raw:
            self.enter_raw()
        timeout = self.timeout if timeout is None else timeout
        self._write(code.encode())
        self.serial.write(CTRL_D)
        self.serial.flush()
        # The board answers OK as soon as the Ctrl-D arrives, before it compiles, so this wait does not grow with
        # the code's run time. No OK means a lost byte (the Ctrl-D itself, or the board still waits for code):
        # clear its line and re-enter the raw REPL, so the next command starts clean instead of being appended.
        try:
            ok = self._read_until(b"OK", min(timeout, self.ok_timeout), "OK after sending code")
        except ReplError:
            try:
                self.enter_raw()
            except ReplError:
                pass
            raise
        if not ok.endswith(b"OK") or len(ok) > 2 and b"raw REPL" in ok:
            raise ReplError(f"unexpected raw-REPL answer {ok!r}")
        out = self._read_until(CTRL_D, timeout, "the end of the program's output")[:-1]
        err = self._read_until(CTRL_D, timeout, "the end of the error output")[:-1]
        self._read_until(b">", timeout, "the raw-REPL prompt")
        return out.decode(errors="replace").replace("\r\n", "\n"), err.decode(errors="replace").replace("\r\n", "\n")

    def exec(self, code: str, timeout: float | None = None, resend: int = 2) -> str:
        """Run ``code`` and return what it printed; raise :class:`DeviceError` if it raised.

        A SyntaxError means a byte was lost on the way (the micro:bit's UART has no flow control; measured under
        load in QEMU) and nothing ran, so the code is sent again, up to ``resend`` times."""
        for i in range(resend + 1):
            out, err = self.exec_raw(code, timeout)
            if not err:
                return out
            if "SyntaxError" not in err or i == resend:
                raise DeviceError(err, out)
        raise AssertionError("unreachable")

    def put_file(self, name: str, data: bytes, chunk: int = 96, attempts: int = 3) -> None:
        """Write ``data`` to the board's file system as ``name``, in chunks (the board's heap is small).

        The copy is verified with a length + checksum computed on the board and retried if it differs
        (a UART without flow control can drop a byte now and then).
        """
        s = 0
        for c in data:
            s = (s * 31 + c) % 65521
        want = [str(len(data)), str(s)]
        got: list[str] = []
        tried: list[str] = []  # each attempt's outcome, for the error
        for _ in range(attempts):
            # a byte lost on the way turns a command into a SyntaxError or into other valid code (an
            # AttributeError), or swallows its Ctrl-D (exec_raw re-enters the raw REPL): write it all again
            try:
                self.exec(f"f=open({name!r},'wb')")
                try:
                    for i in range(0, len(data), chunk):
                        self.exec(f"f.write({data[i : i + chunk]!r})")
                finally:
                    self.exec("f.close()\ndel f")
                got = self.exec(
                    f"f=open({name!r},'rb')\nn=0\ns=0\nwhile 1:\n b=f.read(64)\n if not b:break\n n+=len(b)\n"
                    " for c in b:s=(s*31+c)%65521\nf.close()\nprint(n,s)\ndel f,n,s,b"
                ).split()
            except DeviceError as exc:
                got = [f"error: {exc.traceback.strip().splitlines()[-1]}"]
                tried.append(got[0])
                continue
            except ReplError as exc:
                got = [f"error: {str(exc).splitlines()[0][:120]}"]
                tried.append(got[0])
                continue
            if got == want:
                return
            tried.append(" ".join(got))
        raise ReplError(f"copy of {name} is corrupt after {attempts} attempts: board has (size, checksum) {got}, "
                        f"expected {want} (attempts: {'; '.join(tried)})")
