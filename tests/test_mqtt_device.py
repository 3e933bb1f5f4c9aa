"""device_runtime/micropython/link_mqtt.py: the device app on MQTT through micropython-lib's umqtt.simple
(unmodified, fetched by scripts/setup_system.sh), on the MicroPython 1.29 WebAssembly board whose network
interface is real TCP from Node.js (WasmBoard(net=True): toolchain/deploy/emulators/wasm_net.mjs + wasm_socket.py), against a
real mosquitto on loopback and the host's coordinator over MqttFleet (toolchain.fleet.transports)."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.fleet_helpers import DEV
from support.fleet_model import FleetModel, local_files, make_model
from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401

from toolchain.contracts.wire.messages import ST_IDLE, ST_OFFLINE
from toolchain.deploy.emulators import wasm
from toolchain.deploy.emulators.wasm_net import board_files, umqtt_missing
from toolchain.deploy.emulators.wasm_stream import WasmBoard, mqtt_boot
from toolchain.fleet import MqttConfig, Signer
from toolchain.fleet.coordinator import Coordinator, RoundConfig
from toolchain.fleet.mqtt_link import MqttHost
from toolchain.fleet.transports import MqttFleet
from toolchain.verify.reference import reference_probe, reference_update

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")]
KEY = b"mqtt-device-key"
DEVICE = "wasm-m1"


def mqtt_board(m: FleetModel, idx: np.ndarray, broker_port: int, fleet: str) -> WasmBoard:
    """A networked WebAssembly board: app.py + link_mqtt.py + umqtt.simple, provisioned without a model."""
    files = {f"/lib/{p.name}": p.read_bytes() for p in sorted(DEV.glob("*.py"))}
    files.update(board_files())
    files.update({"/" + k: v for k, v in local_files(m, DEVICE, idx, KEY).items()})
    files["/mqtt.json"] = json.dumps({"server": "localhost", "port": broker_port, "fleet": fleet}).encode()
    return WasmBoard(files, mqtt_boot(), net=True)


def _wait_log(board: WasmBoard, text: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in board.log:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(umqtt_missing() is not None, reason=umqtt_missing() or "")
def test_device_mqtt_link(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """HELLO + retained STATUS, 3 federated ZO rounds with host-reference scalars, a broker restart between
    rounds 2 and 3, the model sent over MQTT, and the last will when the board's process dies."""
    broker = mosquitto
    mcfg = MqttConfig(port=broker.port, fleet="m1")
    m = make_model()
    idx = m.split(3)[0]
    fleet = MqttFleet(mcfg)  # the coordinator's host end, subscribed before the board boots
    observer = MqttHost(mcfg, client_id="observer")  # a second host: sees the retained status topic
    observer.start()
    board = mqtt_board(m, idx, broker.port, "m1")
    coord = None
    try:
        # announces itself: HELLO on up, STATUS retained on status (device id from the topic = HELLO's)
        assert fleet.host.wait_until(lambda s: DEVICE in s and s[DEVICE].hello is not None, 30), board.log.decode()
        hello = fleet.host.slots[DEVICE].hello
        assert (hello.device_id, hello.board, hello.caps) == (DEVICE, "wasm", 0x4B)  # + 0x40: signed rounds only
        assert observer.wait_until(lambda s: DEVICE in s and s[DEVICE].status is not None, 10)
        st = observer.slots[DEVICE].status
        assert observer.slots[DEVICE].online and (st.state, st.model_id, st.round_id) == (ST_IDLE, 0, 0)

        cfg = RoundConfig(rounds=3, k=8, mu=1e-3, lr=1.0, batch=64, min_devices=1, deadline_s=60, resend_s=2)
        coord = Coordinator(fleet, cfg, tmp_path, model=m.smf, signer=Signer(hmac_key=KEY), progress=sys.stderr)
        assert not coord.run(until=lambda: coord.round > 2, timeout=120), coord.summary()
        assert coord.round == 3 and coord.devices[DEVICE].transfer >= 1  # the model went over MQTT, signed
        # broker restart (persistent sessions): the board notices, reconnects, republishes its STATUS
        broker.stop()
        broker.start()
        assert _wait_log(board, b"mqtt connected 2", 30), board.log.decode()
        assert coord.run(timeout=120), coord.summary()
        assert b"mqtt link lost" in board.log

        # every round's scalars are the host reference's, on the weights the previous updates left
        wal = [json.loads(line) for line in (tmp_path / "wal.jsonl").read_text().splitlines()]
        results = {w["round"]: w for w in wal if w["t"] == "result" and w["device"] == DEVICE}
        closes = {w["round"]: w for w in wal if w["t"] == "close"}
        assert sorted(results) == sorted(closes) == [1, 2, 3]
        w = m.head.weights
        for r in (1, 2, 3):
            ref = reference_probe(m.head, w, m.feats[idx], m.y[idx], closes[r]["seed"], 8, 1e-3)
            assert results[r]["n"] == len(idx)
            assert results[r]["loss"] == pytest.approx(ref.loss, abs=1e-6)
            assert max(abs(a - b) for a, b in zip(results[r]["scalars"], ref.scalars, strict=True)) < 1e-5
            w = reference_update(w, closes[r]["seed"], closes[r]["gbar"], closes[r]["lr"])
        assert closes[3]["loss"] < closes[1]["loss"]

        # power cut: Node dies, the OS closes its socket, the broker publishes the will (retained OFFLINE)
        assert observer.wait_until(lambda s: s[DEVICE].online, 10)  # (the observer reconnected after the restart)
        board.kill()
        assert observer.wait_until(lambda s: not s[DEVICE].online and s[DEVICE].status.state == ST_OFFLINE, 15)
        late = MqttHost(mcfg, client_id="late")  # a host that comes later learns it from the retained message
        late.start()
        try:
            assert late.wait_until(lambda s: DEVICE in s and s[DEVICE].status is not None, 10)
            assert late.slots[DEVICE].status.state == ST_OFFLINE
        finally:
            late.stop()
    finally:
        if coord is not None:
            coord.close()
        fleet.close()
        observer.stop()
        board.close()


