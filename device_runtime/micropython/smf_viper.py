# Native (viper) kernels of the .smf engine: the same TFLite Micro arithmetic as the bytecode kernels
# (smf_conv, smf_fc, smf_requant, ...), compiled to machine code by the port's native emitter or ahead of time by
# mpy-cross -march=<arch>. Importing this module fails (SyntaxError: no native emitter, ValueError: .mpy
# of another architecture) on ports without one; smf.Model then keeps the bytecode kernels.
#
# Conventions (set up once at load by smf_viper_prep):
# - activations stay int8 in the model's buffers (the bytecode kernels, smf.Model users such as ft.py
#   and the fallback for ops without a native kernel read them as they are); viper's ptr8 loads are
#   unsigned, and x ^ 0x80 = x + 128 (0..255) is one operation, so kernels compute on u = x + 128 and
#   the bias absorbs the offset (sum w*(x - z) = sum w*u - (z + 128)*sum w); stores keep the low byte;
# - ptr32 loads are zero-extended on 64-bit ports (x64): signed values are sign-extended with
#   (v << S) >> S, S = 32 there and 0 on 32-bit ports; accumulators wrap modulo 2**32 on both, so only
#   values that are compared or requantized need it;
# - every intermediate of the requantization stays below 2**31 (15-bit digits, as smf_requant), so the result
#   is the same on 32- and 64-bit machines;
# - per-layer integers live in array('i') parameter blocks (G, P), per-channel ones in R (8 words each:
#   tlo, thi, ml, mh, sh, p0, p1, bias); kept weights as the loader decoded them (int8 values Kv, u16
#   indices K: the column for fully connected rows, (ci << 8) | tap for convolutions, rewritten in place).
import micropython
from smf_requant import mbqm as _mbqm


def _big(x, m0, m1, s, zo, lo, hi):
    # rq's rare case (|acc| >= 2**30), in Python ints: the value may not fit a machine word, the clamped
    # result does
    v = _mbqm(x, m0 & 0x7FFF, (m1 << 1) | (m0 >> 15), s) + zo
    return lo if v < lo else (hi if v > hi else v)


@micropython.viper
def rq(acc: ptr32, y: ptr8, P: ptr32, R: ptr32):
    # y[yo + e*ys] = clamp(MBQM(acc[e]) + zout) for e < n; P = n, yo, ys, q0, qs, zout, lo, hi, S;
    # element e uses R[q0 + e*qs ...] = tlo, thi, m0, m1, sh (multiplier m = m1 * 2**16 + m0): acc <= tlo
    # gives lo, acc >= thi gives hi (limits found at load, smf_clamp_limits) without the exact requantization;
    # tlo = -2**31, thi = 2**31 - 1: no limits (an int8 layer's int32 accumulator never reaches those).
    # Parameters are reloaded only when they change (qs != 0: one set per element, fully connected rows).
    n = P[0]
    o = P[1]
    ys = P[2]
    q = P[3]
    qs = P[4]
    S = P[8]
    zo = (P[5] << S) >> S
    lo = (P[6] << S) >> S
    hi = (P[7] << S) >> S
    t0 = (R[q] << S) >> S
    t1 = (R[q + 1] << S) >> S
    m0 = uint(R[q + 2])
    m1 = uint(R[q + 3])
    s = (R[q + 4] << S) >> S
    nz = uint(1) << 30
    e = 0
    while e < n:
        if qs:
            t0 = (R[q] << S) >> S
            t1 = (R[q + 1] << S) >> S
            m0 = uint(R[q + 2])
            m1 = uint(R[q + 3])
            s = (R[q + 4] << S) >> S
            q += qs
        x = (acc[e] << S) >> S
        if x <= t0:
            r = lo
        elif x >= t1:
            r = hi
        else:
            a = x
            if x < 0:
                a = 0 - x
            big = 0
            if s > 0:
                if s > 29 or (a >> (30 - s)):
                    big = 1
                else:
                    a = a << s
                    x = x << s
            elif a >> 30:
                big = 1
            if big:  # |acc| >= 2**30: never seen with int8 models; exact with big ints (allocates)
                r = int(_big((acc[e] << S) >> S, int(m0), int(m1), s, zo, lo, hi))
            else:
                # SaturatingRoundingDoublingHighMul: (|x| * m + 2**30 - [x < 0]) >> 31, in 16-bit halves
                # with unsigned products (below 2**32 on 32-bit ports), then the sign
                ua = uint(a)
                a0 = ua & 0xFFFF
                a1 = ua >> 16
                lw = a0 * m0
                md = a1 * m0 + a0 * m1
                nd = nz
                if x < 0:
                    nd = nz - 1
                s1 = (lw >> 16) + (md & 0xFFFF) + (nd >> 16) + (((lw & 0xFFFF) + (nd & 0xFFFF)) >> 16)
                v = int((((md >> 16) + a1 * m1 + (s1 >> 16)) << 1) | ((s1 >> 15) & 1))
                if x < 0:
                    v = 0 - v
                if s < 0:  # RoundingDivideByPOT(v, -s): half away from zero
                    ex = 0 - s
                    if ex > 30:
                        v = 0
                    else:
                        mk = (1 << ex) - 1
                        rm = v & mk
                        v = v >> ex
                        h = mk >> 1
                        if v < 0:
                            h += 1
                        if rm > h:
                            v += 1
                r = v + zo
                if r < lo:
                    r = lo
                elif r > hi:
                    r = hi
        y[o] = r
        o += ys
        e += 1


