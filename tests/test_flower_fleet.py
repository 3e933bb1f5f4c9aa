"""The fleet on Flower (docs/flower.md "The fleet on Flower"): one fleet-node SuperNode drives two emulated
WebAssembly boards (``app.py`` over ptys) for two on-device ZO rounds on a real local SuperLink; the updates,
every device's scalars and so the final weights must equal a ``toolchain serve`` run over two fresh boards with
the same settings, bit for bit. A third port on the node speaks the protocol as a device that is not in the
node's list and forges results every 0.2 s: it is refused, and nothing of it counts.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest
from support.fleet_helpers import DEV, wasm_board
from support.fleet_model import local_files, make_model
from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401

from toolchain.contracts.wire.framing import Frame, FrameDecoder, encode_frame
from toolchain.contracts.wire.messages import ST_IDLE, Hello, RoundResult, Status, encode
from toolchain.deploy.emulators import wasm
from toolchain.deploy.emulators.wasm_net import board_files, umqtt_missing
from toolchain.deploy.emulators.wasm_stream import WasmBoard, mqtt_boot
from toolchain.verify.reference import reference_probe, reference_update

KEY = b"fleet-flower-test-key"
SETTINGS = {"rounds": 2, "k": 8, "lr": 1.0, "seed": 7}


class ForgingDevice:
    """A pty speaking the serial framing as device ``evil``: HELLO + STATUS (ready at model 1) and a forged
    ROUND_RESULT for rounds 1 and 2 (``[1e6]*k``, loss 0) every 0.2 s; it acks whatever it is sent."""

    def __init__(self, k: int) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        # between the node's messages nobody reads the port: drop what does not fit instead of blocking
        os.set_blocking(self._master, False)
        self.k, self.seq = k, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._master, data)
        except BlockingIOError:
            pass

    def _send(self, msg: object) -> None:
        self.seq = (self.seq + 1) % 65536
        self._write(encode_frame(Frame(self.seq, encode(msg))))  # type: ignore[arg-type]

    def _run(self) -> None:
        dec = FrameDecoder(600)
        last = 0.0
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            try:
                if ready:
                    try:
                        data = os.read(self._master, 256)
                    except BlockingIOError:
                        data = b""
                    for f in dec.feed(data):
                        if not f.ack:
                            self._write(encode_frame(Frame(f.seq, ack=True)))
                if time.monotonic() - last > 0.2:
                    last = time.monotonic()
                    self._send(Hello("evil", "wasm", "micropython 1.29", (1, 1, 0), 100000, 600, 0, 7))
                    self._send(Status(ST_IDLE, 1, 100000, 0, 1))
                    for r in (1, 2):
                        self._send(RoundResult(r, (1e6,) * self.k, 0.0, 32))
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for fd in (self._master, self._slave):
            os.close(fd)


def _wal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "wal.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")
def test_fleet_node_on_flower_equals_toolchain_serve(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")
    from toolchain.cli import main
    from toolchain.learning.flower.launch import LocalFederation
    from toolchain.pipelines.fleetnode import run_fleet

    m = make_model()
    parts = m.split(3)
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "model.smf").write_bytes(m.smf)

    # 1. toolchain serve over two boards (both must be ready before round 1: --min-devices 2)
    boards = [wasm_board(m, f"dev-{i}", parts[i], KEY) for i in range(2)]
    try:
        rc = main(["serve", "--transport", "serial", "--port", boards[0].port, "--port", boards[1].port,
                   "--rounds", str(SETTINGS["rounds"]), "--k", str(SETTINGS["k"]), "--lr", str(SETTINGS["lr"]),
                   "--seed", str(SETTINGS["seed"]), "--min-devices", "2", "--model", str(tmp_path / "model.smf"),
                   "--hmac-key", str(tmp_path / "key"), "--out", str(tmp_path / "serve"), "--timeout", "240"])
        served = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        for b in boards:
            b.close()
    assert rc == 0 and served["done"] and served["unacked"] == []

    # 2. the same on Flower: two fresh boards (no model yet) and the forger behind one fleet-node SuperNode
    boards = [wasm_board(m, f"dev-{i}", parts[i], KEY) for i in range(2)]
    evil = ForgingDevice(SETTINGS["k"])
    node = (f"ports='{boards[0].port},{boards[1].port},{evil.port}' devices='dev-0,dev-1' "
            f"hmac-key='{tmp_path / 'key'}' model='{tmp_path / 'model.smf'}' state-dir='{tmp_path / 'node'}'")
    fed = LocalFederation(1, node_configs=[node])
    try:
        fed.start()
        summary = run_fleet(fed.address, {**SETTINGS, "out": str(tmp_path / "flower"), "nodes": 1},
                            env=fed.env(), insecure=True, timeout=480)
    except Exception:
        print(fed.log("superlink")[-4000:], fed.log("supernode0")[-6000:], sep="\n----\n")
        raise
    finally:
        fed.stop()
        evil.close()
        for b in boards:
            b.close()
    assert summary["rounds"] == 2 and summary["unacked"] == []
    print(f"toolchain serve: {served['wall_s']} s; Flower ServerApp: {summary['wall_s']} s (after start-up)")

    # the updates (seed, lr, aggregated scalars) of both runs, bit for bit
    closes = [r for r in _wal(tmp_path / "serve") if r["t"] == "close"]
    assert [(c["round"], c["seed"], c["lr"], c["gbar"]) for c in closes] == \
        [(u["round"], u["seed"], u["lr"], u["gbar"]) for u in summary["updates"]]
    # every device's result of every round, bit for bit (the weights it probed were the same)
    rounds = [json.loads(line) for line in (tmp_path / "flower" / "rounds.jsonl").read_text().splitlines()]
    served_results = {(r["round"], r["device"]): (r["scalars"], r["loss"], r["n"])
                      for r in _wal(tmp_path / "serve") if r["t"] == "result"}
    flower_results = {(r["round"], d): (v["scalars"], v["loss"], v["n"])
                      for r in rounds for d, v in r["per_device"].items()}
    assert served_results == flower_results and len(flower_results) == 4
    assert [r["loss"] for r in rounds] == served["loss"]

    # the final weights: the initial head weights with both rounds' updates applied (what each board holds now:
    # both runs ended with every device acknowledging the last update)
    def final(updates: list[tuple[int, list[float], float]]) -> np.ndarray:
        w = m.head.weights
        for seed, gbar, lr in updates:
            w = reference_update(w, seed, gbar, lr)
        return w

    w_serve = final([(c["seed"], c["gbar"], c["lr"]) for c in closes])
    w_flower = final([(u["seed"], u["gbar"], u["lr"]) for u in summary["updates"]])
    assert w_serve.tobytes() == w_flower.tobytes()
    assert not np.array_equal(w_flower, m.head.weights)

    # the device outside the node's list: refused, never asked, nothing of it counted. Refused in the run, not in
    # every round: a round closes as soon as the listed devices answered, and the node does not wait to read a
    # stranger (on a loaded machine one round closed before the forger's frames were read)
    assert all(r["devices"] == ["dev-0", "dev-1"] for r in rounds)
    assert sum(n.get("evil", 0) for r in rounds for n in r["refused"].values()) > 0
    node_wal = _wal(next((tmp_path / "node").glob("run-*")))
    assert not any(r.get("device") == "evil" for r in node_wal)


def test_fleet_app_run_config_and_node_config(tmp_path: Path) -> None:
    """The checked-in app (flower_fleet_app/) names the fleet components and its run config is valid; a node
    config without a transport, or with a model but no key, is one error line."""
    pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")
    import tomllib

    from toolchain.contracts.errors import ToolchainError
    from toolchain.pipelines.fleetnode import fleet_run, node_settings

    repo = Path(__file__).resolve().parents[1]
    app = tomllib.loads((repo / "flower_fleet_app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    for ref in app["components"].values():
        module, _, name = ref.partition(":")
        assert name == "app" and (repo / "flower_fleet_app" / (module.replace(".", "/") + ".py")).exists()
    run = fleet_run(app["config"])
    assert run.cfg.rounds == 10 and run.cfg.master_seed == 2024 and run.out.is_absolute()
    with pytest.raises(ToolchainError, match="unknown run-config"):
        fleet_run({**app["config"], "rouns": 3})
    with pytest.raises(ToolchainError, match="out of range"):
        fleet_run({**app["config"], "lr": 50.0})
    with pytest.raises(ToolchainError, match="ports="):
        node_settings({"partition-id": 0})
    (tmp_path / "model.smf").write_bytes(b"x")
    with pytest.raises(ToolchainError, match="needs hmac-key"):
        node_settings({"ports": "/dev/ttyACM0", "model": str(tmp_path / "model.smf")})
    s = node_settings({"ports": "/dev/ttyACM0, /dev/ttyACM1,/dev/ttyACM2", "devices": "a,b"})
    assert s.transport == "serial" and len(s.ports) == 3 and s.min_devices == 2
    assert node_settings({"broker": "127.0.0.1:1883", "fleet": "lab"}).transport == "mqtt"
    (tmp_path / "pw").write_text("secret\n")
    auth = node_settings({"broker": "b:1883", "mqtt-user": "node1", "mqtt-password-file": str(tmp_path / "pw")}).auth
    assert (auth["username"], auth["password"], auth["tls"]) == ("node1", "secret", None)
    with pytest.raises(ToolchainError, match="needs a password"):
        node_settings({"broker": "b:1883", "mqtt-user": "node1"})


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")
@pytest.mark.skipif(umqtt_missing() is not None, reason=umqtt_missing() or "")
def test_fleet_node_over_mqtt(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """The MQTT transport: a fleet node whose node config names a broker and fleet drives the networked
    WebAssembly board (app.py on link_mqtt.py + umqtt.simple) for 2 rounds; the model goes over MQTT (signed) and
    the board's scalars in both rounds equal the host reference chained through the ServerApp's updates."""
    pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")
    from toolchain.learning.flower.launch import LocalFederation
    from toolchain.pipelines.fleetnode import run_fleet

    m = make_model()
    idx = m.split(3)[0]
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "model.smf").write_bytes(m.smf)
    files = {f"/lib/{p.name}": p.read_bytes() for p in sorted(DEV.glob("*.py"))}
    files.update(board_files())
    files.update({"/" + k: v for k, v in local_files(m, "wasm-f1", idx, KEY).items()})
    files["/mqtt.json"] = json.dumps({"server": "localhost", "port": mosquitto.port, "fleet": "ff"}).encode()
    board = WasmBoard(files, mqtt_boot(), net=True)
    node = (f"broker='127.0.0.1:{mosquitto.port}' fleet='ff' devices='wasm-f1' hmac-key='{tmp_path / 'key'}' "
            f"model='{tmp_path / 'model.smf'}' state-dir='{tmp_path / 'node'}'")
    fed = LocalFederation(1, node_configs=[node])
    try:
        fed.start()
        summary = run_fleet(fed.address, {**SETTINGS, "batch": 64, "out": str(tmp_path / "flower"), "nodes": 1},
                            env=fed.env(), insecure=True, timeout=480)
    except Exception:
        print(fed.log("superlink")[-4000:], fed.log("supernode0")[-6000:], board.log.decode()[-2000:],
              sep="\n----\n")
        raise
    finally:
        fed.stop()
        board.close()
    assert summary["rounds"] == 2 and summary["unacked"] == []
    rounds = [json.loads(line) for line in (tmp_path / "flower" / "rounds.jsonl").read_text().splitlines()]
    w = m.head.weights
    for r in rounds:
        assert r["devices"] == ["wasm-f1"]
        ref = reference_probe(m.head, w, m.feats[idx], m.y[idx], r["seed"], SETTINGS["k"], 1e-3)
        got = np.asarray(r["per_device"]["wasm-f1"]["scalars"])
        assert np.abs(got - ref.scalars).max() < 1e-5, (got, ref.scalars)
        assert r["gbar"] == [float(np.float32(v)) for v in got]  # one device: the mean is its own scalars
        w = reference_update(w, r["seed"], r["gbar"], r["lr"])
