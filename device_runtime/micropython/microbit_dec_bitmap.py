# microbit_engine weights decoder (loaded only if used, then dropped): bitmap, one bit per weight (LSB first),
# then the kept values.


def dec(d, p, R, k, s, put):
    n = R * s[3]
    p += 16
    v = p + (n + 7 >> 3)
    for q in range(n):
        if d[p + (q >> 3)] >> (q & 7) & 1:
            put(s, q, d[v])
            v += 1
