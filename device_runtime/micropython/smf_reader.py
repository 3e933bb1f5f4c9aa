# Helpers shared by the loader modules (dropped with them after loading): little-endian fields, zero-filled
# arrays and the sequential reader over the model (bytes in memory, or a file read piecewise).
from array import array


def _u16(d, p):
    return d[p] | (d[p + 1] << 8)


def _u32(d, p):
    # sizes and counts only: the format keeps them below 2**30. (Not through _u16: on the micro:bit every call
    # level counts, its converter runs the loaders near the stack's limit.)
    return d[p] | (d[p + 1] << 8) | (d[p + 2] << 16) | (d[p + 3] << 24)


def _s8(v):
    return v - 256 if v > 127 else v


def zeros(tc, n):
    # array of n zeros without a temporary list (bytearray initialisers are copied raw)
    return array(tc, bytearray(n * (4 if tc == 'i' else 2 if tc in 'hH' else 1)))


def src(s):
    # sequential reader state over the model [file or None, bytes or path, position]: bytes in memory, or
    # a file path read piecewise, so that a small board never holds the whole file
    return [open(s, 'rb') if isinstance(s, str) else None, s, 0]


def rd(r, n):
    r[2] += n
    return r[0].read(n) if r[0] else r[1][r[2] - n:r[2]]


def skip(r, n):
    while n > 0:
        rd(r, n if n < 64 else 64)
        n -= 64
