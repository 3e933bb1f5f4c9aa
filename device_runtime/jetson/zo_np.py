"""The ZO contract's PRNG and update (docs/zo.md) in numpy, for the Jetson (Python 3.8, no toolchain import)."""

from __future__ import annotations

import numpy as np

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)


def hash32(x: np.ndarray) -> np.ndarray:
    """lowbias32 on uint32 arrays (mod 2**32)."""
    x = np.asarray(x, np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * _M1
        x = x ^ (x >> np.uint32(15))
        x = x * _M2
        x = x ^ (x >> np.uint32(16))
    return x


def derive(seed: int, k: int) -> int:
    """Key of stream ``k`` under ``seed``: ``H(seed ^ H(0x9E3779B9 ^ k))``."""
    inner = int(hash32(np.array([0x9E3779B9 ^ k], np.uint32))[0])
    return int(hash32(np.array([(seed ^ inner) & 0xFFFFFFFF], np.uint32))[0])


def signs(key: int, n: int) -> np.ndarray:
    """z_p in {-1, +1} (float32) for canonical positions 0..n-1 of the stream ``key``."""
    p = np.arange(n, dtype=np.uint32)
    w = hash32(np.uint32(key) ^ (p >> np.uint32(5)))
    bits = (w >> (p & np.uint32(31))) & np.uint32(1)
    return bits.astype(np.float32) * np.float32(2) - np.float32(1)


def update(w: np.ndarray, seed: int, lr: float, gbar) -> None:
    """In place: for k in order, ``w = f32(w - a_k z_k)``, ``a_k = f32(f32(f32(lr) f32(g_k)) / K)``."""
    g = np.asarray(gbar, np.float32)
    coef = (np.float32(lr) * g) / np.float32(g.size)
    for k in range(g.size):
        w -= coef[k] * signs(derive(seed, k), w.size)
