"""device_runtime/micropython/app.py on MicroPython 1.29 (WebAssembly) over a pty, driven by a SerialLink: what it
accepts and rejects, model transfer checks, update ordering; and `toolchain serve` on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.fleet_helpers import wasm_board
from support.fleet_model import make_model

from toolchain.contracts.wire.security import seal
from toolchain.deploy.emulators import wasm
from toolchain.fleet import (
    Ack,
    Error,
    Hello,
    ModelCommit,
    Ping,
    RoundResult,
    RoundStart,
    SerialLink,
    Signer,
    Status,
    encode,
    model_transfer,
)
from toolchain.fleet.transports import RoundUpdate
from toolchain.verify.reference import reference_probe, reference_update

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not wasm.available(), reason="MicroPython WebAssembly not installed (npm ci)")]
KEY = b"device-test-key"


def _recv(link: SerialLink, timeout: float = 60.0) -> object:
    msg = link.recv_message(timeout)
    assert msg is not None, "the device did not answer"
    return msg


def _expect(link: SerialLink, kind: type, timeout: float = 60.0) -> object:
    while True:
        msg = _recv(link, timeout)
        if isinstance(msg, kind):
            return msg
        assert isinstance(msg, Status | Hello), msg  # heartbeats may come in between


def test_app_rules(tmp_path: Path) -> None:
    m = make_model()
    idx = m.split(3)[0]
    board = wasm_board(m, "dev-1", idx, KEY)
    link = SerialLink.open(board.port, max_message=600, ack_timeout=0.5)
    try:
        hello = _expect(link, Hello)
        assert (hello.device_id, hello.board, hello.caps) == ("dev-1", "wasm", 0x4B)  # sha256, HMAC, .smf, signed

        def sealed(msg: object) -> object:  # ROUND_START / ROUND_UPDATE as the coordinator sends them
            return seal(KEY, "dev-1", hello.session, msg)  # type: ignore[arg-type]

        link.send_message(Ping())
        assert _expect(link, Hello).session == hello.session
        st = _expect(link, Status)
        assert (st.model_id, st.round_id) == (0, 0)
        # no model yet
        link.send_message(sealed(RoundStart(1, 4, 1e-3, 0.5, 1, 8, round_seed=5)))
        assert _expect(link, Error).code == 9
        # unsigned, signed with another key, for another device, for an earlier boot: refused (AUTH), with text
        rs1 = RoundStart(1, 4, 1e-3, 0.5, 1, 8, round_seed=5)
        for forged, ref in ((rs1, 0x10), (RoundUpdate(1, 5, 10.0, (1e6,) * 4), 0x12),
                            (seal(b"other key", "dev-1", hello.session, rs1), 0x13),
                            (seal(KEY, "dev-2", hello.session, rs1), 0x13),
                            (seal(KEY, "dev-1", hello.session ^ 1, rs1), 0x13)):
            link.send_message(forged)
            err = _expect(link, Error)
            assert (err.code, err.ref_type, err.text) == (8, ref, "bad signature"), forged
        # a tampered model (bad tag) and a wrong sha256 are refused; a signed one is installed
        msgs = model_transfer(m.smf, 3, Signer(hmac_key=b"wrong key"))
        for msg in msgs:
            link.send_message(msg)
        assert (_expect(link, Error).code, hello.device_id) == (8, "dev-1")
        good = model_transfer(m.smf, 4, Signer(hmac_key=KEY))
        bad_sha = [*good[:-1], ModelCommit(4, bytes(32), good[-1].auth, good[-1].tag)]
        for msg in bad_sha:
            link.send_message(msg)
        assert _expect(link, Error).code == 7
        for msg in good:
            link.send_message(msg)
        assert _expect(link, Ack) == Ack(4, 4)
        # out-of-range parameters: mu, lr, k above the bundle's k_max (16); explicit seeds; wrong version
        for rs, code in ((RoundStart(1, 4, 2.0, 0.5, 1, 8, round_seed=5), 4),
                         (RoundStart(1, 4, 1e-3, 11.0, 1, 8, round_seed=5), 4),
                         (RoundStart(1, 17, 1e-3, 0.5, 1, 8, round_seed=5), 4),
                         (RoundStart(1, 2, 1e-3, 0.5, 1, 8, seeds=(1, 2)), 3),
                         (RoundStart(2, 4, 1e-3, 0.5, 1, 8, round_seed=5), 6)):
            link.send_message(sealed(rs))
            err = _expect(link, Error)
            assert (err.code, err.ref_type, err.ref_id) == (code, 0x10, rs.round_id), rs
        # a round: the scalars are the host reference's (double port, copy restore: libm-level agreement)
        seed = 0xDEADBEEF
        link.send_message(sealed(RoundStart(1, 8, 1e-3, 0.5, 1, 64, round_seed=seed)))
        res = _expect(link, RoundResult)
        ref = reference_probe(m.head, m.head.weights, m.feats[idx], m.y[idx], seed, 8, 1e-3)
        assert res.n_samples == len(idx) and res.loss == pytest.approx(ref.loss, abs=1e-6)
        assert max(abs(a - b) for a, b in zip(res.scalars, ref.scalars, strict=True)) < 1e-5
        # updates: a gap is refused, the next one applied, a repeat acknowledged and not applied twice
        upd = RoundUpdate(1, seed, 0.5, tuple(float(v) for v in ref.scalars))
        link.send(encode(sealed(RoundUpdate(2, seed, 0.5, upd.gbar))))
        assert _expect(link, Error).code == 6
        # ... out of range (lr, a non-finite scalar, k above k_max) or malformed (no scalars): refused, not applied
        for bad, code, ref in ((RoundUpdate(1, seed, 11.0, upd.gbar), 4, 1),
                               (RoundUpdate(1, seed, 0.5, (float("nan"),) + upd.gbar[1:]), 4, 1),
                               (RoundUpdate(1, seed, 0.5, (0.0,) * 17), 4, 1)):
            link.send(encode(sealed(bad)))
            err = _expect(link, Error)
            assert (err.code, err.ref_type, err.ref_id) == (code, 0x12, ref), bad
        link.send(encode(sealed(encode(upd)[:14])))
        err = _expect(link, Error)
        assert (err.code, err.ref_type, err.ref_id) == (1, 0x12, 0)
        link.send(encode(sealed(upd)))
        assert _expect(link, Ack) == Ack(0x12, 1)
        link.send(encode(sealed(upd)))
        assert _expect(link, Ack) == Ack(0x12, 1)
        link.send_message(Ping())
        assert _expect(link, Status).round_id == 1
        # round 2 runs on the updated weights: its loss is the reference's after one update
        w1 = reference_update(m.head.weights, seed, upd.gbar, 0.5)
        link.send_message(sealed(RoundStart(2, 8, 1e-3, 0.5, 1, 64, round_seed=7)))
        res2 = _expect(link, RoundResult)
        ref2 = reference_probe(m.head, w1, m.feats[idx], m.y[idx], 7, 8, 1e-3)
        assert res2.loss == pytest.approx(ref2.loss, abs=1e-6)
        # garbage message types are answered, not fatal
        link.send(b"\x01\x7f\x00")
        assert _expect(link, Error).code == 1
        link.send(encode(Ping()))
        assert isinstance(_expect(link, Status), Status)
    finally:
        link.close()
        board.close()


def test_toolchain_serve_serial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from toolchain.cli import main

    m = make_model()
    board = wasm_board(m, "dev-2", m.split(3)[1], KEY)
    try:
        (tmp_path / "key").write_bytes(KEY)
        (tmp_path / "model.smf").write_bytes(m.smf)
        rc = main(["serve", "--transport", "serial", "--port", board.port, "--rounds", "2", "--k", "8", "--lr", "1.0",
                   "--model", str(tmp_path / "model.smf"), "--hmac-key", str(tmp_path / "key"),
                   "--out", str(tmp_path / "run"), "--timeout", "240"])
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rc == 0 and out["done"] and out["rounds"] == 2 and out["loss"][1] < out["loss"][0]
        # run again: everything is closed already, nothing is repeated
        rc = main(["serve", "--transport", "serial", "--port", board.port, "--rounds", "2", "--out",
                   str(tmp_path / "run"), "--timeout", "30"])
        assert rc == 0 and len((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()) == 2
    finally:
        board.close()


def test_serve_usage_errors(capsys: pytest.CaptureFixture) -> None:
    from toolchain.cli import main

    assert main(["serve", "--transport", "serial"]) == 2
    assert "at least one --port" in capsys.readouterr().err
    assert main(["serve", "--transport", "mqtt", "--broker", "nonsense"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("flip", [False, True], ids=["intact", "flipped-byte"])
def test_flashed_model_checked_at_boot(flip: bool) -> None:
    """app_boot.py loads a provisioned model.smf only if model.tag (HMAC of its bundle header with the device's
    key) matches: a flipped byte leaves the board without a model (STATUS model 0; the host sends it again)."""
    import hashlib

    from toolchain.contracts.wire.security import hmac_tag
    from toolchain.fleet import bundle_header

    m = make_model()
    tag = hmac_tag(KEY, bundle_header(1, 1, len(m.smf), hashlib.sha256(m.smf).digest()))
    smf = bytearray(m.smf)
    if flip:
        smf[len(smf) // 2] ^= 0x10
    board = wasm_board(m, "dev-b", m.split(3)[2], KEY, with_model=True, extra={"model.smf": bytes(smf),
                                                                              "model.tag": tag})
    link = SerialLink.open(board.port, max_message=600, ack_timeout=0.5)
    try:
        _expect(link, Hello)
        link.send_message(Ping())
        st = _expect(link, Status)
        assert st.model_id == (0 if flip else 1), board.log.decode()
        assert (b"does not match model.tag" in board.log) == flip
    finally:
        link.close()
        board.close()
