# Element-wise int8 ops as TFLite Micro's reference kernels: ADD (same shapes), PAD (H/W), REQUANTIZE.
from smf_requant import mbqm, lo15, hi16


def _s8(v):
    return v - 256 if v > 127 else v


def add(m, op):
    t = m.tensors
    at = t[op[2]]
    bt = t[op[3]]
    yt = t[op[4]]
    a = m.bufs[at[3]]
    b = m.bufs[bt[3]]
    y = m.bufs[yt[3]]
    g = op[5]
    l1 = lo15(g, 0)
    h1 = hi16(g, 0)
    l2 = lo15(g, 4)
    h2 = hi16(g, 4)
    lo_ = lo15(g, 8)
    ho = hi16(g, 8)
    s1 = _s8(g[12])
    s2 = _s8(g[13])
    so = _s8(g[14])
    ls = g[15]
    lo = _s8(g[16])
    hi = _s8(g[17])
    za = at[4]
    zb = bt[4]
    zo = yt[4]
    for i in range(yt[0] * yt[1] * yt[2]):
        u = mbqm((a[i] - za) << ls, l1, h1, s1) + mbqm((b[i] - zb) << ls, l2, h2, s2)
        v = mbqm(u, lo_, ho, so) + zo
        y[i] = lo if v < lo else (hi if v > hi else v)


def pad(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    x = m.bufs[xt[3]]
    y = m.bufs[yt[3]]
    g = op[5]
    top = g[0]
    left = g[2]
    v = _s8(g[4])
    H = xt[0]
    W = xt[1]
    C = xt[2]
    OW = yt[1]
    for i in range(yt[0] * OW * C):
        y[i] = v
    for iy in range(H):
        o = ((iy + top) * OW + left) * C
        i = iy * W * C
        for k in range(W * C):
            y[o + k] = x[i + k]


def requant(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    x = m.bufs[xt[3]]
    y = m.bufs[yt[3]]
    g = op[5]
    ml = lo15(g, 0)
    mh = hi16(g, 0)
    s = _s8(g[4])
    zi = xt[4]
    zo = yt[4]
    for i in range(yt[0] * yt[1] * yt[2]):
        v = mbqm(x[i] - zi, ml, mh, s) + zo
        y[i] = -128 if v < -128 else (127 if v > 127 else v)
