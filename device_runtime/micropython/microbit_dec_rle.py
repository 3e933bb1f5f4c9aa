# microbit_engine weights decoder (loaded only if used, then dropped): run-length, (zeros skipped, value) pairs;
# (255, 0) skips 256 positions.


def dec(d, p, R, k, s, put):
    q = -1
    p += 16
    for i in range(k):
        q += d[p + 2 * i] + 1
        put(s, q, d[p + 2 * i + 1])
