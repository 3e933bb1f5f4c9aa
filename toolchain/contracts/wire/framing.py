"""Serial framing: ``COBS(flags | seq | message | crc32) 0x00`` and a streaming decoder that resynchronises.

See docs/protocol.md, "Serial framing". The decoder never raises on bad input: a frame that fails COBS,
length, flag or CRC checks is dropped and counted, and decoding resumes after the next 0x00.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from toolchain.contracts.wire.cobs import cobs_decode, cobs_encode
from toolchain.contracts.wire.crc import crc32
from toolchain.contracts.wire.errors import ProtocolError

DELIMITER = 0x00
FLAG_ACK = 0x01
KNOWN_FLAGS = FLAG_ACK
HEADER_LEN = 3  # flags u8, seq u16 LE
CRC_LEN = 4
MIN_BODY = HEADER_LEN + CRC_LEN
DEFAULT_MAX_MESSAGE = 4096
SEQ_MOD = 1 << 16


@dataclass(frozen=True)
class Frame:
    """One decoded frame: an ACK (``message`` empty) or a DATA frame carrying one message's bytes."""

    seq: int
    message: bytes = b""
    ack: bool = False


def encode_frame(frame: Frame) -> bytes:
    """Bytes on the wire for ``frame``, delimiter included."""
    if not 0 <= frame.seq < SEQ_MOD:
        raise ProtocolError(f"seq {frame.seq} out of range 0..65535")
    if frame.ack and frame.message:
        raise ProtocolError("an ACK frame carries no message")
    if not frame.ack and not frame.message:
        raise ProtocolError("a DATA frame carries a message")
    body = struct.pack("<BH", FLAG_ACK if frame.ack else 0, frame.seq) + frame.message
    body += struct.pack("<I", crc32(body))
    return cobs_encode(body) + b"\x00"


def decode_body(body: bytes) -> Frame:
    """Check and split one COBS-decoded frame body; raises :class:`ProtocolError` if it is bad."""
    if len(body) < MIN_BODY:
        raise ProtocolError("frame too short")
    (crc,) = struct.unpack_from("<I", body, len(body) - CRC_LEN)
    if crc32(body[:-CRC_LEN]) != crc:
        raise ProtocolError("frame CRC mismatch")
    flags, seq = struct.unpack_from("<BH", body, 0)
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError("unknown frame flags")
    message = body[HEADER_LEN:-CRC_LEN]
    ack = bool(flags & FLAG_ACK)
    if ack == bool(message):  # ACK frames are empty, DATA frames are not
        raise ProtocolError("frame kind and length disagree")
    return Frame(seq=seq, message=message, ack=ack)


def max_encoded_len(max_message: int) -> int:
    """Longest COBS-encoded frame (without delimiter) for messages up to ``max_message`` bytes."""
    body = MIN_BODY + max_message
    return body + 1 + body // 254


class FrameDecoder:
    """Streaming decoder: feed it any bytes, get whole good frames back; bad ones are dropped and counted."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_encoded = max_encoded_len(max_message)
        self._buf = bytearray()
        self._overflow = False  # an over-long frame is being skipped up to the next delimiter
        self.frames_ok = 0
        self.frames_bad = 0
        self.bytes_in = 0

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        self.bytes_in += len(data)
        out: list[Frame] = []
        start = 0
        while True:
            end = data.find(b"\x00", start)
            chunk = data[start:] if end < 0 else data[start:end]
            if not self._overflow:
                self._buf += chunk
                if len(self._buf) > self.max_encoded:
                    self._buf.clear()
                    self._overflow = True
            if end < 0:
                return out
            self._complete(out)
            start = end + 1

    def _complete(self, out: list[Frame]) -> None:
        if self._overflow:
            self._overflow = False
            self.frames_bad += 1
            return
        raw = bytes(self._buf)
        self._buf.clear()
        if not raw:  # back-to-back delimiters are idle fill, not errors
            return
        try:
            frame = decode_body(cobs_decode(raw))
        except ProtocolError:
            self.frames_bad += 1
            return
        self.frames_ok += 1
        out.append(frame)
