"""Clean errors before any round (issue 16, item 5): every bad input to ``toolchain serve`` / ``gateway`` is one
``error:`` line and exit code 2, checked before a port or the broker is opened (the broker given here does not
exist, so an error about anything else would name it), with no traceback and nothing written."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

import pytest
from support.fleet_helpers import wasm_board
from support.fleet_model import make_model
from support.mosquitto_fixture import free_port, mosquitto, mosquitto_factory  # noqa: F401

from toolchain.deploy.emulators import wasm
from toolchain.fleet import (
    Error,
    MqttConfig,
    MqttHost,
    Ping,
    RoundResult,
    RoundStart,
    SerialLink,
    decode,
    encode,
)

NOWHERE = f"127.0.0.1:{free_port()}"  # nothing listens: validation must come first
MQTT = ["serve", "--transport", "mqtt", "--broker", NOWHERE, "--rounds", "2"]


def _files(tmp: Path) -> dict[str, str]:
    (tmp / "key").write_bytes(b"k" * 16)
    (tmp / "blank").write_bytes(b"  \n")
    (tmp / "model.smf").write_bytes(b"SMF1" + bytes(60))
    (tmp / "regular").write_bytes(b"")
    return {"KEY": str(tmp / "key"), "BLANK": str(tmp / "blank"), "MODEL": str(tmp / "model.smf"),
            "REG": str(tmp / "regular"), "MISSING": str(tmp / "missing.bin")}


CASES = [  # (argv after the command, words the one line must contain)
    (["serve", "--transport", "serial", "--port", "/dev/does-not-exist"], "does not exist"),
    (["serve", "--transport", "serial", "--port", "{REG}"], "not a serial device"),
    (["serve", "--transport", "serial", "--port", "/dev/null"], "cannot open /dev/null"),
    ([*MQTT, "--model", "{MISSING}", "--hmac-key", "{KEY}"], "cannot read --model"),
    ([*MQTT, "--model", "{MODEL}", "--hmac-key", "{MISSING}"], "cannot read --hmac-key"),
    ([*MQTT, "--model", "{MODEL}", "--hmac-key", "{BLANK}"], "white space"),
    ([*MQTT, "--model", "{MODEL}"], "needs --hmac-key"),
    ([*MQTT, "--model", "{REG}", "--hmac-key", "{KEY}"], "is 0 bytes"),
    ([*MQTT, "--fleet", "a/+/#"], "--fleet 'a/+/#'"),
    ([*MQTT, "--fleet", ""], "--fleet ''"),
    ([*MQTT, "--fleet", "lab#"], "one MQTT topic level"),
    ([*MQTT, "--k", "0"], "--k 0 is out of range"),
    ([*MQTT, "--k", "100000"], "--k 100000 is out of range"),
    ([*MQTT, "--lr", "nan"], "--lr nan is out of range"),
    ([*MQTT, "--lr", "1e9"], "--lr 1e+09 is out of range"),
    ([*MQTT, "--lr", "0"], "--lr 0 is out of range"),
    ([*MQTT, "--mu", "0"], "--mu 0 is out of range"),
    ([*MQTT, "--mu", "inf"], "--mu inf is out of range"),
    ([*MQTT, "--batch", "0"], "--batch 0 is out of range"),
    ([*MQTT, "--batch", "70000"], "--batch 70000 is out of range"),
    (["serve", "--transport", "mqtt", "--broker", NOWHERE, "--rounds", "-1"], "--rounds -1 is out of range"),
    (["serve", "--transport", "mqtt", "--broker", NOWHERE, "--rounds", "0"], "--rounds 0 is out of range"),
    ([*MQTT, "--min-results", "0"], "--min-results 0"),
    ([*MQTT, "--min-devices", "-3"], "--min-devices -3"),
    ([*MQTT, "--deadline", "-1"], "--deadline -1"),
    ([*MQTT, "--deadline", "nan"], "--deadline nan"),
    ([*MQTT, "--timeout", "0"], "--timeout 0"),
    ([*MQTT, "--seed", "-1"], "--seed -1"),
    ([*MQTT, "--model-id", "0"], "--model-id 0"),
    ([*MQTT, "--clip", "0"], "--clip 0"),
    ([*MQTT, "--max-devices", "0"], "--max-devices 0"),
    (["serve", "--transport", "mqtt", "--broker", "127.0.0.1:99999"], "port 1..65535"),
    (["serve", "--transport", "mqtt", "--broker", "nonsense"], "HOST:PORT"),
    (["serve", "--transport", "mqtt", "--broker", NOWHERE], "cannot reach the MQTT broker"),
    (["gateway", "--port", "/dev/does-not-exist", "--broker", NOWHERE, "--fleet", "a/+/#"], "--fleet 'a/+/#'"),
    (["gateway", "--port", "/dev/does-not-exist", "--broker", NOWHERE, "--heartbeat", "0"], "--heartbeat 0"),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(a[3:] if a[0] == "serve" else a).replace(NOWHERE, "NOWHERE") for a, _ in CASES])
def test_bad_input_is_one_clean_line(argv: list[str], words: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    from toolchain.cli import main

    files = _files(tmp_path)
    argv = [a.format(**files) for a in argv]
    out = tmp_path / "run"
    if argv[0] == "serve":
        argv += ["--out", str(out)]
    rc = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert words in lines[0], lines[0]
    assert "Traceback" not in cap.err and cap.out == ""
    assert not (out / "wal.jsonl").exists()  # nothing was started


@pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")
def test_device_errors_carry_text(tmp_path: Path) -> None:
    """Every ERROR app.py puts on the wire says what it is (before: an empty text)."""
    from toolchain.fleet import Hello, seal

    m = make_model()
    board = wasm_board(m, "dev-e", m.split(2)[0], b"key")
    link = None
    try:
        link = SerialLink.open(board.port, max_message=600)
        hello = None
        while not isinstance(hello, Hello):
            hello = link.recv_message(60)
            assert hello is not None, board.log.decode()
        ses = hello.session
        link.send(encode(seal(b"key", "dev-e", ses, RoundStart(1, 4, 1e-3, 0.5, 1, 8, round_seed=5))))  # no model
        link.send(b"\x01\x7f")  # unknown type
        link.send(encode(seal(b"key", "dev-e", ses, RoundStart(1, 4, 2.0, 0.5, 1, 8, round_seed=5))))  # mu range
        link.send(encode(RoundStart(1, 4, 1e-3, 0.5, 1, 8, round_seed=5)))  # unsigned
        errors = []
        while len(errors) < 4:
            raw = link.recv(60)
            assert raw is not None, board.log.decode()
            msg = decode(raw)
            if isinstance(msg, Error):
                errors.append(msg)
        assert [(e.code, e.text) for e in errors] == [(9, "no model"), (1, "bad message"), (4, "out of range"),
                                                      (8, "bad signature")]
    finally:
        if link is not None:
            link.close()
        board.close()


def test_jetson_agent_corrupt_signed_model_error_has_text(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """A correctly signed ONNX model that does not load is refused with a text (before: Error(11, text=''))
    and the agent keeps its previous model."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from toolchain.contracts.wire.messages import FMT_ONNX
    from toolchain.fleet import Signer, Verifier, model_transfer
    from toolchain.fleet.device_agent import Agent

    key = Ed25519PrivateKey.generate()
    cfg = MqttConfig(port=mosquitto.port, fleet="e1")

    def load(model: bytes) -> object:
        import onnxruntime

        return onnxruntime.InferenceSession(model)

    agent = Agent(cfg, "jet-e", object(), [b"\x00"], [0], verifier=Verifier(ed25519_public=key.public_key()),
                  load=load)
    host = MqttHost(cfg, keep_history=True)
    host.start()
    stop = threading.Event()
    th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    th.start()
    try:
        assert host.wait_until(lambda s: "jet-e" in s and s["jet-e"].hello is not None, 20)
        bad = b"\x08\x07" + hashlib.sha256(b"x").digest()  # signed, sha256 right, not an ONNX model
        for msg in model_transfer(bad, 7, Signer(ed25519_key=key), chunk_size=64, fmt=FMT_ONNX):
            host.send("jet-e", msg)
        host.send("jet-e", Ping())
        assert host.wait_until(lambda s: any(isinstance(h, Error) for h in s["jet-e"].history), 20)
        err = next(h for h in host.slots["jet-e"].history if isinstance(h, Error))
        assert (err.code, err.ref_id) == (11, 7) and err.text.startswith("model does not load"), err
        assert agent.model_id == 1  # the previous model stays
    finally:
        stop.set()
        th.join(10)
        host.stop()



