# MEAN over height and width (global average pooling) int8, as TFLite Micro's reference kernel.
from smf_requant import mbqm, lo15, hi16


def mean(m, op):
    # TFLM QuantizedMeanOrSum: MBQM(sum(x) - zp_in * n, m', s') + zp_out, with 1/n folded into m', s'
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    x = m.bufs[xt[3]]
    y = m.bufs[yt[3]]
    g = op[5]
    ml = lo15(g, 0)
    mh = hi16(g, 0)
    s = g[4] - 256 if g[4] > 127 else g[4]
    C = xt[2]
    n = xt[0] * xt[1]
    z = xt[4] * n
    zp = yt[4]
    for c in range(C):
        a = -z
        i = c
        for _ in range(n):
            a += x[i]
            i += C
        v = mbqm(a, ml, mh, s) + zp
        y[c] = -128 if v < -128 else (127 if v > 127 else v)
