# MAX_POOL_2D int8 as TFLite Micro's reference kernel: the maximum over the in-bounds part of each window,
# clamped to the fused activation range. Parameters as smf_avgpool's.


def maxpool(m, op):
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
            for c in range(C):
                v = -128
                for iy in range(ya, yb):
                    i = (iy * W + xa) * C + c
                    for _ in range(xa, xb):
                        if x[i] > v:
                            v = x[i]
                        i += C
                y[o] = lo if v < lo else (hi if v > hi else v)
                o += 1