@micropython.viper
def conv_ws(a: int, x: ptr8, acc: ptr32, G: ptr32, R: ptr32, K: ptr16, T: ptr32, oc: int, Kv: ptr8):
    # weight-stationary convolution of output channel oc into acc[0 .. OH*OW): acc = bias, then each kept
    # weight (Kv[j], int8, at K[j] = (ci << 8) | tap, j in p0..p1) is applied to every output pixel whose tap lands
    # inside the input (T: per tap oy0, oy1, ox0, ox1, input offset of (oy0, ox0)); pruned weights cost
    # nothing. G = OH, OW, OC, row step, column step, z, ...: z is the input zero point (offset form)
    # for layers with implicit padding (taps in the padding contribute 0), else 0 (folded into the bias).
    # a (pass 0) is the innermost loop variable: viper keeps only its first local in a register
    OW = G[1]
    rs = G[3]
    cs = G[4]
    z = G[5]
    S = G[8]
    q = oc << 3
    b = (R[q + 7] << S) >> S
    n = G[0] * OW
    a = 0
    while a < n:
        acc[a] = b
        a += 1
    j = R[q + 5]
    p1 = R[q + 6]
    while j < p1:
        k = K[j]
        w = (Kv[j] ^ 0x80) - 0x80
        t = (k & 0xFF) * 5
        i0 = T[t + 4] + (k >> 8)
        a0 = T[t] * OW + T[t + 2]
        nx = T[t + 3] - T[t + 2]
        oy = T[t + 1] - T[t]
        while oy > 0:
            a = a0
            e = a0 + nx
            d = i0 - a0 * cs  # input index = a * cs + d: one loop variable (measured 50 vs 57 instr/MAC)
            if z:
                while a < e:
                    acc[a] += w * ((x[a * cs + d] ^ 0x80) - z)
                    a += 1
            else:
                while a < e:
                    acc[a] += w * (x[a * cs + d] ^ 0x80)
                    a += 1
            a0 += OW
            i0 += rs
            oy -= 1
        j += 1


