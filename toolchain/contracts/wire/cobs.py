"""Consistent Overhead Byte Stuffing: removes every 0x00 so 0x00 can delimit frames on a byte stream."""

from __future__ import annotations

from toolchain.contracts.wire.errors import ProtocolError


def cobs_encode(data: bytes | bytearray) -> bytes:
    """COBS-encode ``data`` (output has no 0x00; length is len(data) + 1 + len(data) // 254)."""
    out = bytearray(b"\x00")
    code_at, code = 0, 1
    for byte in data:
        if byte:
            out.append(byte)
            code += 1
        if not byte or code == 0xFF:
            out[code_at] = code
            code_at, code = len(out), 1
            out.append(0)
    out[code_at] = code
    return bytes(out)


def cobs_decode(data: bytes | bytearray) -> bytes:
    """Invert :func:`cobs_encode`; raises :class:`ProtocolError` on a 0x00 or a code that overruns the input."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0 or i + code > n:
            raise ProtocolError("COBS: bad code byte")
        block = data[i + 1 : i + code]
        if 0 in block:
            raise ProtocolError("COBS: 0x00 inside a block")
        out += block
        i += code
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)
