# TFLite's MultiplyByQuantizedMultiplier (double rounding, as compiled into TFLite Micro), bit-exact, with
# every intermediate below 2**30: MicroPython small ints (larger ints allocate on the heap).
#   SaturatingRoundingDoublingHighMul(x, m) = (x*m + nudge) / 2**31 truncated toward zero,
#     nudge = 2**30 if x*m >= 0 else 1 - 2**30
#   RoundingDivideByPOT(v, e) = v / 2**e rounded half away from zero
# The 31-bit multiplier is passed as m = mh * 2**15 + ml; |x| = a1 * 2**15 + a0, and |x|*m + nudge is
# summed in 15-bit digits d0..d3.


def lo15(d, p):
    # bits 0..14 of the little-endian int32 multiplier at d[p] (two functions, not a tuple: no allocation)
    return d[p] | ((d[p + 1] & 0x7F) << 8)


def hi16(d, p):
    # bits 15..30 of the multiplier at d[p]
    return (d[p + 1] >> 7) | (d[p + 2] << 1) | (d[p + 3] << 9)


def mbqm(x, ml, mh, s):
    if s > 0:
        x <<= s
        s = 0
    n = x < 0
    a = -x if n else x
    if a >> 30:  # never seen with int8 models: exact, but allocates
        v = (a * ((mh << 15) | ml) + 0x40000000 - n) >> 31
    else:
        a1 = a >> 15
        a0 = a & 0x7FFF
        m1 = mh & 0x7FFF
        t = a0 * ml
        d1 = (t >> 15) + 0x8000 - n + (((t & 0x7FFF) + (0x7FFF if n else 0)) >> 15)
        t = a0 * m1
        d1 += t & 0x7FFF
        d2 = t >> 15
        t = a1 * ml
        d1 += t & 0x7FFF
        d2 += (t >> 15) + (d1 >> 15)
        t = a1 * m1
        d2 += t & 0x7FFF
        d3 = t >> 15
        if mh >> 15:
            d2 += a0
            d3 += a1
        v = (d3 << 14) + (d2 >> 1)
    if n:
        v = -v
    if s == 0:
        return v
    e = -s
    if e > 30 and not a >> 30:
        return 0  # |v| < 2**30
    m = (((1 << (e - 1)) - 1) << 1) | 1
    r = v & m
    v >>= e
    if r > (m >> 1) + (v < 0):
        v += 1
    return v