@micropython.viper
def conv_oss(j: int, x: ptr8, acc: ptr32, G: ptr32, R: ptr32, O: ptr16, T: ptr32, oc: int, Kv: ptr8, K: ptr16):
    # output-stationary sparse convolution of output channel oc: per output pixel, a dot product over the
    # channel's kept weights only (Kv[j], input offset O[j] = (ky*W + kx)*C + ci from the window's corner);
    # inside the interior (G[18..21]: output rows/columns whose window lies in the input) without bounds
    # checks, at the border only the taps inside the input (K[j] & 0xFF: tap, T: its in-bounds outputs).
    # The sum stays in a local: cheaper per MAC than conv_ws's read-modify-write of acc.
    OH = G[0]
    OW = G[1]
    z = G[5]
    S = G[8]
    Wd = G[10]
    C = G[11]
    sy = G[14]
    sx = G[15]
    q = oc << 3
    b = (R[q + 7] << S) >> S
    p0 = R[q + 5]
    p1 = R[q + 6]
    a = 0
    oy = 0
    while oy < OH:
        inrow = 0
        if oy >= G[18]:
            if oy < G[19]:
                inrow = 1
        ox = 0
        while ox < OW:
            s = b
            d = ((oy * sy - G[16]) * Wd + ox * sx - G[17]) * C  # input index of the window's corner
            inside = 0
            if inrow:
                if ox >= G[20]:
                    if ox < G[21]:
                        inside = 1
            j = p0
            if inside:
                if z:
                    while j < p1:
                        s += ((Kv[j] ^ 0x80) - 0x80) * ((x[d + O[j]] ^ 0x80) - z)
                        j += 1
                else:
                    while j < p1:
                        s += ((Kv[j] ^ 0x80) - 0x80) * (x[d + O[j]] ^ 0x80)
                        j += 1
            else:
                while j < p1:
                    t = (K[j] & 0xFF) * 5
                    if oy >= T[t]:
                        if oy < T[t + 1]:
                            if ox >= T[t + 2]:
                                if ox < T[t + 3]:
                                    s += ((Kv[j] ^ 0x80) - 0x80) * ((x[d + O[j]] ^ 0x80) - z)
                    j += 1
            acc[a] = s
            a += 1
            ox += 1
        oy += 1


@micropython.viper
def conv_os(i: int, x: ptr8, acc: ptr32, G: ptr32, R: ptr32, W8: ptr8, T: ptr32, oc: int):
    # output-stationary dense convolution of output channel oc (every weight, zeros included, int8
    # [OC][KH*KW*C] in W8): per output pixel one dot product, whose rows (kx, ci) are contiguous in both
    # the input and the weights when the window is inside the input. G as conv_ws, plus H, W, C, KH,
    # KW, sy, sx, pad_top, pad_left at G[9..17]; i (pass 0): the innermost loop variable (in a register)
    OH = G[0]
    OW = G[1]
    z = G[5]
    S = G[8]
    H = G[9]
    Wd = G[10]
    C = G[11]
    KH = G[12]
    KW = G[13]
    sy = G[14]
    sx = G[15]
    q = oc << 3
    b = (R[q + 7] << S) >> S
    wbase = oc * KH * KW * C
    a = 0
    oy = 0
    while oy < OH:
        iy0 = oy * sy - G[16]
        ky0 = 0
        if iy0 < 0:
            ky0 = 0 - iy0
        ky1 = KH
        if iy0 + KH > H:
            ky1 = H - iy0
        ox = 0
        while ox < OW:
            ix0 = ox * sx - G[17]
            kx0 = 0
            if ix0 < 0:
                kx0 = 0 - ix0
            kx1 = KW
            if ix0 + KW > Wd:
                kx1 = Wd - ix0
            s = b
            ln = (kx1 - kx0) * C
            ky = ky0
            while ky < ky1:
                i = wbase + (ky * KW + kx0) * C  # weight index; the input index is i + d
                d = ((iy0 + ky) * Wd + ix0 + kx0) * C - i
                e = i + ln
                if z:
                    while i < e:
                        s += ((W8[i] ^ 0x80) - 0x80) * ((x[i + d] ^ 0x80) - z)
                        i += 1
                else:
                    while i < e:
                        s += ((W8[i] ^ 0x80) - 0x80) * (x[i + d] ^ 0x80)
                        i += 1
                ky += 1
            acc[a] = s
            a += 1
            ox += 1
        oy += 1