def test_board_socket_semantics() -> None:
    """The emulator's network driver behaves as MicroPython's usocket on lwIP ports (what umqtt relies on)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]  # bound, not listening: connection refused
    got = bytearray()

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"abc")
        got.extend(conn.recv(100))
        time.sleep(0.6)  # the board's read with a timeout expires first
        conn.sendall(b"defgh")
        time.sleep(0.2)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    boot = (
        "import sys\nsys.path.append('/lib')\nimport usocket as socket\n"
        "def p(*a):\n    print('R', *a)\n"
        f"a = socket.getaddrinfo('localhost', {port})[0][-1]\np(a)\n"
        "s = socket.socket()\n"
        f"try:\n    s.connect(('127.0.0.1', {refused}))\nexcept OSError as e:\n    p('refused', e.args[0])\n"
        "s = socket.socket()\ns.connect(a)\n"
        "p(s.read(3))\ns.setblocking(False)\np(s.read(1))\ns.setblocking(True)\n"
        "p(s.write(b'xyz123', 3))\ns.settimeout(0.2)\n"
        "try:\n    s.read(1)\nexcept OSError as e:\n    p('timeout', e.args[0])\n"
        "s.settimeout(None)\nb = bytearray(4)\np(s.readinto(b), b)\np(s.read(10))\np(s.recv(5))\ns.close()\np('end')\n"
        "def _feed(h):\n    pass\ndef _tick():\n    pass\n"
    )
    board = WasmBoard({}, boot, net=True)
    try:
        assert _wait_log(board, b"R end", 20), board.log.decode()
    finally:
        board.close()
        srv.close()
        closed.close()
    lines = [ln[2:] for ln in board.log.decode().splitlines() if ln.startswith("R ")]
    assert lines == [f"('127.0.0.1', {port})", "refused 111", "b'abc'", "None", "3", "timeout 110",
                     "4 bytearray(b'defg')", "b'h'", "b''", "end"], board.log.decode()
    assert bytes(got) == b"xyz"
