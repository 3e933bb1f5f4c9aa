# Bitmap weights: one bit per weight (LSB first), then the kept int8 values in row-major order.
from array import array
from smf_reader import _u32, zeros


def load(d, p, rows, n):
    k = _u32(d, p + 8)
    b = p + 16
    v = b + ((rows * n + 7) >> 3)
    ptr = zeros('i', rows + 1)
    cols = zeros('H', k)
    j = 0
    for q in range(rows * n):
        if d[b + (q >> 3)] & (1 << (q & 7)):
            ptr[q // n + 1] += 1
            cols[j] = q % n
            j += 1
    for r in range(rows):
        ptr[r + 1] += ptr[r]
    return ptr, cols, array('b', bytearray(d[v:v + k]))
