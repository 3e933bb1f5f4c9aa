# microbit_engine weights decoder (loaded only if used, then dropped): CSR, u16 kept count per row, column
# indices (u8 or u16), values.


def dec(d, p, R, k, s, put):
    ib = d[p + 1]
    p += 16
    i = 0
    for r in range(R):
        for _ in range(d[p + 2 * r] | d[p + 2 * r + 1] << 8):
            q = p + 2 * R + ib * i
            put(s, r * s[3] + (d[q] if ib == 1 else d[q] | d[q + 1] << 8), d[p + 2 * R + ib * k + i])
            i += 1
