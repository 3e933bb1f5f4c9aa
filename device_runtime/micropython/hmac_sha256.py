# HMAC-SHA256 for model bundles (docs/protocol.md). hashlib.sha256 if the port has it,
# else pure SHA-256 on 16-bit halves (ints < 2**30). micro:bit 1.9.2 has no hashlib.
import struct
from array import array

# constants as u16 (high, low) pairs in raw bytes: 144 int literals cost heap to compile
_K = array('H', bytearray(b"\x8aB\x98/7q\x91D\xc0\xb5\xcf\xfb\xb5\xe9\xa5\xdbV9[\xc2\xf1Y\xf1\x11?\x92\xa4\x82\x1c\xab\xd5^\x07\xd8\x98\xaa\x83\x12\x01[1$\xbe\x85\x0cU\xc3}\xbert]\xde\x80\xfe\xb1\xdc\x9b\xa7\x06\x9b\xc1t\xf1\x9b\xe4\xc1i\xbe\xef\x86G\xc1\x0f\xc6\x9d\x0c$\xcc\xa1\xe9-o,tJ\xaa\x84\xb0\\\xdc\xa9\xf9v\xda\x88>\x98RQ1\xa8m\xc6\x03\xb0\xc8'Y\xbf\xc7\x7f\xe0\xc6\xf3\x0b\xa7\xd5G\x91\xca\x06Qc)\x14g)\xb7'\x85\n\x1b.8!,M\xfcm8S\x13\r\neTsjv\xbb\n\xc2\x81.\xc9r\x92\x85,\xbf\xa2\xa1\xe8\x1a\xa8KfK\xc2p\x8bl\xc7\xa3Q\x92\xd1\x19\xe8\x99\xd6$\x06\x0e\xf4\x855j\x10p\xa0\xa4\x19\x16\xc17\x1e\x08lH'Lw\xb04\xb5\xbc\x1c9\xb3\x0c\xd8NJ\xaa\x9c[O\xca.h\xf3o\x8ft\xee\x82\xa5xoc\xc8\x84\x14x\xc7\x8c\x08\x02\xbe\x90\xfa\xffP\xa4\xebl\xf9\xbe\xf7\xa3q\xc6\xf2x"))
_IV = bytearray(b'\tjg\xe6g\xbb\x85\xaen<r\xf3O\xa5:\xf5\x0eQ\x7fR\x05\x9b\x8ch\x83\x1f\xab\xd9\xe0[\x19\xcd')
_W = array('H', bytearray(256))  # schedule: word t = (_W[2t], _W[2t+1])
_V = array('H', bytearray(32))
_o = [0, 0]


def _x(h, l, n, rot):
    # _o ^= rotr(w, n) or w >> n; bits are masked before shifting up
    if n > 15:
        t = h
        h = l
        l = t
        n -= 16
    k = 16 - n
    m = (1 << n) - 1
    if rot:
        _o[0] ^= (h >> n) | ((l & m) << k)
    else:
        _o[0] ^= h >> n
    _o[1] ^= (l >> n) | ((h & m) << k)


def _sig(h, l, a, b, c, rot):
    _o[0] = 0
    _o[1] = 0
    _x(h, l, a, 1)
    _x(h, l, b, 1)
    _x(h, l, c, rot)


