"""Two pseudo-terminals joined by a relay thread that can throttle to a baud rate and inject line faults.

Open ``a_path`` and ``b_path`` with pyserial (like two boards' serial ports wired together). Used by the
tests and benchmarks, and to put a faulty or slow "cable" between the host and an emulated board.
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
import tty
from dataclasses import dataclass, field


@dataclass
class LineFaults:
    """Per-chunk fault probabilities for bytes crossing the relay (seeded, so failures reproduce)."""

    corrupt: float = 0.0  # flip one bit of one byte
    drop: float = 0.0  # drop one byte
    garbage: float = 0.0  # insert 1..16 random bytes (zeros included)
    seed: int = 0
    injected: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, data: bytes) -> bytes:
        r = self._rng
        buf = bytearray(data)
        if buf and r.random() < self.corrupt:
            buf[r.randrange(len(buf))] ^= 1 << r.randrange(8)
            self.injected += 1
        if buf and r.random() < self.drop:
            del buf[r.randrange(len(buf))]
            self.injected += 1
        if r.random() < self.garbage:
            at = r.randrange(len(buf) + 1)
            buf[at:at] = bytes(r.randrange(256) for _ in range(r.randrange(1, 17)))
            self.injected += 1
        return bytes(buf)


class PtyRelay:
    """``a`` <-> ``b``; ``rate`` limits each direction to that many bytes/s (11520 for 115200 baud 8N1)."""

    def __init__(self, *, rate: float | None = None, faults_ab: LineFaults | None = None,
                 faults_ba: LineFaults | None = None, chunk: int = 64) -> None:
        self.rate, self.chunk = rate, chunk
        self._fds: list[int] = []
        self.a_path, ma = self._pty()
        self.b_path, mb = self._pty()
        self._stop = threading.Event()
        self.bytes_ab = 0
        self.bytes_ba = 0
        self._threads = [
            threading.Thread(target=self._pump, args=(ma, mb, faults_ab, "ab"), daemon=True),
            threading.Thread(target=self._pump, args=(mb, ma, faults_ba, "ba"), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pty(self) -> tuple[str, int]:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo or line editing even before pyserial opens it
        self._fds += [master, slave]  # keep the slave open: the master would see EOF when a client closes
        return os.ttyname(slave), master

    def _pump(self, src: int, dst: int, faults: LineFaults | None, name: str) -> None:
        # Read a little at a time so throttling spaces bytes out like a UART would.
        next_t = time.monotonic()
        while not self._stop.is_set():
            ready, _, _ = select.select([src], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(src, self.chunk)
            except OSError:
                return
            if faults is not None:
                data = faults(data)
            if self.rate:
                next_t = max(next_t, time.monotonic()) + len(data) / self.rate
                time.sleep(max(0.0, next_t - time.monotonic()))
            try:
                os.write(dst, data)
            except OSError:
                return
            if name == "ab":
                self.bytes_ab += len(data)
            else:
                self.bytes_ba += len(data)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> PtyRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
