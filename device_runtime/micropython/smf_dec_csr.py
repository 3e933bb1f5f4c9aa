# CSR weights: u16 kept count per row, column indices (u8 or u16), kept int8 values.
from array import array
from smf_reader import _u16, _u32, zeros


def load(d, p, rows, n):
    ib = d[p + 1]
    k = _u32(d, p + 8)
    p += 16
    ptr = zeros('i', rows + 1)
    for r in range(rows):
        ptr[r + 1] = ptr[r] + _u16(d, p + 2 * r)
    p += 2 * rows
    c = bytearray(d[p:p + ib * k])
    if ib == 2:
        c = array('H', c)  # little-endian, copied raw
    p += ib * k
    return ptr, c, array('b', bytearray(d[p:p + k]))
