# smf_mb kernels (imported by smf_mb): TFLite's requantization and the int8 FULLY_CONNECTED and
# AVERAGE_POOL_2D kernels, bit-exact with TFLite Micro. A separate module: on MicroPython 1.9.2 a module's
# compilation needs about 3x its (minified) source in free heap.


def mbqm(x, ml, mh, s):
    # TFLite's MultiplyByQuantizedMultiplier (double rounding), multiplier mh * 2**15 + ml, in 15-bit
    # digits so that every intermediate stays a small int (< 2**30); as smf_q.mbqm
    if s > 0:
        x <<= s
        s = 0
    n = x < 0
    a = -x if n else x
    if a >> 30:  # (big ints: only at load, for saturated biases)
        v = (a * (mh << 15 | ml) + 0x40000000 - n) >> 31
    else:
        b = a >> 15
        a &= 0x7FFF
        m = mh & 0x7FFF
        t = a * ml
        d = (t >> 15) + 0x8000 - n + ((t & 0x7FFF) + (0x7FFF if n else 0) >> 15)
        t = a * m
        d += t & 0x7FFF
        e = t >> 15
        t = b * ml
        d += t & 0x7FFF
        e += (t >> 15) + (d >> 15)
        t = b * m
        e += t & 0x7FFF
        d = t >> 15
        if mh >> 15:
            e += a
            d += b
        v = (d << 14) + (e >> 1)
    if n:
        v = -v
    if s == 0:
        return v
    e = -s
    if e > 30 and not a >> 30:
        return 0
    m = ((1 << e - 1) - 1) << 1 | 1
    r = v & m
    v >>= e
    if r > (m >> 1) + (v < 0):
        v += 1
    return v


def fc(m, o):
    # y = clamp(MBQM(bias' + sum(w * x)) + zp_out) over kept weights (zp_in folded into bias'); rows
    # without kept weights hold their constant output in bias'
    t = m.tensors
    x = m.bufs[t[o[2]][3]]
    Y = t[o[4]]
    y = m.bufs[Y[3]]
    lo, hi, B, L, H, S, P, C, V = o[5]
    for r in range(Y[2]):
        a = B[r]
        p = P[r]
        q = P[r + 1]
        if p < q:
            for j in range(p, q):
                a += V[j] * x[C[j]]
            a = mbqm(a, L[r], H[r], S[r]) + Y[4]
            a = lo if a < lo else hi if a > hi else a
        y[r] = a


def avgpool(m, o):
    # AVERAGE_POOL_2D as TFLite Micro: sum over the in-bounds window / its size, half away from zero
    t = m.tensors
    X = t[o[2]]
    Y = t[o[4]]
    x = m.bufs[X[3]]
    y = m.bufs[Y[3]]
    W = X[1]
    C = X[2]
    fh, fw, sh, sw, pt, pl, lo, hi = o[5]
    k = 0
    for oy in range(Y[0]):
        a = oy * sh - pt
        b = min(X[0], a + fh)
        a = max(0, a)
        for ox in range(Y[1]):
            c = ox * sw - pl
            e = min(W, c + fw)
            c = max(0, c)
            n = (b - a) * (e - c)
            for ch in range(C):
                v = 0
                for iy in range(a, b):
                    i = (iy * W + c) * C + ch
                    for _ in range(c, e):
                        v += x[i]
                        i += C
                v = (v + n // 2) // n if v > 0 else -((n // 2 - v) // n)
                y[k] = lo if v < lo else hi if v > hi else v
                k += 1
