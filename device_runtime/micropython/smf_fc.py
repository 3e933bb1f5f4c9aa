# FULLY_CONNECTED int8 (TFLite reference): y = clamp(MBQM(bias + sum(w * (x - zp_in))) + zp_out).
# Only kept weights are visited (CSR rows); the input zero point is folded into the bias at load.
from smf_requant import mbqm


def fc(m, op):
    t = m.tensors
    x = m.bufs[t[op[2]][3]]
    yt = t[op[4]]
    y = m.bufs[yt[3]]
    zp = yt[4]
    geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals = op[5]
    for o in range(yt[2]):
        acc = bias[o]
        p = ptr[o]
        q = ptr[o + 1]
        if p == q:  # no kept weights: constant output, precomputed at load
            y[o] = acc
            continue
        if cols is None:  # dense baseline
            for j in range(p, q):
                acc += vals[j] * x[j - p]
        else:
            for j in range(p, q):
                acc += vals[j] * x[cols[j]]
        v = mbqm(acc, ml[o], mh[o], sh[o]) + zp
        y[o] = lo if v < lo else (hi if v > hi else v)
