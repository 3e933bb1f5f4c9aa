"""Fuzzing the host decoders (and the device decoder under MicroPython): >100k inputs, only ProtocolError,
no hang. A seeded mutation fuzzer (reproducible) plus hypothesis for shrinking on failure."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_protocol_device import host_verdict, run

from toolchain.contracts.wire.framing import SEQ_MOD
from toolchain.deploy.emulators.wasm import available
from toolchain.fleet import (
    Ack,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    ModelBegin,
    ModelChunk,
    ModelCommit,
    Ping,
    ProtocolError,
    RoundResult,
    RoundStart,
    RoundUpdate,
    Status,
    check_update,
    decode,
    encode,
    encode_frame,
)

pytestmark = pytest.mark.timeout(120)  # a hung link or emulator fails the test instead of CI

HANG = 1.0  # seconds: any single input taking this long counts as a hang (decoders are linear-time)

SEEDS = [
    encode(m)
    for m in (
        Hello("esp32-7", "esp32", "micropython 1.29", (0, 1, 0), 120_000, 1024, 0x3F, 9),
        ModelBegin(3, 5000, 128), ModelChunk(3, 7, bytes(range(128))), ModelCommit(3, bytes(32), 1, bytes(32)),
        ModelCommit(3, bytes(32), 2, bytes(64)), RoundStart(1, 4, 1e-3, 0.01, 1, 8, round_seed=5),
        RoundStart(1, 3, 1e-3, 0.01, 1, 8, seeds=(1, 2, 3)), RoundResult(1, (0.5, -0.25, 1.0), 2.0, 32),
        Status(2, 10, 9000, 1, 3), Ping(), Ack(4, 3), Error(8, 4, 3, "bad signature"),
        RoundUpdate(2, 0xDEADBEEF, 0.5, (1.5, -2.25, 0.0, 3.0)), RoundUpdate(7, 3, 0.01, (0.25,)),
    )
]


def _has_nan(msg: object) -> bool:
    vals = [getattr(msg, f) for f in getattr(msg, "__dataclass_fields__", {})]
    vals += [v for t in vals if isinstance(t, tuple) for v in t]
    return any(isinstance(v, float) and v != v for v in vals)


def assert_canonical(msg: object, raw: bytes) -> None:
    """Anything accepted re-encodes to the same bytes (signalling NaNs excepted: float() quiets them)."""
    again = encode(msg)  # type: ignore[arg-type]
    if _has_nan(msg):
        assert encode(decode(again)) == again and len(again) == len(raw)
    else:
        assert again == raw, raw.hex()


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(8)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2 and b:
            at = rng.randrange(len(b))
            del b[at : at + rng.randrange(1, 8)]
        elif op == 3:
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 4 and b:
            b = b[: rng.randrange(len(b))]
        elif op == 5:
            other = rng.choice(SEEDS)
            cut = rng.randrange(len(other) + 1)
            b = b[: rng.randrange(len(b) + 1)] + other[cut:]  # splice two messages
        elif op == 6 and len(b) > 6:
            at = rng.randrange(2, len(b) - 3)
            b[at : at + 4] = rng.choice((b"\xff\xff\xff\xff", b"\x00\x00\x00\x40", b"\x00\x00\xc0\x7f", b"\x00\x01\x00\x00"))
        else:
            b = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 40)))  # pure noise
    return bytes(b)


def test_message_decoder_mutation_fuzz_60k() -> None:
    rng = random.Random(1234)
    accepted = 0
    worst = 0.0
    for _ in range(60_000):
        raw = mutate(rng, rng.choice(SEEDS))
        t = time.perf_counter()
        try:
            msg = decode(raw)
        except ProtocolError:
            pass
        else:
            accepted += 1
            assert_canonical(msg, raw)
        worst = max(worst, time.perf_counter() - t)
    assert worst < HANG
    assert 100 < accepted < 60_000  # the mutations reach both outcomes


def test_frame_decoder_mutation_fuzz_40k() -> None:
    rng = random.Random(99)
    worst = 0.0
    total_frames = total_bad = 0
    for n in range(40_000):
        frames = [encode_frame(Frame(rng.randrange(SEQ_MOD), rng.choice(SEEDS))) for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.2:
            frames.append(encode_frame(Frame(rng.randrange(SEQ_MOD), ack=True)))
        stream = b"".join(mutate(rng, f) if rng.random() < 0.7 else f for f in frames)
        dec = FrameDecoder(max_message=256 if n % 2 else 4096)
        t = time.perf_counter()
        got = []
        i = 0
        while i < len(stream):  # arbitrary chunking
            step = rng.randrange(1, 64)
            got += dec.feed(stream[i : i + step])
            i += step
        worst = max(worst, time.perf_counter() - t)
        assert len(got) <= stream.count(0)
        for f in got:
            assert 0 <= f.seq < SEQ_MOD and f.ack == (f.message == b"")
            assert len(f.message) <= (256 if n % 2 else 4096)
        assert dec.frames_ok == len(got)
        total_frames += len(got)
        total_bad += dec.frames_bad
    assert worst < HANG
    assert total_frames > 10_000 and total_bad > 10_000


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_decode_random_bytes_only_raises_protocol_error(raw: bytes) -> None:
    try:
        msg = decode(raw)
    except ProtocolError:
        return
    assert_canonical(msg, raw)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=1100), st.sampled_from([b"\x01\x12", b"\x02\x12"]))
def test_round_update_payloads_only_raise_protocol_error(payload: bytes, head: bytes) -> None:
    # random bytes almost never start with 01 12: aim at ROUND_UPDATE (and its wrong-version twin) directly
    try:
        msg = decode(head + payload)
    except ProtocolError:
        return
    assert isinstance(msg, RoundUpdate) and head == b"\x01\x12" and 1 <= len(msg.gbar) <= 256
    assert len(payload) == 12 + 4 * len(msg.gbar)
    assert_canonical(msg, head + payload)
    err = check_update(msg)  # the device-side range check never raises either
    assert err is None or err.code == 4


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=6), st.integers(1, 50))
def test_frame_decoder_random_streams_never_raise(parts: list[bytes], step: int) -> None:
    stream = b"\x00".join(parts)
    dec = FrameDecoder(max_message=64)
    for i in range(0, len(stream), step):
        for f in dec.feed(stream[i : i + step]):
            assert f.ack == (f.message == b"")


def test_device_decoder_agrees_with_host_on_10k_mutated_frames() -> None:
    """The MicroPython codec never raises on garbage and accepts exactly the frames the host accepts."""
    if not available():
        pytest.skip("MicroPython WebAssembly not installed (npm ci)")
    rng = random.Random(7)
    stream = bytearray()
    for _ in range(10_000):
        f = encode_frame(Frame(rng.randrange(SEQ_MOD), rng.choice(SEEDS)) if rng.random() < 0.9
                         else Frame(rng.randrange(SEQ_MOD), ack=True))
        stream += b"\x00" + (mutate(rng, f) if rng.random() < 0.8 else f)
    out = run(
        "p = proto.Proto(300, 0, 64)\n"
        f"d = {bytes(stream)!r}\n"
        "i = 0\n"
        "while i < len(d):\n"
        "    i = p.feed(d, i)\n"
        "    if p.kind == 1:\n"
        "        print(1, p.fseq, p.msg()[0])\n"
        "        p.last = -1\n"
        "    elif p.kind == 3:\n"
        "        print(3, p.fseq)\n"
        "print('bad', p.bad)\n",
        heap=8 * 1024 * 1024,
    )
    dec = FrameDecoder(max_message=300)
    want = [f"3 {f.seq}" if f.ack else f"1 {f.seq} {host_verdict(f.message)}" for f in dec.feed(bytes(stream))]
    assert out[:-1] == want
    assert out[-1] == f"bad {dec.frames_bad}" and dec.frames_bad > 3000
