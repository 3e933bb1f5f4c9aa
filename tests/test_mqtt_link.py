"""MQTT transport against a real mosquitto on a loopback port (started per test by mosquitto_fixture)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401

from toolchain.contracts.wire.messages import ST_IDLE, ST_OFFLINE, ST_TRAINING
from toolchain.fleet import (
    Hello,
    LinkError,
    MqttConfig,
    MqttDevice,
    MqttHost,
    RoundResult,
    RoundStart,
    Status,
    TlsOptions,
    encode,
)

pytestmark = pytest.mark.timeout(120)  # a hung link or emulator fails the test instead of CI

REPO = Path(__file__).resolve().parents[1]


def hello(dev: str, session: int = 1) -> Hello:
    return Hello(dev, "esp32", "micropython 1.29", (0, 1, 0), 100_000, 1024, 3, session)


def cfg_for(broker, **kw) -> MqttConfig:  # noqa: ANN001
    return MqttConfig(port=broker.port, fleet="f1", keepalive=5, **kw)


def test_qos1_exchange_and_per_device_slots(mosquitto) -> None:  # noqa: F811
    cfg = cfg_for(mosquitto)
    host = MqttHost(cfg, keep_history=True)
    host.start()
    devs = [MqttDevice(cfg, d) for d in ("mb-1", "esp-2")]
    try:
        for i, d in enumerate(devs):
            d.start()
            d.send(hello(d.device_id, i + 1))
        assert host.wait_until(lambda s: all(s.get(d.device_id) and s[d.device_id].hello for d in devs), 5)
        assert host.wait_until(lambda s: all(s[d.device_id].online for d in devs), 5)
        for d in devs:
            host.send(d.device_id, RoundStart(7, 2, 1e-3, 0.01, round_seed=0xDEADBEEF))
        for d in devs:
            got = d.recv(5)
            assert isinstance(got, RoundStart) and got.round_seed == 0xDEADBEEF and got.round_id == 7
            d.send(RoundResult(7, (0.25, -0.5), 1.5, 32 + len(d.device_id)))
        results = {}
        while len(results) < 4:  # 2 HELLOs + 2 results
            item = host.recv(5)
            assert item is not None
            results[(item[0], type(item[1]).__name__)] = item[1]
        assert results[("esp-2", "RoundResult")].n_samples == 37
        assert results[("mb-1", "Hello")].device_id == "mb-1"
        assert set(host.slots) == {"mb-1", "esp-2"}
    finally:
        for d in devs:
            d.stop()
        host.stop()


def test_last_will_marks_a_killed_device_offline(mosquitto) -> None:  # noqa: F811
    cfg = cfg_for(mosquitto)
    host = MqttHost(cfg)
    host.start()
    code = (
        "import sys, time\n"
        "from toolchain.fleet import MqttConfig, MqttDevice\n"
        f"d = MqttDevice(MqttConfig(port={mosquitto.port}, fleet='f1', keepalive=5), 'doomed')\n"
        "d.start(); print('up', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        assert host.wait_until(lambda s: "doomed" in s and s["doomed"].online, 5)
        assert host.slots["doomed"].status == Status(ST_IDLE)
        proc.kill()  # no DISCONNECT packet: the broker publishes the will
        proc.wait()
        assert host.wait_until(lambda s: not s["doomed"].online, 10)
        assert host.slots["doomed"].status.state == ST_OFFLINE
    finally:
        proc.kill()
        host.stop()
    # The will is retained: a host that connects later learns the device is offline.
    late = MqttHost(cfg, client_id="late-host")
    late.start()
    try:
        assert late.wait_until(lambda s: "doomed" in s and s["doomed"].status is not None, 5)
        assert not late.slots["doomed"].online
    finally:
        late.stop()


def test_clean_stop_says_offline_and_status_is_retained(mosquitto) -> None:  # noqa: F811
    cfg = cfg_for(mosquitto)
    dev = MqttDevice(cfg, "dev-a")
    dev.start()
    dev.set_status(Status(ST_TRAINING, uptime_s=5, free_heap=9000, round_id=3, model_id=1))
    host = MqttHost(cfg)
    host.start()
    try:
        assert host.wait_until(lambda s: "dev-a" in s and s["dev-a"].status is not None, 5)
        assert host.slots["dev-a"].status.round_id == 3 and host.slots["dev-a"].online
        dev.stop()
        assert host.wait_until(lambda s: not s["dev-a"].online, 5)
    finally:
        host.stop()


def test_broker_restart_mid_exchange_loses_and_duplicates_nothing(mosquitto) -> None:  # noqa: F811
    cfg = cfg_for(mosquitto)
    host = MqttHost(cfg)
    host.start()
    dev = MqttDevice(cfg, "survivor")
    dev.start()
    n = 120
    received: list[int] = []
    done = threading.Event()

    def collect() -> None:
        while len(received) < n and not done.is_set():
            item = host.recv(0.2)
            if item is not None and isinstance(item[1], RoundResult):
                received.append(item[1].round_id)

    t = threading.Thread(target=collect)
    t.start()
    try:
        for i in range(n):
            dev.send(RoundResult(i, (float(i),), 0.5, 1))
            if i == n // 3:
                mosquitto.stop()  # broker goes away mid-exchange ...
            if i == n // 2:
                mosquitto.start()  # ... and comes back on the same port with its persisted sessions
            time.sleep(0.01)
        t.join(timeout=30)
        assert sorted(received) == list(range(n)), f"lost {set(range(n)) - set(received)}"
        assert len(received) == n  # no duplicates delivered to the application
        print("restart: host dropped", host.duplicates, "QoS 1 repeats")
        assert dev.wait_connected(5) and host.wait_connected(5)
        # and the link still works in both directions after the restart
        host.send("survivor", RoundStart(n, 1, 1e-3, 0.1, round_seed=1))
        assert isinstance(dev.recv(10), RoundStart)
    finally:
        done.set()
        t.join(timeout=5)
        dev.stop()
        host.stop()


ACL = """user host
topic readwrite tinyml/#
pattern write tinyml/+/%u/up
pattern write tinyml/+/%u/status
pattern read tinyml/+/%u/down
"""


def test_username_password_auth_and_acl(mosquitto_factory) -> None:  # noqa: F811
    broker = mosquitto_factory(users={"host": "h-secret", "mb-1": "d-secret", "mallory": "m-secret"}, acl=ACL)
    good = MqttConfig(port=broker.port, fleet="f1", username="host", password="h-secret")
    with pytest.raises(LinkError):
        MqttHost(MqttConfig(port=broker.port, fleet="f1", username="host", password="wrong"), client_id="x").start(3)
    with pytest.raises(LinkError):
        MqttHost(MqttConfig(port=broker.port, fleet="f1"), client_id="anon").start(3)
    host = MqttHost(good)
    host.start()
    dev = MqttDevice(MqttConfig(port=broker.port, fleet="f1", username="mb-1", password="d-secret"), "mb-1")
    dev.start()
    # mallory authenticates but may only publish under tinyml/+/mallory/...: the broker drops the forgery
    evil = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mallory")
    evil.username_pw_set("mallory", "m-secret")
    evil.connect("127.0.0.1", broker.port)
    evil.loop_start()
    try:
        evil.publish("tinyml/f1/mb-1/up", encode(hello("mb-1", 666)), qos=1).wait_for_publish(5)
        # ... and an impersonating HELLO on its own topic is rejected by the host
        evil.publish("tinyml/f1/mallory/up", encode(hello("mb-1", 667)), qos=1).wait_for_publish(5)
        dev.send(hello("mb-1", 1))
        assert host.wait_until(lambda s: "mb-1" in s and s["mb-1"].hello is not None, 5)
        assert host.wait_until(lambda s: "mallory" in s and s["mallory"].rejected == 1, 5)
        time.sleep(0.3)
        assert host.slots["mb-1"].hello.session == 1 and host.slots["mb-1"].received == 1
        assert host.slots["mallory"].hello is None and host.slots["mallory"].received == 0
    finally:
        evil.loop_stop()
        evil.disconnect()
        dev.stop()
        host.stop()


def test_malformed_payloads_are_counted_not_raised(mosquitto) -> None:  # noqa: F811
    cfg = cfg_for(mosquitto)
    host = MqttHost(cfg)
    host.start()
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw")
    raw.connect("127.0.0.1", mosquitto.port)
    raw.loop_start()
    try:
        for junk in (b"", b"\x01", b"\x02\x01", b"\x01\x11\x00", b"\xff" * 50):
            raw.publish("tinyml/f1/junk/up", junk, qos=1).wait_for_publish(5)
        assert host.wait_until(lambda s: "junk" in s and s["junk"].malformed == 5, 15)  # (loaded CI machine)
        assert host.recv(0.2) is None
    finally:
        raw.loop_stop()
        raw.disconnect()
        host.stop()


def _make_tls_files(d: Path) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
             ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        return b.sign(signer, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("test-ca", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")]), ca_key, True)
    srv_cert = cert("127.0.0.1", srv_key, ca_cert.subject, ca_key, False)
    pem = serialization.Encoding.PEM
    paths = (d / "ca.pem", d / "server.pem", d / "server.key")
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(srv_cert.public_bytes(pem))
    paths[2].write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tuple(str(p) for p in paths)  # type: ignore[return-value]


def test_tls_with_password(mosquitto_factory, tmp_path: Path) -> None:  # noqa: F811
    ca, crt, key = _make_tls_files(tmp_path)
    broker = mosquitto_factory(users={"host": "h", "dev-t": "d"}, tls=(ca, crt, key))
    tls = TlsOptions(ca_certs=ca)
    host = MqttHost(MqttConfig(port=broker.port, fleet="f1", username="host", password="h", tls=tls))
    host.start()
    dev = MqttDevice(MqttConfig(port=broker.port, fleet="f1", username="dev-t", password="d", tls=tls), "dev-t")
    dev.start()
    try:
        dev.send(hello("dev-t"))
        item = host.recv(5)
        assert item is not None and item[0] == "dev-t" and isinstance(item[1], Hello)
        # a client that does not trust this CA refuses the broker
        (tmp_path / "other").mkdir()
        other_ca, _, _ = _make_tls_files(tmp_path / "other")
        with pytest.raises(LinkError):
            MqttHost(MqttConfig(port=broker.port, fleet="f1", username="host", password="h",
                                tls=TlsOptions(ca_certs=other_ca)), client_id="distrust").start(1)
    finally:
        dev.stop()
        host.stop()
