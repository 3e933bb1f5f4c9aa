# AVERAGE_POOL_2D int8 as TFLite Micro's reference kernel: the sum over the in-bounds part of each window,
# divided by its size rounding half away from zero (C division), then clamped. Parameters as the loaders give
# them: (filter h, w, stride h, w, pad top, left, act min, act max), the limits signed (smf_bodies; the
# micro:bit's converter writes the same). Also the micro:bit engine's kernel (microbit_kernels).


def avgpool(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    x = m.bufs[xt[3]]
    y = m.bufs[yt[3]]
    W = xt[1]
    C = xt[2]
    fh, fw, sh, sw, pt, pl, lo, hi = op[5]
    o = 0
    for oy in range(yt[0]):
        ya = oy * sh - pt
        yb = min(xt[0], ya + fh)
        ya = max(0, ya)
        for ox in range(yt[1]):
            xa = ox * sw - pl
            xb = min(W, xa + fw)
            xa = max(0, xa)
            n = (yb - ya) * (xb - xa)
            for c in range(C):
                v = 0
                for iy in range(ya, yb):
                    i = (iy * W + xa) * C + c
                    for _ in range(xa, xb):
                        v += x[i]
                        i += C
                v = (v + n // 2) // n if v > 0 else -((n // 2 - v) // n)
                y[o] = lo if v < lo else (hi if v > hi else v)
                o += 1
