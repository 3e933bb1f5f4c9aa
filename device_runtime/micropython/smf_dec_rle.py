# Run-length weights: (zero run u8, value i8) pairs over the row-major matrix; (255, 0) skips 256.
from smf_reader import _u32, _s8, zeros


def load(d, p, rows, n):
    k = _u32(d, p + 8)
    p += 16
    nnz = 0
    for i in range(k):
        if d[p + 2 * i + 1]:
            nnz += 1
    ptr = zeros('i', rows + 1)
    cols = zeros('H', nnz)
    vals = zeros('b', nnz)
    j = 0
    q = -1
    for i in range(k):
        q += d[p + 2 * i] + 1
        if d[p + 2 * i + 1]:
            ptr[q // n + 1] += 1
            cols[j] = q % n
            vals[j] = _s8(d[p + 2 * i + 1])
            j += 1
    for r in range(rows):
        ptr[r + 1] += ptr[r]
    return ptr, cols, vals
