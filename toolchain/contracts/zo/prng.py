"""Counter-based sign streams of the ZO contract (docs/zo.md), vectorised with numpy.

Bit-identical to the device reference ``device_runtime/micropython/zo.py``: there the same
32-bit maths runs on 16-bit limbs so that MicroPython never leaves its small-int range.
"""

from __future__ import annotations

import numpy as np

MASK32 = 0xFFFFFFFF
STREAM_SALT = 0x9E3779B9  # golden-ratio constant: keeps H(salt ^ i) away from the fixed point H(0) = 0
MUL1 = 0x7FEB352D  # lowbias32 constants (C. Wellons, "hash-prospector")
MUL2 = 0x846CA68B


def hash32(x: int) -> int:
    """lowbias32 of one 32-bit integer (the contract's H)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def hash32_np(x: np.ndarray) -> np.ndarray:
    """lowbias32 elementwise over a ``uint32`` array (wrapping multiplies are the mod 2**32 of the spec)."""
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(MUL1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(MUL2)
    return x ^ (x >> np.uint32(16))


def derive(seed: int, i: int) -> int:
    """Key of stream ``i`` under ``seed``: ``H(seed ^ H(STREAM_SALT ^ i))``.

    Direction k of a round uses ``derive(round_seed, k)``; a server may also derive round seeds
    from a master seed the same way (``derive(master, t)``).
    """
    if not 0 <= i < 1 << 30:
        raise ValueError(f"stream index {i} outside [0, 2**30)")
    return hash32((seed & MASK32) ^ hash32(STREAM_SALT ^ i))


def direction_keys(round_seed: int, k: int) -> list[int]:
    """Keys of directions 0..k-1 of a round."""
    return [derive(round_seed, j) for j in range(k)]


def words(key: int, start: int, count: int) -> np.ndarray:
    """Raw 32-bit words ``start .. start+count-1`` of the stream with ``key`` (word j = H(key ^ j))."""
    if start < 0 or start + count > 1 << 25:
        raise ValueError("word index outside [0, 2**25): canonical positions must stay below 2**30")
    j = np.arange(start, start + count, dtype=np.uint32)
    return hash32_np(np.uint32(key & MASK32) ^ j)


def sign_bits(key: int, n: int, offset: int = 0) -> np.ndarray:
    """Bits of canonical positions ``offset .. offset+n-1`` (bit p&31, LSB first, of word p>>5), as uint8."""
    if n <= 0:
        return np.zeros(0, dtype=np.uint8)
    w0 = offset >> 5
    w = words(key, w0, ((offset + n - 1) >> 5) - w0 + 1)
    bits = np.unpackbits(w.astype("<u4").view(np.uint8), bitorder="little")
    start = offset - (w0 << 5)
    return bits[start : start + n]


def signs(key: int, n: int, offset: int = 0, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Rademacher signs z in {-1, +1} of positions ``offset .. offset+n-1`` (bit 1 -> +1, bit 0 -> -1)."""
    return (sign_bits(key, n, offset).astype(np.int8) * 2 - 1).astype(dtype)
