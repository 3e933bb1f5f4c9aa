# ZO contract reference (docs/zo.md) for CPython and MicroPython 1.9.2 .. 1.29.
# Integers stay < 2**30 (small ints: the PRNG allocates nothing); hash results come back in
# the reused list _r = [high 16 bits, low 16 bits]; weights are float32 array('f') buffers.
from array import array

_r = [0, 0]
_f = array('f', [0.0])


def f32(x):
    # round to float32 (on double ports too: double rounding of +-*/ is innocuous)
    _f[0] = x
    return _f[0]


def _m(hi, lo, a, b, c, d):
    # (hi:lo) * 0xaabbccdd mod 2**32 from 16 x 8-bit products: intermediates < 2**26
    p = lo * c
    t = lo * d + ((p & 255) << 8)
    _r[0] = ((t >> 16) + (p >> 8) + hi * d + ((hi * c & 255) << 8) + lo * b + ((lo * a & 255) << 8)) & 65535
    _r[1] = t & 65535


def h(hi, lo):
    # lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16
    _m(hi, lo ^ hi, 0x7f, 0xeb, 0x35, 0x2d)
    hi = _r[0]
    lo = _r[1]
    _m(hi ^ hi >> 15, lo ^ ((hi << 1 | lo >> 15) & 65535), 0x84, 0x6c, 0xa6, 0x8b)
    _r[1] ^= _r[0]


def key(shi, slo, k):
    # key of stream k (direction k) under seed shi:slo = H(seed ^ H(0x9e3779b9 ^ k))
    h(0x9e37 ^ k >> 16, 0x79b9 ^ k & 65535)
    h(shi ^ _r[0], slo ^ _r[1])


def add(w, kh, kl, a, off=0, idx=None):
    # w[i] += f32(a) * z[off + i]; z[p] = +1 if bit p & 31 (LSB first) of word
    # H(key ^ (p >> 5)) is 1, else -1. idx maps canonical positions to slots of w.
    a = f32(a)
    b = -a
    for i in range(len(w) if idx is None else len(idx)):
        p = off + i
        if i == 0 or p & 31 == 0:
            h(kh ^ p >> 21, kl ^ p >> 5 & 65535)
        j = i if idx is None else idx[i]
        w[j] += a if _r[1 - (p >> 4 & 1)] >> (p & 15) & 1 else b


def update(w, shi, slo, lr, gs, off=0, idx=None):
    # w -= a_k z_k for k = 0 .. K-1 in order, a_k = f32(f32(f32(lr) * f32(g_k)) / K)
    for k in range(len(gs)):
        key(shi, slo, k)
        add(w, _r[0], _r[1], -f32(f32(f32(lr) * f32(gs[k])) / len(gs)), off, idx)


def probe(w, shi, slo, mu, loss, out, mode=0, off=0, idx=None, w0=None):
    # out[k] = ZO scalar of direction k (K = len(out)), perturbing w in place. Restore is
    # exact from the copy w0 (array('f', w)) if given, else by subtraction (<= 1 ulp drift).
    # mode 0 forward (L+ - L0) / mu, returns L0 = L(w); 1 central (L+ - c) / mu with
    # c = (L+ + L-) / 2, L- at (w + mu z) - 2 mu z, returns mean c; 2 one-point L+ / mu,
    # returns mean L+.
    mu = f32(mu)
    l0 = loss() if mode == 0 else 0.0
    s = 0.0
    for k in range(len(out)):
        key(shi, slo, k)
        kh = _r[0]
        kl = _r[1]
        add(w, kh, kl, mu, off, idx)
        lp = loss()
        c = l0
        if mode == 1:
            add(w, kh, kl, -2 * mu, off, idx)
            c = (lp + loss()) / 2
            s += c - lp
        if w0 is None:
            add(w, kh, kl, mu if mode == 1 else -mu, off, idx)
        else:
            for i in range(len(w)):
                w[i] = w0[i]
        out[k] = (lp - c) / mu
        s += lp
    return l0 if mode == 0 else s / len(out)
