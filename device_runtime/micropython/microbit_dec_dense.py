# microbit_engine weights decoder (loaded only if used, then dropped): dense, all rows x cols int8.


def dec(d, p, R, k, s, put):
    for q in range(R * s[3]):
        put(s, q, d[p + 16 + q])
