"""Message codec (layouts, round trips, rejection of malformed bytes) and model-bundle security."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from toolchain.contracts.wire import messages as M
from toolchain.fleet import (
    Ack,
    Error,
    Hello,
    ModelBegin,
    ModelChunk,
    ModelCommit,
    ModelReceiver,
    Ping,
    ProtocolError,
    RoundLimits,
    RoundResult,
    RoundStart,
    RoundUpdate,
    Signer,
    Status,
    Verifier,
    check_round,
    check_update,
    decode,
    encode,
    model_transfer,
)

pytestmark = pytest.mark.timeout(120)  # a hung link or emulator fails the test instead of CI

f32 = st.floats(width=32, allow_nan=False)
u30 = st.integers(0, (1 << 30) - 1)
u16 = st.integers(0, 0xFFFF)
name = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=32)

MESSAGES = st.one_of(
    st.builds(Hello, name.filter(bool), name, name, st.tuples(*[st.integers(0, 255)] * 3), u30, u16, u16, u16),
    st.builds(ModelBegin, u30, st.integers(1, (1 << 30) - 1), st.integers(1, 0xFFFF), st.sampled_from(M.FORMATS),
              st.sampled_from(list(M.TAG_LEN))),
    st.builds(ModelChunk, u30, u16, st.binary(min_size=1, max_size=300)),
    st.sampled_from(list(M.TAG_LEN)).flatmap(
        lambda a: st.builds(ModelCommit, u30, st.binary(min_size=32, max_size=32), st.just(a),
                            st.binary(min_size=M.TAG_LEN[a], max_size=M.TAG_LEN[a]))),
    st.integers(1, M.MAX_K).flatmap(lambda k: st.builds(
        RoundStart, u30, st.just(k), f32, f32, u16, u16, st.none(),
        st.lists(st.integers(0, 0xFFFFFFFF), min_size=k, max_size=k).map(tuple))),
    st.builds(RoundStart, u30, st.integers(1, M.MAX_K), f32, f32, u16, u16, st.integers(0, 0xFFFFFFFF)),
    st.builds(RoundResult, u30, st.lists(f32, min_size=1, max_size=M.MAX_K).map(tuple), f32, u30),
    st.builds(RoundUpdate, u30, st.integers(0, 0xFFFFFFFF), f32, st.lists(f32, min_size=1, max_size=M.MAX_K).map(tuple)),
    st.builds(Status, st.sampled_from(M.STATES), u30, u30, u30, u30),
    st.just(Ping()),
    st.builds(Ack, st.integers(0, 255), u30),
    st.builds(Error, st.integers(0, 255), st.integers(0, 255), u30, name.map(lambda s: s[:48])),
)


@settings(max_examples=400, deadline=None)
@given(MESSAGES)
def test_every_message_round_trips(msg: M.Message) -> None:
    data = encode(msg)
    assert data[0] == M.VERSION and data[1] == msg.TYPE
    assert decode(data) == msg
    assert encode(decode(data)) == data


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.data())
def test_truncated_or_extended_messages_raise_protocol_error(msg: M.Message, data: st.DataObject) -> None:
    raw = encode(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    variable = isinstance(msg, ModelChunk | RoundResult | RoundUpdate | Error | ModelCommit)
    try:
        decode(raw[:cut])
    except ProtocolError:
        pass
    else:  # only messages with a variable-length tail can be valid when cut
        assert variable
    if not variable:
        with pytest.raises(ProtocolError):
            decode(raw + b"\x00")


def test_golden_layouts() -> None:
    # Byte layouts as written in docs/protocol.md; devices are built against these.
    assert encode(Ping()) == b"\x01\x21"
    assert encode(Ack(0x10, 7)) == b"\x01\x30\x10\x07\x00\x00\x00"
    assert encode(Status(1, 2, 3, 4, 5)) == b"\x01\x20\x01" + struct.pack("<IIII", 2, 3, 4, 5)
    rs = RoundStart(9, 4, 0.5, 0.25, steps=1, batch=8, round_seed=0x01020304)
    assert encode(rs) == b"\x01\x10" + struct.pack("<IHBHHffI", 9, 4, 0, 1, 8, 0.5, 0.25, 0x01020304)
    rr = RoundResult(9, (1.0, -2.0), 0.75, 32)
    assert encode(rr) == b"\x01\x11" + struct.pack("<IIfff", 9, 32, 0.75, 1.0, -2.0)
    h = Hello("mb-1", "microbit", "mpy 1.9.2", (0, 1, 0), 9500, 160, 0x0A, 0x1234)
    assert encode(h) == (b"\x01\x01" + struct.pack("<HBBBIHH", 0x1234, 0, 1, 0, 9500, 160, 0x0A)
                         + b"\x04mb-1\x08microbit\x09mpy 1.9.2")
    assert encode(Error(4, 0x10, 9, "k")) == b"\x01\x3f\x04\x10\x09\x00\x00\x00k"
    ru = RoundUpdate(9, 0xDEADBEEF, 0.5, (1.5, -2.25, 0.0))
    assert encode(ru) == b"\x01\x12" + struct.pack("<IIffff", 9, 0xDEADBEEF, 0.5, 1.5, -2.25, 0.0)
    assert encode(ru).hex() == "011209000000efbeadde0000003f0000c03f000010c000000000"  # docs/protocol.md example
    assert len(encode(ru)) == 14 + 4 * 3 and decode(encode(ru)) == ru


@pytest.mark.parametrize("k", [1, 4, 16, 64, 256])
def test_round_result_payload_is_within_8k_plus_16(k: int) -> None:
    payload = encode(RoundResult(1, (0.0,) * k, 0.0, 1))[2:]
    assert len(payload) == 4 * k + 12 <= 8 * k + 16


@pytest.mark.parametrize("raw", [
    b"", b"\x01", b"\x02\x21", b"\x00\x21", b"\x01\x99", b"\x01\x21\x00",
    b"\x01\x30\x10\x00\x00\x00\x40",  # ref_id >= 2**30
    b"\x01\x20\x09" + bytes(16),  # unknown state
    b"\x01\x10" + struct.pack("<IHBHHffI", 1, 0, 0, 1, 1, 0.1, 0.1, 5),  # k = 0
    b"\x01\x10" + struct.pack("<IHBHHffI", 1, 2, 1, 1, 1, 0.1, 0.1, 5),  # 2 explicit seeds announced, 1 sent
    b"\x01\x10" + struct.pack("<IHBHHffI", 1, 1, 4, 1, 1, 0.1, 0.1, 5),  # unknown flag
    b"\x01\x11" + struct.pack("<IIf", 1, 1, 0.0),  # no scalars
    b"\x01\x11" + struct.pack("<IIf", 1, 1, 0.0) + b"\x00\x00",  # half a scalar
    b"\x01\x04" + bytes(4) + bytes(32) + b"\x01" + bytes(31),  # HMAC tag one byte short
    b"\x01\x02" + struct.pack("<IIHBB", 1, 10, 4, 9, 1),  # unknown format
    b"\x01\x03" + struct.pack("<IH", 1, 0),  # empty chunk
    b"\x01\x01" + struct.pack("<HBBBIHH", 1, 0, 0, 0, 1, 1, 0) + b"\x00\x00\x00",  # empty device id
    b"\x01\x01" + struct.pack("<HBBBIHH", 1, 0, 0, 0, 1, 1, 0) + b"\x02\xff\xfe\x00\x00",  # non-ASCII id
    b"\x01\x3f\x01\x00" + bytes(4) + b"x" * 49,  # error text too long
    b"\x01\x12" + struct.pack("<IIf", 1, 5, 0.5),  # ROUND_UPDATE without scalars
    b"\x01\x12" + struct.pack("<IIff", 1, 5, 0.5, 1.0) + b"\x00",  # ... with a partial scalar
    b"\x01\x12" + struct.pack("<IIf", 1, 5, 0.5) + bytes(4 * 257),  # ... with 257 scalars
    b"\x01\x12" + struct.pack("<IIff", 1 << 30, 5, 0.5, 1.0),  # ... round_id >= 2**30
    b"\x01\x12" + struct.pack("<II", 1, 5) + b"\x00\x00",  # ... cut inside lr
    b"\x02\x12" + struct.pack("<IIff", 1, 5, 0.5, 1.0),  # ... unknown version byte
])
def test_malformed_messages_raise_only_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(raw)


def test_encode_rejects_out_of_range_fields() -> None:
    for bad in (RoundResult(1 << 30, (0.0,), 0.0, 1), RoundStart(1, 2, 0.1, 0.1, seeds=(1,)),
                RoundStart(1, 1, 0.1, 0.1, round_seed=1, seeds=(1,)), Status(1, free_heap=-1),
                Hello("", "b", "f", (0, 0, 0), 0, 0), Hello("\u00e9", "b", "f", (0, 0, 0), 0, 0),
                RoundResult(1, (1e39,), 0.0, 1), ModelCommit(1, bytes(31), 0)):
        with pytest.raises(ProtocolError):
            encode(bad)


def _install(msgs: list, rx: ModelReceiver) -> list:
    return [r for r in (rx.handle(m) for m in msgs) if r is not None]


MODEL = bytes(range(256)) * 9 + b"tail"


@pytest.mark.parametrize("scheme", ["hmac", "ed25519"])
def test_signed_model_is_accepted_and_tampering_is_rejected(scheme: str) -> None:
    if scheme == "hmac":
        key = b"provisioned-device-key-32-bytes!"
        signer, verifier = Signer(hmac_key=key), Verifier(hmac_key=key)
        wrong = Verifier(hmac_key=b"another-key")
    else:
        sk = Ed25519PrivateKey.generate()
        signer, verifier = Signer(ed25519_key=sk), Verifier(ed25519_public=sk.public_key())
        wrong = Verifier(ed25519_public=Ed25519PrivateKey.generate().public_key())
    msgs = model_transfer(MODEL, 42, signer, chunk_size=100)
    assert len(msgs) == 2 + 24
    rx = ModelReceiver(verifier)
    assert _install(msgs, rx) == [Ack(M.T_MODEL_COMMIT, 42)] and rx.model == MODEL
    # a repeated chunk (QoS 1 redelivery) is harmless
    rx = ModelReceiver(verifier)
    assert _install(msgs[:3] + msgs[2:], rx) == [Ack(M.T_MODEL_COMMIT, 42)] and rx.model == MODEL

    def tampered(i: int, msg: object) -> list:
        out = list(msgs)
        out[i] = msg
        return out

    chunk = msgs[5]
    evil_chunk = ModelChunk(chunk.model_id, chunk.index, bytes([chunk.data[0] ^ 1]) + chunk.data[1:])
    commit = msgs[-1]
    cases = {
        "flipped model byte": (tampered(5, evil_chunk), M.E_HASH),
        "hash matches evil model, old tag": (
            tampered(5, evil_chunk)[:-1] + [ModelCommit(42, _sha(MODEL, chunk.index * 100, 1), commit.auth, commit.tag)], M.E_AUTH),
        "tag flipped": (tampered(-1, ModelCommit(42, commit.sha256, commit.auth, bytes([commit.tag[0] ^ 1]) + commit.tag[1:])),
                        M.E_AUTH),
        "unsigned": (tampered(-1, ModelCommit(42, commit.sha256, M.AUTH_NONE, b"")), M.E_AUTH),
        "missing chunk": (msgs[:4] + msgs[5:], M.E_SEQUENCE),
    }
    for what, (seq, code) in cases.items():
        rx = ModelReceiver(verifier)
        replies = _install(seq, rx)
        assert isinstance(replies[-1], Error) and replies[-1].code == code, what
        assert rx.model is None, what
    rx = ModelReceiver(wrong)
    assert _install(msgs, rx)[-1].code == M.E_AUTH and rx.model is None
    assert _install(msgs, ModelReceiver(verifier, max_size=100))[0].code == M.E_NO_MEMORY


def _sha(model: bytes, at: int, xor: int) -> bytes:
    import hashlib

    evil = bytearray(model)
    evil[at] ^= xor
    return hashlib.sha256(evil).digest()


def test_round_parameter_limits() -> None:
    ok = RoundStart(1, 16, 1e-3, 0.01, 1, 8, round_seed=1)
    assert check_round(ok) is None
    small = RoundLimits(max_k=8)
    assert check_round(ok, small).code == M.E_RANGE and "k" in check_round(ok, small).text
    for bad in (RoundStart(1, 1, float("nan"), 0.01, 1, 1, round_seed=1), RoundStart(1, 1, 2.0, 0.01, 1, 1, round_seed=1),
                RoundStart(1, 1, 1e-3, float("inf"), 1, 1, round_seed=1), RoundStart(1, 1, 1e-3, -1.0, 1, 1, round_seed=1),
                RoundStart(1, 1, 1e-3, 0.01, 0, 1, round_seed=1), RoundStart(1, 1, 1e-3, 0.01, 1, 0, round_seed=1)):
        err = check_round(decode(encode(bad)))
        assert err is not None and err.code == M.E_RANGE and err.ref_id == 1


def test_round_update_limits() -> None:
    ok = RoundUpdate(3, 0xFFFFFFFF, 10.0, (0.0, -1e38, 3.4e38))
    assert check_update(ok) is None and check_update(RoundUpdate(3, 1, -0.0, (1.0,))) is None
    assert check_update(ok, RoundLimits(max_k=2)).text == "out of range: k"
    for bad, what in ((RoundUpdate(3, 1, float("nan"), (1.0,)), "lr"), (RoundUpdate(3, 1, 10.5, (1.0,)), "lr"),
                      (RoundUpdate(3, 1, -1.0, (1.0,)), "lr"), (RoundUpdate(3, 1, 0.5, (1.0, float("inf"))), "gbar"),
                      (RoundUpdate(3, 1, 0.5, (float("nan"),)), "gbar")):
        err = check_update(decode(encode(bad)))  # the codec carries any float32; the device range-checks
        assert err == Error(M.E_RANGE, 0x12, 3, f"out of range: {what}"), bad
    for bad in (RoundUpdate(1, 1 << 32, 0.5, (1.0,)), RoundUpdate(1 << 30, 1, 0.5, (1.0,)), RoundUpdate(1, 1, 0.5, ()),
                RoundUpdate(1, 1, 0.5, (0.0,) * 257), RoundUpdate(1, 1, 0.5, (1e39,))):
        with pytest.raises(ProtocolError):
            encode(bad)