@micropython.viper
def fc_sparse(j: int, x: ptr8, acc: ptr32, R: ptr32, K: ptr16, n: int, S: int, Kv: ptr8):
    # acc[r] = bias[r] + sum over kept weights j of row r of Kv[j] (int8) * x[K[j]] (CSR rows);
    # j (pass 0): the innermost loop variable (in a register)
    r = 0
    q = 0
    while r < n:
        s = (R[q + 7] << S) >> S
        j = R[q + 5]
        p1 = R[q + 6]
        while j < p1:
            s += ((Kv[j] ^ 0x80) - 0x80) * (x[K[j]] ^ 0x80)
            j += 1
        acc[r] = s
        r += 1
        q += 8


@micropython.viper
def fc_dense(j: int, x: ptr8, acc: ptr32, R: ptr32, W8: ptr8, n: int, S: int):
    # acc[r] = bias[r] + sum of every weight of row r (int8 [rows][cols] in W8, zeros included) times x;
    # j (pass 0): the innermost loop variable (in a register)
    cols = R[6] - R[5]  # (dense rows are contiguous: p0 = r*cols)
    r = 0
    q = 0
    while r < n:
        s = (R[q + 7] << S) >> S
        d = 0 - j  # input index = j + d
        e = j + cols
        while j < e:
            s += ((W8[j] ^ 0x80) - 0x80) * (x[j + d] ^ 0x80)
            j += 1
        acc[r] = s
        r += 1
        q += 8


@micropython.viper
def fill(y: ptr8, o: int, step: int, n: int, v: int):
    # n outputs of a channel without kept weights: the constant v (int8) computed at load
    while n > 0:
        y[o] = v
        o += step
        n -= 1


@micropython.viper
def copy(d: ptr8, s: ptr8, n: int):
    i = 0
    while i < n:
        d[i] = s[i]
        i += 1


