# Loader, part 4 (convolutions only): per output channel, the accumulator ranges that requantize to the
# clamp limits. The requantization is monotonic in the accumulator, so acc <= tlo gives act_min and
# acc >= thi gives act_max without the (slow) exact MultiplyByQuantizedMultiplier; with ReLU most
# outputs of a sparse conv fall there. Channels whose limits are not small ints (|v| >= 2**30, e.g. the
# saturated biases converters give to all-zero channels) get tlo > thi: always exact.
from array import array
from smf_requant import mbqm


def _search(ml, mh, sh, zp, target, below):
    # over all int32: largest acc with f(acc) <= target (below), or smallest acc with f(acc) >= target
    a = -(1 << 31)
    b = (1 << 31) - 1
    while a < b:
        c = (a + b + (1 if below else 0)) >> 1
        v = mbqm(c, ml, mh, sh) + zp
        if below:
            if v <= target:
                a = c
            else:
                b = c - 1
        elif v >= target:
            b = c
        else:
            a = c + 1
    return a


def load(m, op):
    geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals = op[5]
    zp = m.tensors[op[4]][4]
    n = len(bias)
    tlo = array('i', bytearray(4 * n))
    thi = array('i', bytearray(4 * n))
    for r in range(n):
        a = _search(ml[r], mh[r], sh[r], zp, lo, True)
        b = _search(ml[r], mh[r], sh[r], zp, hi, False)
        if -0x40000000 < a < 0x3FFFFFFF and -0x40000000 < b < 0x3FFFFFFF:
            tlo[r] = a
            thi[r] = b
        else:
            tlo[r] = 0x3FFFFFFF
            thi[r] = -0x40000000
    return op + ((tlo, thi),)
