"""Serial framing: COBS, CRC-32, the streaming decoder's resync, and the ack/retransmit link over real ptys."""

from __future__ import annotations

import os
import random
import threading

import pytest

from toolchain.contracts.wire.crc import crc32_halves_reference
from toolchain.contracts.wire.errors import ProtocolError
from toolchain.contracts.wire.framing import decode_body, max_encoded_len
from toolchain.fleet import Frame, FrameDecoder, LinkError, SerialLink, cobs_decode, cobs_encode, crc32, encode_frame
from toolchain.fleet.pty_relay import LineFaults, PtyRelay

pytestmark = pytest.mark.timeout(120)  # a hung link or emulator fails the test instead of CI


@pytest.mark.parametrize("n", [0, 1, 2, 253, 254, 255, 256, 507, 508, 509, 1000])
def test_cobs_roundtrip_and_overhead(n: int) -> None:
    rng = random.Random(n)
    for zeros in (0.0, 0.05, 0.5, 1.0):
        data = bytes(0 if rng.random() < zeros else rng.randrange(1, 256) for _ in range(n))
        enc = cobs_encode(data)
        assert 0 not in enc
        assert len(enc) <= n + 1 + n // 254
        assert cobs_decode(enc) == data


def test_cobs_rejects_bad_input() -> None:
    for bad in (b"\x00", b"\x05\x01", b"\x03\x01\x00", b"\x02"[:0] + b"\x09abc"):
        with pytest.raises(ProtocolError):
            cobs_decode(bad)


def test_crc32_matches_device_algorithm_and_known_value() -> None:
    assert crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value
    rng = random.Random(1)
    for n in (0, 1, 7, 100, 600):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert crc32(data) == crc32_halves_reference(data)


def test_frame_roundtrip_and_layout() -> None:
    f = Frame(0xBEEF, b"\x01\x21")
    wire = encode_frame(f)
    assert wire[-1] == 0 and 0 not in wire[:-1]
    body = cobs_decode(wire[:-1])
    assert body[:3] == b"\x00\xef\xbe" and body[3:5] == b"\x01\x21"
    assert int.from_bytes(body[-4:], "little") == crc32(body[:-4])
    assert decode_body(body) == f
    assert FrameDecoder().feed(encode_frame(Frame(7, ack=True))) == [Frame(7, ack=True)]
    assert len(encode_frame(Frame(7, ack=True))) == 9
    for bad in (Frame(1 << 16, b"x"), Frame(1), Frame(1, b"x", ack=True)):
        with pytest.raises(ProtocolError):
            encode_frame(bad)


def test_decoder_any_split_gives_the_same_frames() -> None:
    rng = random.Random(2)
    frames = [Frame(i, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 700)))) for i in range(60)]
    stream = b"".join(encode_frame(f) for f in frames)
    for _ in range(5):
        dec = FrameDecoder()
        got, i = [], 0
        while i < len(stream):
            step = rng.randrange(1, 300)
            got += dec.feed(stream[i : i + step])
            i += step
        assert got == frames and dec.frames_bad == 0


def test_decoder_resyncs_after_garbage_and_counts_bad_frames() -> None:
    rng = random.Random(3)
    good = [Frame(i, bytes([1, 0x21]) + bytes(rng.randrange(256) for _ in range(30))) for i in range(200)]
    stream = bytearray(os.urandom(0) + bytes(rng.randrange(1, 256) for _ in range(500)))  # line noise, no 0x00
    for f in good:
        stream += bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))  # garbage, zeros included
        stream += b"\x00" + encode_frame(f)  # senders put a 0x00 before a frame after noise
    dec = FrameDecoder()
    got = dec.feed(bytes(stream))
    assert got == good
    assert dec.frames_bad > 0


def test_corrupted_dropped_and_oversize_frames_are_dropped_not_raised() -> None:
    frames = [encode_frame(Frame(i, bytes([1, 0x20]) + bytes(range(1, 40)))) for i in range(4)]
    flipped = bytearray(frames[0])
    flipped[5] ^= 0x10
    truncated = frames[1][:10] + frames[1][11:]  # one byte lost on the line
    dec = FrameDecoder(max_message=64)
    huge = encode_frame(Frame(9, b"\x01" * 200))  # over this decoder's limit
    got = dec.feed(bytes(flipped) + truncated + huge + frames[2] + b"\x00\x00\x00" + frames[3])
    assert [f.seq for f in got] == [2, 3]
    assert dec.frames_bad == 3 and dec.frames_ok == 2
    assert dec.max_encoded == max_encoded_len(64)


def _exchange(relay: PtyRelay, n: int, size: int, **kw: object) -> tuple[SerialLink, SerialLink, list, list]:
    a = SerialLink.open(relay.a_path, **kw)  # type: ignore[arg-type]
    b = SerialLink.open(relay.b_path, **kw)  # type: ignore[arg-type]
    rng = random.Random(4)
    sent_ab = [bytes([1, 0x11]) + i.to_bytes(4, "little") + bytes(rng.randrange(256) for _ in range(size)) for i in range(n)]
    sent_ba = [bytes([1, 0x20]) + i.to_bytes(4, "little") + bytes(rng.randrange(256) for _ in range(size)) for i in range(n)]
    got_ab: list[bytes] = []
    got_ba: list[bytes] = []

    def pump(src: SerialLink, msgs: list[bytes]) -> None:
        for m in msgs:
            src.send(m)

    def drain(dst: SerialLink, out: list[bytes]) -> None:
        while len(out) < n:
            m = dst.recv(10)
            if m is None:
                return
            out.append(m)

    threads = [threading.Thread(target=pump, args=(a, sent_ab)), threading.Thread(target=pump, args=(b, sent_ba)),
               threading.Thread(target=drain, args=(b, got_ab)), threading.Thread(target=drain, args=(a, got_ba))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got_ab == sent_ab, "a->b lost, reordered or duplicated a message"
    assert got_ba == sent_ba, "b->a lost, reordered or duplicated a message"
    return a, b, got_ab, got_ba


def test_serial_link_clean_pty_pair() -> None:
    with PtyRelay() as relay:
        a, b, _, _ = _exchange(relay, 100, 40)
        assert a.stats.retransmits == 0 and b.stats.duplicates == 0 and a.decoder.frames_bad == 0
        a.close()
        b.close()


def test_serial_link_survives_corruption_drops_and_garbage_without_loss_or_duplicates() -> None:
    faults = [LineFaults(corrupt=0.08, drop=0.08, garbage=0.08, seed=s) for s in (11, 12)]
    with PtyRelay(faults_ab=faults[0], faults_ba=faults[1]) as relay:
        a, b, _, _ = _exchange(relay, 80, 60, ack_timeout=0.03, retries=40)
        assert faults[0].injected > 10 and faults[1].injected > 10
        # The faults really hit: frames were dropped, so messages were resent, and some resends were
        # repeats of messages already delivered (their ack was lost) that the seq check discarded.
        assert a.stats.retransmits + b.stats.retransmits > 5
        assert a.decoder.frames_bad + b.decoder.frames_bad > 5
        assert a.stats.duplicates + b.stats.duplicates > 0
        a.close()
        b.close()


def test_serial_link_gives_up_with_link_error_when_nobody_answers() -> None:
    with PtyRelay() as relay:
        a = SerialLink.open(relay.a_path, ack_timeout=0.02, retries=2)
        with pytest.raises(LinkError):
            a.send(b"\x01\x21")
        assert a.stats.retransmits == 2
        a.close()
