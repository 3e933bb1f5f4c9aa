"""A real mosquitto broker on a free loopback port, for tests. Import the fixtures into a test module:

    from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One mosquitto process; ``stop``/``start`` keep the port and the persistence file (a broker restart)."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: tuple[str, str, str] | None = None,  # (cafile, certfile, keyfile) for a TLS listener
        extra: list[str] | None = None,  # more mosquitto.conf lines (e.g. "require_certificate true")
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "set_tcp_nodelay true",  # the broker side of the Nagle + delayed-ACK stall (~40 ms per message)
            f"log_dest file {self.dir / 'mosquitto.log'}",
            "log_type all",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # as root, mosquitto would switch to 'mosquitto' and lose access to tmp_path
        if users:
            pw = self.dir / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            os.chmod(pw, 0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            (self.dir / "acl").write_text(acl)
            lines.append(f"acl_file {self.dir / 'acl'}")
        if tls:
            lines += [f"cafile {tls[0]}", f"certfile {tls[1]}", f"keyfile {tls[2]}"]
        lines += extra or []
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (mosquitto saves its persistence file) or SIGKILL (a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        p = self.dir / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator:
    """Call it with Broker options to get a started broker; all are stopped at teardown."""
    brokers: list[Broker] = []

    def make(**kw: object) -> Broker:
        b = Broker(tmp_path / f"broker{len(brokers)}", **kw)  # type: ignore[arg-type]
        brokers.append(b)
        b.start()
        return b

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def mosquitto(mosquitto_factory) -> Broker:  # noqa: ANN001 - fixture
    """An anonymous-access broker."""
    return mosquitto_factory()
