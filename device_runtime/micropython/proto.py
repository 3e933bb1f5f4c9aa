# Device codec; API in docs/protocol.md. MicroPython 1.9.2+: ints < 2**30, no
# memoryview. Keep it small: micro:bit 1.9.2 must compile it in ~8 KB of heap.
import struct
from array import array

# CRC-32 4-bit table: u16 pairs (low, high), little-endian raw bytes
_T = array('H', bytearray(b'\x00\x00\x00\x00d\x10\xb7\x1d\xc8 n;\xac0\xd9&\x90A\xdcv\xf4QkkXa\xb2M<q\x05P \x83\xb8\xedD\x93\x0f\xf0\xe8\xa3\xd6\xd6\x8c\xb3a\xcb\xb0\xc2d\x9b\xd4\xd2\xd3\x86x\xe2\n\xa0\x1c\xf2\xbd\xbd'))
_F = {2: '<IIHBB', 3: '<IH', 4: '<I32sB', 16: '<IHBHHff', 18: '<IHHf', 33: '<'}


def crc(b, n, c):
    # CRC-32 of b[:n] -> c = [high16, low16]
    l = h = 65535
    for k in range(n):
        x = b[k]
        for j in range(2):
            y = (l ^ x) & 15
            l = (l >> 4 | (h & 15) << 12) ^ _T[2 * y]
            h = h >> 4 ^ _T[2 * y + 1]
            x >>= 4
    c[0] = h ^ 65535
    c[1] = l ^ 65535


class Proto:
    def __init__(s, size=160, seq=0, maxk=64):
        n = size + 7
        s.size = size
        s.maxk = maxk
        s.rx = bytearray(n + n // 254 + 1)
        s.b = bytearray(n)
        s.tx = bytearray(n + n // 254 + 2)
        s.ab = bytearray(7)  # own ACK buffers: acking never clobbers tx
        s.at = bytearray(9)
        s.c = [0, 0]
        s.rn = s.skip = s.bad = s.dup = s.mlen = s.fseq = s.kind = 0
        s.seq = seq
        s.last = -1

    def feed(s, d, i=0):
        r = s.rx
        n = s.rn
        while i < len(d):
            x = d[i]
            i += 1
            if x:
                if n < len(r):
                    r[n] = x
                    n += 1
                else:
                    s.skip = 1
                continue
            s.kind = k = s._end(n)
            n = 0
            if k:
                s.rn = 0
                return i
        s.rn = n
        s.kind = 0
        return i

    def _end(s, n):
        if s.skip:
            s.skip = 0
            s.bad += 1
            return -1
        if not n:
            return 0
        r = s.rx
        i = o = 0
        while i < n:
            x = r[i]
            j = i + x
            if j > n:
                s.bad += 1
                return -1
            i += 1
            while i < j:
                r[o] = r[i]
                o += 1
                i += 1
            if x < 255 and i < n:
                r[o] = 0
                o += 1
        o -= 4
        c = s.c
        crc(r, o, c)
        f = r[0]
        if o < 3 or r[o] | r[o + 1] << 8 != c[1] or r[o + 2] | r[o + 3] << 8 != c[0] or f > 1 or (o == 3) != (f == 1):
            s.bad += 1
            return -1
        s.fseq = q = r[1] | r[2] << 8
        if f:
            return 3
        s.mlen = o - 3
        if q == s.last:
            s.dup += 1
            return 2
        s.last = q
        return 1

    def msg(s):
        # -> (type, fields): -1 malformed/unknown, -4 ROUND_START/UPDATE out of range
        r = s.rx
        t = r[4]
        f = _F.get(t)
        if r[3] != 1 or not f:
            return -1, None
        n = s.mlen - 2 - struct.calcsize(f)
        v = struct.unpack_from(f, r, 5)
        if t == 4:
            n -= (0, 32, 64)[v[2]] if v[2] < 3 else 999
        if t == 16:
            n -= 4 * (v[1] if v[2] else 1)
        if t == 18:  # ROUND_UPDATE: (round, k, lr); seed halves at rx[9:13], scalars at rx[17:]
            k = n >> 2
            n = n & 3 or not 0 < k < 257
            v = (v[0], k, v[3])
        if ((n < 1 if t == 3 else n) or v and v[0] >> 30 or t == 16 and (v[2] > 1 or not 0 < v[1] < 257)
                or t == 2 and not (v[1] and not v[1] >> 30 and v[2] and 0 < v[3] < 4 and v[4] < 3)):
            return -1, v
        if t == 16 and not (v[1] <= s.maxk and 1e-7 <= v[5] <= 1 and 0 <= v[6] <= 10 and v[3] and v[4]):
            return -4, v
        if t == 18:
            # a float32 is inf/nan when its 8 exponent bits are all ones (no float made)
            i = 20
            k = 20 + 4 * v[1]
            while i < k and not (r[i] & 127 == 127 and r[i - 1] & 128):
                i += 4
            if i < k or not (v[1] <= s.maxk and 0 <= v[2] <= 10):
                return -4, v
        return t, v

    def put(s, i, fmt, *a):
        # pack at s.b[i]; a message starts at 3 with (1, type, ...)
        struct.pack_into(fmt, s.b, i, *a)
        return i + struct.calcsize(fmt)

    def frame(s, i):
        # DATA frame of s.b[3:i] into s.tx; returns its length
        b = s.b
        q = s.seq
        s.seq = (q + 1) & 65535
        b[0] = 0
        b[1] = q & 255
        b[2] = q >> 8
        return s._seal(b, i, s.tx)

    def ack(s):
        # ACK frame for the last DATA into s.at (9 bytes)
        a = s.ab
        a[0] = 1
        a[1] = s.fseq & 255
        a[2] = s.fseq >> 8
        return s._seal(a, 3, s.at)

    def _seal(s, b, n, t):
        c = s.c
        crc(b, n, c)
        b[n] = c[1] & 255
        b[n + 1] = c[1] >> 8
        b[n + 2] = c[0] & 255
        b[n + 3] = c[0] >> 8
        h = 0
        o = 1
        for i in range(n + 4):
            x = b[i]
            if x:
                t[o] = x
                o += 1
            if not x or o - h == 255:
                t[h] = o - h
                h = o
                o += 1
        t[h] = o - h
        t[o] = 0
        return o + 1