def _block(H, B):
    W = _W
    for t in range(16):
        W[2 * t] = B[4 * t] << 8 | B[4 * t + 1]
        W[2 * t + 1] = B[4 * t + 2] << 8 | B[4 * t + 3]
    for t in range(32, 128, 2):
        _sig(W[t - 30], W[t - 29], 7, 18, 3, 0)
        lo = W[t - 31] + _o[1] + W[t - 13]
        hi = W[t - 32] + _o[0] + W[t - 14]
        _sig(W[t - 4], W[t - 3], 17, 19, 10, 0)
        lo += _o[1]
        W[t + 1] = lo & 65535
        W[t] = (hi + _o[0] + (lo >> 16)) & 65535
    V = _V
    for i in range(16):
        V[i] = H[i]
    o = 0  # the working variables rotate through V instead of being moved: a is V[2o:2o+2]
    for t in range(0, 128, 2):
        e = 2 * (o + 4 & 7)
        f = 2 * (o + 5 & 7)
        g = 2 * (o + 6 & 7)
        h = 2 * (o + 7 & 7)
        _sig(V[e], V[e + 1], 6, 11, 25, 1)
        lo = V[h + 1] + _o[1] + (V[e + 1] & V[f + 1] ^ (V[e + 1] ^ 65535) & V[g + 1]) + _K[t + 1] + W[t + 1]
        hi = V[h] + _o[0] + (V[e] & V[f] ^ (V[e] ^ 65535) & V[g]) + _K[t] + W[t] + (lo >> 16)
        t1 = lo & 65535
        t0 = hi & 65535
        a = 2 * o
        b = 2 * (o + 1 & 7)
        c = 2 * (o + 2 & 7)
        d = 2 * (o + 3 & 7)
        _sig(V[a], V[a + 1], 2, 13, 22, 1)
        lo = _o[1] + (V[a + 1] & V[b + 1] ^ V[a + 1] & V[c + 1] ^ V[b + 1] & V[c + 1]) + t1
        hi = _o[0] + (V[a] & V[b] ^ V[a] & V[c] ^ V[b] & V[c]) + t0
        x = V[d + 1] + t1
        V[d] = V[d] + t0 + (x >> 16) & 65535
        V[d + 1] = x & 65535
        V[h] = hi + (lo >> 16) & 65535
        V[h + 1] = lo & 65535
        o = o + 7 & 7
    for i in range(0, 16, 2):
        lo = H[i + 1] + V[i + 1]
        H[i] = H[i] + V[i] + (lo >> 16) & 65535
        H[i + 1] = lo & 65535


class PureSha256:
    # hashlib.sha256 work-alike, inputs < 128 MiB
    def __init__(self, data=b''):
        self.h = array('H', _IV)
        self.b = bytearray(64)
        self.n = 0
        self.t = 0
        self.update(data)

    def update(self, data):
        b = self.b
        n = self.n
        for c in data:
            b[n] = c
            n += 1
            if n == 64:
                _block(self.h, b)
                n = 0
        self.n = n
        self.t += len(data)

    def digest(self):
        h = array('H', self.h)
        b = bytearray(self.b)
        n = self.n
        b[n] = 0x80
        n += 1
        if n > 56:
            for i in range(n, 64):
                b[i] = 0
            _block(h, b)
            n = 0
        for i in range(n, 60):
            b[i] = 0
        struct.pack_into('>I', b, 60, self.t * 8)
        _block(h, b)
        out = bytearray(32)
        for i in range(16):
            out[2 * i] = h[i] >> 8
            out[2 * i + 1] = h[i] & 255
        return bytes(out)


try:
    from hashlib import sha256
except ImportError:
    try:
        from uhashlib import sha256
    except ImportError:
        sha256 = PureSha256


def hmac(key, msg, sha=None):
    # HMAC-SHA256(key, msg) -> 32 bytes
    sha = sha or sha256
    if len(key) > 64:
        key = sha(key).digest()
    k = bytearray(64)
    for i in range(len(key)):
        k[i] = key[i] ^ 0x36
    for i in range(len(key), 64):
        k[i] = 0x36
    inner = sha(bytes(k))
    inner.update(msg)
    for i in range(64):
        k[i] ^= 0x36 ^ 0x5c
    outer = sha(bytes(k))
    outer.update(inner.digest())
    return outer.digest()


def model_ok(key, mid, fmt, size, digest, tag, off, sha=None):
    # tag[off:off+32] == HMAC of the bundle header?
    t = hmac(key, b'TMB1' + struct.pack('<IBI', mid, fmt, size) + digest, sha)
    d = 0
    for i in range(32):
        d |= t[i] ^ tag[off + i]  # no early exit
    return d == 0
