"""Authenticated transport (issue 16, item 1): a real mosquitto with a password file, the per-device ACL of
docs/fleet.md and a TLS listener that requires client certificates (made here with ``cryptography``).
``toolchain serve``, ``toolchain gateway`` (a WebAssembly board running app.py) and two Jetson agents run as
processes with ``--mqtt-user``, the password from a file or the environment (never argv) and ``--tls-*``; an
authenticated stranger forges results and ROUND_UPDATEs on the devices' topics meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.fleet_helpers import REPO, JetsonProcess, make_pki, wasm_board
from support.fleet_model import make_model
from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401

from toolchain.deploy.emulators import wasm
from toolchain.fleet import LinkError, MqttConfig, MqttHost, RoundResult, RoundUpdate, TlsOptions, encode

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")]
FLEET = "lab"
KEY = b"auth-test-hmac-key"
# docs/fleet.md "Authenticated transport": serve reads every device's up/status and writes their down topics; every
# other user is one device (user name = device id) and may write only its own up/status and read its own down.
ACL = f"""user serve
topic read tinyml/{FLEET}/+/up
topic read tinyml/{FLEET}/+/status
topic write tinyml/{FLEET}/+/down

pattern write tinyml/{FLEET}/%u/up
pattern write tinyml/{FLEET}/%u/status
pattern read tinyml/{FLEET}/%u/down
"""
USERS = {"serve": "s-pw", "jet-0": "j0-pw", "jet-1": "j1-pw", "wasm-1": "w1-pw", "mallory": "m-pw"}


def _tls_args(pki: dict[str, str], name: str) -> list[str]:
    return ["--tls-ca", pki["ca"], "--tls-cert", pki[name], "--tls-key", pki[f"{name}_key"]]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "toolchain.cli", *args]


def test_password_acl_tls_fleet(tmp_path: Path, mosquitto_factory) -> None:  # noqa: ANN001, F811
    pki = make_pki(tmp_path / "pki", list(USERS))
    broker = mosquitto_factory(users=USERS, acl=ACL, tls=(pki["ca"], pki["server"], pki["server_key"]),
                               extra=["require_certificate true"])
    addr = f"127.0.0.1:{broker.port}"
    pw = {u: tmp_path / f"{u}.pw" for u in USERS}
    for u, p in pw.items():
        p.write_text(USERS[u] + "\n")
        os.chmod(p, 0o600)
    m = make_model()
    idx = m.split(3)
    (tmp_path / "model.smf").write_bytes(m.smf)
    (tmp_path / "hmac.key").write_bytes(KEY)

    # the refusals, each one line: no user, wrong password, no client certificate, an untrusted broker
    def tls(name: str) -> TlsOptions:
        return TlsOptions(pki["ca"], pki[name], pki[f"{name}_key"])

    for cfg in (MqttConfig(port=broker.port, fleet=FLEET, tls=tls("serve")),
                MqttConfig(port=broker.port, fleet=FLEET, username="serve", password="wrong", tls=tls("serve")),
                MqttConfig(port=broker.port, fleet=FLEET, username="serve", password="s-pw",
                           tls=TlsOptions(pki["ca"]))):
        with pytest.raises(LinkError):
            MqttHost(cfg, client_id="refused").start(3)
    r = subprocess.run(_cli("serve", "--transport", "mqtt", "--broker", addr, "--fleet", FLEET, "--out",
                            str(tmp_path / "nope"), "--mqtt-user", "serve", "--mqtt-password-file", str(pw["jet-0"]),
                            *_tls_args(pki, "serve")), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not authorized" in r.stderr.lower(), r.stderr
    r = subprocess.run(_cli("serve", "--transport", "mqtt", "--broker", addr, "--fleet", FLEET, "--out",
                            str(tmp_path / "nope"), "--mqtt-user", "serve"), cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items() if k != "TINYML_MQTT_PASSWORD"})
    assert r.returncode == 2 and "needs a password" in r.stderr and r.stderr.count("\n") == 1, r.stderr

    jets = [JetsonProcess(m, "jet-0", idx[0], tmp_path / "j0", addr, FLEET,
                          extra_args=["--mqtt-user", "jet-0", *_tls_args(pki, "jet-0")],
                          env={"TINYML_MQTT_PASSWORD": USERS["jet-0"]}),  # the password from the environment
            JetsonProcess(m, "jet-1", idx[1], tmp_path / "j1", addr, FLEET,
                          extra_args=["--mqtt-user", "jet-1", "--mqtt-password-file", str(pw["jet-1"]),
                                      *_tls_args(pki, "jet-1")])]
    board = wasm_board(m, "wasm-1", idx[2], KEY)
    gw_log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - the child's
    gw = subprocess.Popen(_cli("gateway", "--port", board.port, "--broker", addr, "--fleet", FLEET, "--mqtt-user",
                               "wasm-1", "--mqtt-password-file", str(pw["wasm-1"]), *_tls_args(pki, "wasm-1")),
                          cwd=REPO, stdout=gw_log, stderr=subprocess.STDOUT)
    gw_log.close()
    mallory = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mallory")
    mallory.username_pw_set("mallory", USERS["mallory"])
    mallory.tls_set(ca_certs=pki["ca"], certfile=pki["mallory"], keyfile=pki["mallory_key"])
    stop = threading.Event()
    denied_before = broker.log().count("Denied PUBLISH")

    def forge() -> None:
        r = 1
        while not stop.wait(0.2):
            for t in (f"tinyml/{FLEET}/jet-0/up", f"tinyml/{FLEET}/evil/up", f"tinyml/{FLEET}/mallory/up"):
                mallory.publish(t, encode(RoundResult(r, (1e6,) * 8, 0.0, (1 << 30) - 1)), qos=1)
            mallory.publish(f"tinyml/{FLEET}/jet-0/down", encode(RoundUpdate(r, 1, 10.0, (1e6,) * 8)), qos=1)
            r = r % 3 + 1

    forger = threading.Thread(target=forge, daemon=True)
    try:
        mallory.connect("127.0.0.1", broker.port)
        mallory.loop_start()
        forger.start()
        serve = subprocess.run(
            _cli("serve", "--transport", "mqtt", "--broker", addr, "--fleet", FLEET, "--rounds", "3", "--k", "8",
                 "--lr", "1.0", "--batch", "32", "--min-devices", "3", "--deadline", "60", "--timeout", "200",
                 "--model", str(tmp_path / "model.smf"), "--hmac-key", str(tmp_path / "hmac.key"),
                 "--out", str(tmp_path / "run"), "--mqtt-user", "serve", "--mqtt-password-file", str(pw["serve"]),
                 *_tls_args(pki, "serve")),
            cwd=REPO, capture_output=True, text=True, timeout=260)
        assert serve.returncode == 0, serve.stderr[-3000:]
        out = json.loads(serve.stdout.strip().splitlines()[-1])
        assert out["done"] and out["rounds"] == 3 and out["unacked"] == [], out
        assert out["loss"][-1] < out["loss"][0] and max(out["loss"]) < 2 * out["loss"][0], out
        rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
        assert all(sorted(r["devices"]) == ["jet-0", "jet-1", "wasm-1"] for r in rounds)
        # the broker dropped the forgeries on other devices' topics; only mallory's own topic reached serve,
        # where its results were rejected (not asked)
        rejected = [ln for ln in serve.stderr.splitlines() if "rejected" in ln]
        assert rejected and all(ln.startswith("[coordinator] mallory:") for ln in rejected), rejected
        assert broker.log().count("Denied PUBLISH") > denied_before
        for p in (j.proc for j in jets):
            assert p is not None and p.poll() is None
            cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes()
            assert all(v.encode() not in cmdline for v in USERS.values())  # no password on any command line
    finally:
        stop.set()
        forger.join(5)
        mallory.loop_stop()
        mallory.disconnect()
        gw.terminate()
        try:
            gw.wait(15)
        except subprocess.TimeoutExpired:
            gw.kill()
        for j in jets:
            j.close()
        board.close()
