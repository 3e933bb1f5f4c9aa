"""Fleet test/bench helpers: emulated boards running device_runtime/micropython/app.py, a fault-injecting bridge to
an existing serial port, the Jetson agent as a process. Every process started here is stopped by ``close()``."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolchain.deploy.emulators.microbit import QemuMicrobit
from toolchain.deploy.emulators.wasm_stream import WasmBoard, app_boot
from toolchain.deploy.repl import RawRepl
from toolchain.fleet.mqtt_link import MqttConfig

from .fleet_model import FleetModel, local_files
from .repl_helpers import soft_reset

REPO = Path(__file__).resolve().parents[2]
DEV = REPO / "device_runtime" / "micropython"
class PortBridge:
    """A fresh pty (``.port``) joined to an existing serial device (e.g. QEMU's pty) through fault filters."""

    def __init__(self, target: str, *, rate: float | None = None, faults_to_board: Callable[[bytes], bytes] | None = None,
                 faults_from_board: Callable[[bytes], bytes] | None = None) -> None:
        self.rate = rate
        self.faults_to_board, self.faults_from_board = faults_to_board, faults_from_board
        self._target = os.open(target, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self._target)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self.enabled = True
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._pump, args=(self._master, self._target, "to"), daemon=True),
                         threading.Thread(target=self._pump, args=(self._target, self._master, "from"), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, src: int, dst: int, way: str) -> None:
        t = time.monotonic()
        while not self._stop.is_set():
            ready, _, _ = select.select([src], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(src, 32)
            except OSError:
                return
            f = self.faults_to_board if way == "to" else self.faults_from_board
            if f is not None and self.enabled:
                data = f(data)
            if self.rate:
                t = max(t, time.monotonic()) + len(data) / self.rate
                time.sleep(max(0.0, t - time.monotonic()))
            try:
                os.write(dst, data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for fd in (self._target, self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


def microbit_files(m: FleetModel, idx: np.ndarray) -> dict[str, bytes]:
    """The micro:bit's flash: the bundle's minified zo.py + ft.py, spec.py, head.bin, its features shard + labels."""
    from toolchain.package.bundle import microbit_files as bundle_files

    files = bundle_files(m.head, m.config(batch_max=len(idx)))
    files["d.bin"] = np.ascontiguousarray(m.feats[idx], np.int8).tobytes()
    files["y.bin"] = bytes(int(v) for v in m.y[idx])
    return files


class MicrobitDevice:
    """QEMU micro:bit running ft.py + zo.py, on MQTT through the raw-REPL proxy (toolchain.fleet.repl_proxy)."""

    def __init__(self, m: FleetModel, device: str, idx: np.ndarray, cfg: MqttConfig, heartbeat_s: float = 30.0,
                 round_key: bytes | None = None) -> None:
        from toolchain.fleet.repl_proxy import repl_agent

        self.qemu = QemuMicrobit()
        self.repl: RawRepl | None = None
        self._stop = threading.Event()
        try:
            time.sleep(0.5)
            self.repl = RawRepl(self.qemu.port, timeout=60)
            self.repl.enter_raw()
            for name, data in microbit_files(m, idx).items():
                self.repl.put_file(name, data)
            soft_reset(self.repl)  # import on a fresh heap, as at boot
            self.agent = repl_agent(cfg, device, self.repl, [int(v) for v in m.y[idx]], m.head.cols,
                                    heartbeat_s=heartbeat_s, round_key=round_key)
        except Exception:
            self.close()
            raise
        self.free_heap = self.agent.tuner.free_heap
        self.thread = threading.Thread(target=self.agent.run, args=(self._stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        if getattr(self, "thread", None) is not None:
            self.thread.join(timeout=30)
        if self.repl is not None:
            self.repl.close()
        self.qemu.stop()


def wasm_board(m: FleetModel, device: str, idx: np.ndarray, key: bytes, heartbeat_ms: int = 30000,
               with_model: bool = False, extra: dict[str, bytes] | None = None, **kw: object) -> WasmBoard:
    """A WebAssembly board provisioned with config, head, data and key but no model (it arrives over the link),
    or with ``with_model`` the model as if flashed; ``extra`` files (name -> bytes) override."""
    lib = {f"/lib/{p.name}": p.read_bytes() for p in sorted(DEV.glob("*.py"))}
    files = {**lib, **{"/" + k: v for k, v in local_files(m, device, idx, key, with_model=with_model).items()},
             **{"/" + k: v for k, v in (extra or {}).items()}}
    return WasmBoard(files, app_boot(heartbeat_ms=heartbeat_ms), **kw)  # type: ignore[arg-type]


class JetsonProcess:
    """``python -m device_runtime.jetson.agent`` with a bundle (head ONNX + config) and its data shard."""

    def __init__(self, m: FleetModel, device: str, idx: np.ndarray, workdir: Path, broker: str, fleet: str,
                 heartbeat_s: float = 30.0, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, key: bytes | None = None) -> None:
        import json

        self.bundle = workdir / "bundle"
        self.local = workdir / "local"
        self.bundle.mkdir(parents=True, exist_ok=True)
        self.local.mkdir(parents=True, exist_ok=True)
        m.onnx(self.bundle / "model.onnx")
        (self.bundle / "config.json").write_text(json.dumps(m.jetson_spec()))
        feats = np.ascontiguousarray(m.feats[idx], np.int8)
        (self.local / "data.bin").write_bytes(feats.tobytes())
        (self.local / "local.json").write_text(json.dumps(
            {"device": device, "n": len(idx), "size": int(feats.shape[1]), "labels": [int(v) for v in m.y[idx]],
             "model_id": 1, **({"key": key.hex()} if key else {})}))
        self.args = [sys.executable, "-m", "device_runtime.jetson.agent", "--broker", broker, "--fleet", fleet,
                     "--device", device, "--bundle", str(self.bundle), "--local", str(self.local),
                     "--heartbeat", str(heartbeat_s), *(extra_args or [])]
        self.env = {**os.environ, **(env or {})}
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RogueDevice:
    """A device that plays the protocol (HELLO, STATUS at the fleet's model and version, acks every update) but
    answers each ROUND_START with a forged result: first with ``n`` = 2**30-1 (the weight a liar would claim),
    then with ``n = batch`` and ``[big] * k`` scalars. The attacker of docs/fleet.md "Only what was asked counts"
    once it has got itself sampled (no broker ACL, or a device's stolen credentials)."""

    def __init__(self, cfg: MqttConfig, device: str, *, big: float = 1e6, model_id: int = 1) -> None:
        from toolchain.fleet.mqtt_link import MqttDevice

        self.big, self.model_id, self.applied = big, model_id, 0
        self.asked: list[int] = []
        self.dev = MqttDevice(cfg, device)
        self.dev.start()
        self._stop = threading.Event()
        self._hello()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _hello(self) -> None:
        from toolchain.contracts.wire.messages import ST_IDLE, Hello, Status

        self.dev.send(Hello(self.dev.device_id, "esp32", "micropython 1.29", (0, 2, 0), 50000, 600, 0, 4242))
        self.dev.send(Status(ST_IDLE, 1, 50000, self.applied, self.model_id))

    def _run(self) -> None:
        from toolchain.contracts.wire.messages import T_ROUND_UPDATE, Ack, Ping, RoundResult, RoundStart, RoundUpdate

        while not self._stop.is_set():
            msg = self.dev.recv(0.2)
            if isinstance(msg, Ping):
                self._hello()
            elif isinstance(msg, RoundStart):
                self.asked.append(msg.round_id)
                self.dev.send(RoundResult(msg.round_id, (self.big,) * msg.k, 0.0, (1 << 30) - 1))
                self.dev.send(RoundResult(msg.round_id, (self.big,) * msg.k, 0.0, msg.batch))
            elif isinstance(msg, RoundUpdate):
                self.applied = max(self.applied, msg.round_id)
                self.dev.send(Ack(T_ROUND_UPDATE, msg.round_id))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.dev.stop()


def make_pki(d: Path, clients: list[str]) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and one client certificate + key per name (PEM files,
    ``cryptography``): ``ca``, ``server``, ``server_key``, ``<name>``, ``<name>_key``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet-test-ca")])

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, ca: bool, server: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        return b.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    out: dict[str, str] = {}

    def write(name: str, c: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        (d / f"{name}.pem").write_bytes(c.public_bytes(pem))
        out[name] = str(d / f"{name}.pem")
        if key is not None:
            p = d / f"{name}.key"
            p.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            os.chmod(p, 0o600)
            out[f"{name}_key"] = str(p)

    write("ca", cert("fleet-test-ca", ca_key, True, False), None)
    for name in ["server", *clients]:
        k = ec.generate_private_key(ec.SECP256R1())
        write(name, cert("127.0.0.1" if name == "server" else name, k, False, name == "server"), k)
    return out