@micropython.viper
def pool(x: ptr8, y: ptr8, G: ptr32, avg: int):
    # MAX_POOL_2D / AVERAGE_POOL_2D over the in-bounds part of each window (TFLite Micro reference);
    # G = H, W, C, OH, OW, fh, fw, sh, sw, pad_top, pad_left, lo, hi (lo, hi in offset form).
    # Maximum: the offset form keeps the order. Average: C-style rounding division of the signed sum.
    H = G[0]
    Wd = G[1]
    C = G[2]
    lo = G[11]
    hi = G[12]
    o = 0
    oy = 0
    while oy < G[3]:
        ya = oy * G[7] - G[9]
        yb = ya + G[5]
        if yb > H:
            yb = H
        if ya < 0:
            ya = 0
        ox = 0
        while ox < G[4]:
            xa = ox * G[8] - G[10]
            xb = xa + G[6]
            if xb > Wd:
                xb = Wd
            if xa < 0:
                xa = 0
            cnt = (yb - ya) * (xb - xa)
            c = 0
            while c < C:
                v = 0
                iy = ya
                while iy < yb:
                    i = (iy * Wd + xa) * C + c
                    e = i + (xb - xa) * C
                    while i < e:
                        u = x[i] ^ 0x80
                        if avg:
                            v += u
                        elif u > v:
                            v = u
                        i += C
                    iy += 1
                if avg:
                    v -= cnt << 7
                    if v > 0:
                        v = (v + (cnt >> 1)) // cnt
                    else:
                        v = 0 - (((cnt >> 1) - v) // cnt)
                    v += 128
                if v < lo:
                    v = lo
                elif v > hi:
                    v = hi
                y[o] = v ^ 0x80
                o += 1
                c += 1
            ox += 1
        oy += 1


@micropython.viper
def chsum(x: ptr8, acc: ptr32, C: int, n: int, base: int):
    # MEAN: acc[c] = base + sum over the n pixels of channel c of x + 128 (base removes 128 and zp)
    c = 0
    while c < C:
        s = base
        i = c
        k = n
        while k > 0:
            s += x[i] ^ 0x80
            i += C
            k -= 1
        acc[c] = s
        c += 1


@micropython.viper
def lut(x: ptr8, y: ptr8, L: ptr8, n: int):
    # y[i] = L[x[i]] (REQUANTIZE: an int8 input has 256 values, each output computed at load)
    i = 0
    while i < n:
        y[i] = L[x[i]]
        i += 1


@micropython.viper
def add_acc(a: ptr8, b: ptr8, acc: ptr32, TA: ptr32, TB: ptr32, off: int, n: int):
    # ADD, first half: acc[k] = TA[a] + TB[b] at off + k, TA[v] = MBQM((v - za) << 20, m1, s1) (and TB)
    # tabulated at load for the 256 int8 values; the sum's requantization is rq's
    k = 0
    while k < n:
        acc[k] = TA[a[off + k]] + TB[b[off + k]]
        k += 1


@micropython.viper
def pad(x: ptr8, y: ptr8, G: ptr32):
    # PAD (height/width): G = H, W, C, OH, OW, top, left, value (int8 as a byte)
    Wd = G[1]
    C = G[2]
    OW = G[4]
    n = G[3] * OW * C
    v = G[7]
    i = 0
    while i < n:
        y[i] = v
        i += 1
    row = Wd * C
    iy = 0
    while iy < G[0]:
        o = ((iy + G[5]) * OW + G[6]) * C
        i = iy * row
        e = i + row
        while i < e:
            y[o] = x[i]
            i += 1
            o += 1
        iy += 1


# Operator wrappers (bytecode: once per layer or per output channel), called as op[0](model, op) like the
# bytecode kernels; op[5] holds the parameter blocks built by smf_viper_prep.


def conv(m, op):
    # per output channel: a kernel by layout (Kv None: dense; O None: weight-stationary; else
    # output-stationary sparse), then the requantization
    x, y, G, R, K, T, P, Kv, O = op[5]
    acc = m.acc
    OC = G[2]
    n = P[0]
    for oc in range(OC):
        q = oc << 3
        if R[q + 5] == R[q + 6]:  # no kept weights: the constant computed at load
            fill(y, oc, OC, n, R[q + 7])
            continue
        if Kv is None:
            conv_os(0, x, acc, G, R, K, T, oc)
        elif O is None:
            conv_ws(0, x, acc, G, R, K, T, oc, Kv)
        else:
            conv_oss(0, x, acc, G, R, O, T, oc, Kv, K)
        P[1] = oc
        P[3] = q
        rq(acc, y, P, R)


def fc(m, op):
    x, y, R, K, P, empty, Kv = op[5]
    if Kv is None:
        fc_dense(0, x, m.acc, R, K, P[0], P[8])
    else:
        fc_sparse(0, x, m.acc, R, K, P[0], P[8], Kv)
    rq(m.acc, y, P, R)
    for r in empty:
        fill(y, r, 1, 1, R[8 * r + 7])


def mean(m, op):
    x, y, C, n, base, R, P = op[5]
    chsum(x, m.acc, C, n, base)
    rq(m.acc, y, P, R)


def pool_(m, op):
    p = op[5]
    pool(p[0], p[1], p[2], p[3])


def pad_(m, op):
    p = op[5]
    pad(p[0], p[1], p[2])


def add(m, op):
    a, b, y, TA, TB, R, P, N = op[5]
    acc = m.acc
    L = len(acc)
    for off in range(0, N, L):  # in chunks of the scratch accumulator
        n = min(L, N - off)
        add_acc(a, b, acc, TA, TB, off, n)
        P[0] = n
        P[1] = off
        rq(acc, y, P, R)


def requant(m, op):
    p = op[5]
    lut(p[0], p[1], p[2], p[3])


def slow(m, op):
    # an operator without a native kernel: its bytecode kernel (op[6]) on the same int8 buffers
    op[6](m, op[:6] + op[7:])


def infer(m, x):
    if x is not None:  # (bytes, bytearray or array('b'): the same two's complement bytes)
        copy(m.input_buffer(), x, m.input_size)
    ops = m.ops
    for i in range(len(ops)):
        op = ops[i]
        op[0](m, op)
    o = m.out
    copy(o, m.bufs[m.tensors[m.output][3]], len(o))
    return o
