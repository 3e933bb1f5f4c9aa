# CONV_2D and DEPTHWISE_CONV_2D int8 (TFLite reference arithmetic), weight-stationary: for each output
# channel, each kept weight is applied to every output pixel it reaches, so pruned weights cost nothing.
# Taps that fall into implicit (SAME) padding contribute 0 in TFLite; the zero point folded into the bias
# is added back for them.
from smf_requant import mbqm


def conv(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    x = m.bufs[xt[3]]
    y = m.bufs[yt[3]]
    acc = m.acc
    H = xt[0]
    W = xt[1]
    C = xt[2]
    OH = yt[0]
    OW = yt[1]
    OC = yt[2]
    zin = xt[4]
    zout = yt[4]
    geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals = op[5]
    tlo, thi = op[6]  # accumulator limits that requantize to lo / hi (smf_clamp_limits)
    kw = geo[1]
    sy = geo[2]
    sx = geo[3]
    pt = geo[4]
    pl = geo[5]
    mult = geo[6]
    dw = op[1] == 2
    n = OH * OW
    for oc in range(OC):
        b = bias[oc]
        p = ptr[oc]
        if p == ptr[oc + 1]:  # no kept weights: constant output, precomputed at load
            i = oc
            for _ in range(n):  # (a range with a variable step would allocate)
                y[i] = b
                i += OC
            continue
        for i in range(n):
            acc[i] = b
        for j in range(p, ptr[oc + 1]):
            w = vals[j]
            k = (j - p) if cols is None else cols[j]
            if dw:
                ci = oc // mult
                ky = k // kw
                kx = k % kw
            else:
                ci = k % C
                k = k // C
                ky = k // kw
                kx = k % kw
            # output rows/cols whose tap lands inside the input: 0 <= o*s + k - pad < size
            oy0 = -((ky - pt) // sy) if ky < pt else 0
            oy1 = min(OH, (H - 1 + pt - ky) // sy + 1)
            ox0 = -((kx - pl) // sx) if kx < pl else 0
            ox1 = min(OW, (W - 1 + pl - kx) // sx + 1)
            st = sx * C
            for oy in range(oy0, oy1):
                a = oy * OW + ox0
                i = ((oy * sy + ky - pt) * W + ox0 * sx + kx - pl) * C + ci
                for a in range(a, a + ox1 - ox0):
                    acc[a] += w * x[i]
                    i += st
            if zin and (oy0 > 0 or oy1 < OH or ox0 > 0 or ox1 < OW):
                c = w * zin
                for oy in range(OH):
                    inside = oy0 <= oy < oy1
                    a = oy * OW
                    for ox in range(OW):
                        if not inside or ox < ox0 or ox >= ox1:
                            acc[a + ox] += c
        m1 = ml[oc]
        m2 = mh[oc]
        s = sh[oc]
        t0 = tlo[oc]
        t1 = thi[oc]
        i = oc
        if t0 < t1:
            for a in range(n):
                v = acc[a]
                if v <= t0:
                    y[i] = lo
                elif v >= t1:
                    y[i] = hi
                else:
                    y[i] = mbqm(v, m1, m2, s) + zout  # strictly between the clamp limits
                i += OC
        else:  # limits beyond small ints: exact requantization and clamp everywhere
            for a in range(n):
                v = mbqm(acc[a], m1, m2, s) + zout
                y[i] = lo if v < lo else (hi if v > hi else v)
                i += OC
