# AVERAGE_POOL_2D int8 as TFLite Micro's reference kernel: the sum over the in-bounds part of each window,
# divided by its size rounding half away from zero (C division), then clamped.


def avgpool(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    x = m.bufs[xt[3]]
    y = m.bufs[yt[3]]
    W = xt[1]
    C = xt[2]
    g = op[5]
    lo = g[6] - 256 if g[6] > 127 else g[6]
    hi = g[7] - 256 if g[7] > 127 else g[7]
    o = 0
    for oy in range(yt[0]):
        ya = oy * g[2] - g[4]
        yb = min(xt[0], ya + g[0])
        ya = max(0, ya)
        for ox in range(yt[1]):
            xa = ox * g[3] - g[5]
            xb = min(W, xa + g[1])
            xa = max(0, xa)
            n = (yb - ya) * (xb - xa)
            for c in range(C):
                v = 0
                for iy in range(ya, yb):
                    i = (iy * W + xa) * C + c
                    for ix in range(xa, xb):
                        v += x[i]
                        i += C
                v = (v + n // 2) // n if v > 0 else -((n // 2 - v) // n)
                y[o] = lo if v < lo else (hi if v > hi else v)
                o += 1
