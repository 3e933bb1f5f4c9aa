"""CRC-32 (IEEE 802.3, the zlib/binascii polynomial) used by the serial framing."""

from __future__ import annotations

import zlib


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 of ``data`` as an unsigned 32-bit int; equal to ``binascii.crc32`` and the device's nibble table."""
    return zlib.crc32(data) & 0xFFFFFFFF


def crc32_halves_reference(data: bytes) -> int:
    """The device algorithm (4-bit table, two 16-bit halves) in Python, kept to document and test it."""
    lo_tab, hi_tab = _nibble_tables()
    lo, hi = 0xFFFF, 0xFFFF
    for byte in data:
        for nib in (byte & 0xF, byte >> 4):
            i = (lo ^ nib) & 0xF
            lo = ((lo >> 4) | ((hi & 0xF) << 12)) ^ lo_tab[i]
            hi = (hi >> 4) ^ hi_tab[i]
    return ((hi << 16) | lo) ^ 0xFFFFFFFF


def _nibble_tables() -> tuple[list[int], list[int]]:
    lo_tab, hi_tab = [], []
    for n in range(16):
        c = n
        for _ in range(4):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
        lo_tab.append(c & 0xFFFF)
        hi_tab.append(c >> 16)
    return lo_tab, hi_tab
