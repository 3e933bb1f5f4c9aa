"""A MicroPython 1.29 (WebAssembly) board running a long-lived program whose UART is a pseudo-terminal.

``WasmBoard(files, boot)`` starts ``node toolchain/deploy/emulators/wasm_stream.mjs``: the Node process's stdin/stdout carry
the board's serial bytes, and a relay thread joins them to a fresh pty (``.port``), so host tools open the board
like any serial port (pyserial). Optional :class:`toolchain.fleet.pty_relay.LineFaults` corrupt/drop bytes in
either direction and ``rate`` throttles to a baud rate (11520 B/s = 115200 baud 8N1). ``restart()`` kills the
Node process (a power cut: RAM and the in-memory file system are lost) and boots it again on the same pty.
``net=True`` gives the board a network: ``socket``/``usocket`` (``wasm_socket.py``) on real TCP sockets that
Node.js opens (``wasm_net.mjs``), so network clients such as ``umqtt.simple`` run unmodified on the board.
"""

from __future__ import annotations

import base64
import json
import os
import random
import select
import shutil
import subprocess
import tempfile
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

from toolchain.deploy.emulators.wasm import node_modules_dir

RUNNER = Path(__file__).with_name("wasm_stream.mjs")


class WasmBoard:
    def __init__(self, files: dict[str, bytes], boot: str, *, heap_bytes: int = 256 * 1024, rate: float | None = None,
                 faults_in: Callable[[bytes], bytes] | None = None, faults_out: Callable[[bytes], bytes] | None = None,
                 tick_ms: int = 10, net: bool = False) -> None:
        nm = node_modules_dir()
        if nm is None or shutil.which("node") is None:
            raise RuntimeError("MicroPython WebAssembly is not installed: run `npm ci` in the repository root")
        self._nm = nm
        self._tmp = tempfile.TemporaryDirectory(prefix="wasmboard-")
        self.job = Path(self._tmp.name) / "job.json"
        if net:  # the board's network: socket/usocket on real TCP from Node.js (wasm_net.mjs)
            shim = Path(__file__).with_name("wasm_socket.py").read_bytes()
            files = {"/lib/socket.py": shim, "/lib/usocket.py": shim, **files}
        self._job = {"heap_bytes": int(heap_bytes), "tick_ms": tick_ms, "boot": boot, "net": bool(net),
                     "files": {p: base64.b64encode(b).decode() for p, b in files.items()}}
        self.rate, self.faults_in, self.faults_out = rate, faults_in, faults_out
        self._master, slave = os.openpty()
        tty.setraw(slave)
        self._slave = slave  # kept open so the master never sees EOF when a client closes the port
        self.port = os.ttyname(slave)
        self.log = bytearray()
        self.boots = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self._start()
        self._to_board = threading.Thread(target=self._pump_in, daemon=True)
        self._to_board.start()

    # -- process ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        # fresh random numbers per boot (the WebAssembly port's PRNG starts the same way every time)
        rnd = f"_R0 = {random.randrange(65536)}\n_R1 = {random.randrange(65536)}\n"
        self.job.write_text(json.dumps({**self._job, "boot": rnd + self._job["boot"]}))
        env = dict(os.environ, NODE_PATH=str(self._nm))
        proc = subprocess.Popen(["node", str(RUNNER), str(self.job)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=self._nm.parent, bufsize=0)
        with self._lock:
            self.proc = proc
            self.boots += 1
        threading.Thread(target=self._pump_out, args=(proc,), daemon=True).start()
        threading.Thread(target=self._pump_log, args=(proc,), daemon=True).start()

    def kill(self) -> None:
        """Power off: the Node process dies; bytes sent meanwhile are lost."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self._start()

    def running(self) -> bool:
        with self._lock:
            return self.proc is not None and self.proc.poll() is None

    # -- byte pumps -----------------------------------------------------------------------------------------
    def _throttle(self, n: int, state: list[float]) -> None:
        if self.rate:
            state[0] = max(state[0], time.monotonic()) + n / self.rate
            time.sleep(max(0.0, state[0] - time.monotonic()))

    def _pump_out(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        t = [time.monotonic()]
        while True:
            data = proc.stdout.read1(64) if hasattr(proc.stdout, "read1") else os.read(proc.stdout.fileno(), 64)
            if not data:
                return
            if self.faults_out is not None:
                data = self.faults_out(data)
            self._throttle(len(data), t)
            try:
                os.write(self._master, data)
            except OSError:
                return

    def _pump_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, b""):
            self.log += line

    def _pump_in(self) -> None:
        t = [time.monotonic()]
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self._master, 64)
            except OSError:
                return
            if self.faults_in is not None:
                data = self.faults_in(data)
            self._throttle(len(data), t)
            with self._lock:
                proc = self.proc
            if proc is None or proc.stdin is None:
                continue  # powered off: the bytes are lost
            try:
                proc.stdin.write(data)
            except (BrokenPipeError, OSError, ValueError):
                pass

    def close(self) -> None:
        self._stop.set()
        self.kill()
        self._to_board.join(timeout=2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self._tmp.cleanup()

    def __enter__(self) -> WasmBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def app_boot(board: str = "wasm", firmware: str = "micropython 1.29 wasm", root: str = "/",
             heartbeat_ms: int = 30000) -> str:
    """Boot code that starts ``device_runtime/micropython/app.py`` through ``app_boot.start`` on a WasmBoard."""
    return (
        "import sys\nsys.path.append('/lib')\nimport proto\nimport gc\n"
        "try:\n    import ubinascii as binascii\nexcept ImportError:\n    import binascii\n"
        "def _out(b):\n    print('@' + binascii.hexlify(b).decode())\n"
        "import app_boot\n"
        f"_a = app_boot.start(_out, {board!r}, {firmware!r}, {root!r}, gc.mem_free, _R0, _R1, 0, {heartbeat_ms})\n"
        "def _feed(h):\n    _a.feed(binascii.unhexlify(h))\n"
        "def _tick():\n    _a.tick()\n"
    )


def mqtt_boot(board: str = "wasm", firmware: str = "micropython 1.29 wasm", root: str = "/",
              heartbeat_ms: int = 30000) -> str:
    """Boot code for a ``WasmBoard(net=True)``: ``app.py`` on MQTT through ``link_mqtt.start`` (umqtt.simple);
    ``mqtt.json`` + ``local.json`` under ``root`` say which broker, fleet and device id. The UART is unused."""
    return (
        "import sys\nsys.path.append('/lib')\nimport proto\nimport gc\nimport link_mqtt\n"
        f"_l = link_mqtt.start({board!r}, {firmware!r}, {root!r}, gc.mem_free, _R0, {heartbeat_ms})\n"
        "def _feed(h):\n    pass\n"
        "def _tick():\n    _l.poll()\n"
    )