def test_jetson_agent_checks_its_model_at_start(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """A flipped weight byte (caught by the bundle's SHA256SUMS, or by the model's Ed25519 signature) or a flipped
    header byte (the model does not load) stops the agent with one line before it announces anything (before:
    it announced the corrupted model, or died in a protobuf traceback)."""
    import json
    import subprocess

    import numpy as np
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from toolchain.contracts.wire.messages import FMT_ONNX
    from toolchain.fleet import Signer, bundle_header

    m = make_model()
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    local = tmp_path / "local"
    local.mkdir()
    feats = np.ascontiguousarray(m.feats[:8], np.int8)
    (local / "data.bin").write_bytes(feats.tobytes())
    (local / "local.json").write_text(json.dumps({"device": "jet-m", "n": 8, "size": int(feats.shape[1]),
                                                  "labels": [int(v) for v in m.y[:8]], "model_id": 1}))
    good = m.onnx(tmp_path / "good.onnx").read_bytes()

    def bundle(name: str, model: bytes, sums: bool = False, sign: bytes | None = None) -> Path:
        b = tmp_path / name
        b.mkdir()
        (b / "model.onnx").write_bytes(model)
        (b / "config.json").write_text(json.dumps(m.jetson_spec()))
        if sums:
            (b / "SHA256SUMS").write_text(f"{hashlib.sha256(good).hexdigest()}  model.onnx\n")
        if sign is not None:
            hdr = bundle_header(1, FMT_ONNX, len(sign), hashlib.sha256(sign).digest())
            (b / "model.onnx.sig").write_bytes(Signer(ed25519_key=key).tag(hdr))
        return b

    flipped_w = bytearray(good)
    flipped_w[-5] ^= 0x01  # inside the last initializer's float data: still a valid ONNX file
    flipped_h = bytearray(good)
    flipped_h[0] ^= 0xFF

    def agent(b: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "device_runtime.jetson.agent", "--broker",
                               f"127.0.0.1:{mosquitto.port}", "--device", "jet-m", "--bundle", str(b), "--local",
                               str(local), *extra], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, timeout=timeout)

    for b, extra, words in (
        (bundle("sums", bytes(flipped_w), sums=True), [], "does not match its SHA256SUMS line"),
        (bundle("sig", bytes(flipped_w), sign=good), ["--ed25519-public", str(pub)], "does not match its signature"),
        (bundle("nosig", good), ["--ed25519-public", str(pub)], "has no signature"),
        (bundle("head", bytes(flipped_h)), [], "does not load"),
    ):
        r = agent(b, *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, (b.name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    # the signed, intact model starts (and announces itself); stopped after its first line
    ok = bundle("ok", good, sums=True, sign=good)
    p = subprocess.Popen([sys.executable, "-m", "device_runtime.jetson.agent", "--broker",
                          f"127.0.0.1:{mosquitto.port}", "--device", "jet-m", "--bundle", str(ok), "--local",
                          str(local), "--ed25519-public", str(pub)], cwd=Path(__file__).resolve().parents[1],
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None and "jetson agent jet-m" in p.stderr.readline()
    finally:
        p.terminate()
        p.wait(10)


def test_fleet_status_decodes_the_topics(mosquitto, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001, F811
    """``toolchain fleet-status``: who is online (retained STATUS, last will), model and version, last result and
    loss, last error; ``--follow`` prints each message decoded."""
    from toolchain.cli import main
    from toolchain.contracts.wire.messages import ST_IDLE
    from toolchain.fleet import Hello, MqttDevice, Status

    cfg = MqttConfig(port=mosquitto.port, fleet="st")
    a, b = MqttDevice(cfg, "dev-a"), MqttDevice(cfg, "dev-b")
    a.start()
    b.start()
    try:
        a.send(Hello("dev-a", "esp32", "micropython 1.29", (0, 2, 0), 1000, 600, 0x4B, 7))
        a.set_status(Status(ST_IDLE, 42, 1000, 2, 1))
        a.send(RoundResult(3, (0.5,) * 8, 0.8125, 32))
        a.send(Error(4, 0x10, 3, "out of range: k"))
        b.set_status(Status(ST_IDLE, 5, 1000, 0, 0))
        time.sleep(0.3)
        b.client.loop_stop()
        b.client.socket().close()  # the connection drops: the broker publishes the will (OFFLINE, retained)
    except Exception:
        a.stop()
        raise
    time.sleep(0.5)
    try:
        assert main(["fleet-status", "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", "st", "--seconds", "1"]) == 0
        out = capsys.readouterr().out
        lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
        assert "dev-a" in lines and "dev-b" in lines, out
        assert "online  idle     model 1 version 2 up 42s" in lines["dev-a"], out
        assert "OFFLINE" in lines["dev-b"], out
        # follow: the next messages as they arrive
        done = threading.Event()

        def later() -> None:
            time.sleep(0.7)
            a.send(RoundResult(4, (0.25,) * 8, 0.75, 32))
            done.set()

        threading.Thread(target=later, daemon=True).start()
        assert main(["fleet-status", "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", "st", "--seconds", "2",
                     "--follow"]) == 0
        out = capsys.readouterr().out
        assert done.is_set() and "tinyml/st/dev-a/up ROUND_RESULT round 4 loss 0.7500 n 32 k 8" in out, out
        assert "last result: round 4 loss 0.7500 n 32" in out, out
        assert main(["fleet-status", "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", "a/#"]) == 2
    finally:
        a.stop()
