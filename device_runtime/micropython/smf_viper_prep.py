# Loader for the native kernels (smf_viper), run once by smf.Model after the bytecode loaders and dropped
# afterwards: turns each operator's decoded rows into the viper parameter blocks (see smf_viper) and picks
# a per-layer layout. 'sparse' visits kept weights only (output-stationary convolution, CSR fully
# connected rows); 'ws' too, with the weight-stationary convolution loop; 'dense' visits every weight with
# contiguous loops; 'auto' picks, per layer, the one the cost model (COST, fitted to instruction counts
# measured on a Cortex-M3 under QEMU, docs/device-engine.md) predicts to be cheapest.
import gc
import sys
from array import array
import smf_viper as V

S = 32 if sys.maxsize > (1 << 32) else 0  # sign extension of ptr32 loads on 64-bit ports
LO = -(1 << 31)
HI = (1 << 31) - 1
# Cost model of layout 'auto': a layer's instructions = c0 * f0 + c1 * f1 + c2 * f2 (+ the same for all) per layout, with f the
# layout's loop counts: 'ws' (weight-stationary sparse convolution): MACs, inner loops (one per output row
# a kept weight reaches); 'sparse' (output-stationary sparse convolution): kept weights x interior output
# pixels, kept weights x border pixels; 'dense' (output-stationary, every weight): MACs, window rows; all:
# outputs (requantization). Fully connected: MACs, -, outputs. Coefficients fitted by bench/engine_speed.py
# to per-layer instruction counts on a Cortex-M3 (MicroPython 1.28, QEMU -icount; bench/results/engine_speed.md).
COST = {  # fitted on LeNet's two convolution geometries at 1-81 % density: ranks all 8 measured layers right
    'ws': (7.3, 301.9, 0.0),  # (per-output terms relative to ws's: the fit sees differences only)
    'sparse': (20.1, 52.3, 41.6),
    'dense': (37.3, 214.0, -1243.6),
    'sparse fc': (32.0, 0.0, 814.4),
    'dense fc': (40.2, 0.0, 650.4),
}


def _z(tc, n):
    return array(tc, bytearray(n * (4 if tc == 'i' else 2 if tc == 'H' else 1)))


def _rows(m, op, thr):
    # R: per row tlo, thi, ml, mh, sh, p0, p1, bias (input zero point handled as the kernel expects)
    geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals = op[5]
    rows = len(bias)
    R = _z('i', 8 * rows)
    for r in range(rows):
        q = 8 * r
        if thr is not None and thr[0][r] < thr[1][r]:
            R[q] = thr[0][r]
            R[q + 1] = thr[1][r]
        else:
            R[q] = LO
            R[q + 1] = HI
        R[q + 2] = ml[r] | ((mh[r] & 1) << 15)  # the multiplier's 16-bit halves (smf_viper.rq)
        R[q + 3] = mh[r] >> 1
        R[q + 4] = sh[r]
        R[q + 5] = ptr[r]
        R[q + 6] = ptr[r + 1]
        R[q + 7] = bias[r]
    return R


def _sumw(vals, p0, p1):
    s = 0
    for j in range(p0, p1):
        s += vals[j]
    return s


def _dense_w(ptr, cols, vals, rows, n):
    # every weight of each row (zeros included), int8 row-major
    W8 = bytearray(rows * n)
    for r in range(rows):
        for j in range(ptr[r], ptr[r + 1]):
            c = (j - ptr[r]) if cols is None else cols[j]
            W8[r * n + c] = vals[j] & 0xFF
    return W8


def _cost(name, f):
    c = COST[name]
    return c[0] * f[0] + c[1] * f[1] + c[2] * f[2]


def _fits(nbytes):
    # a dense weight copy (made at load) must fit in a quarter of the free heap
    gc.collect()
    return nbytes <= gc.mem_free() // 4


def _conv(m, op, layout):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals = op[5]
    H, W, C = xt[0], xt[1], xt[2]
    OH, OW, OC = yt[0], yt[1], yt[2]
    KH, KW, sy, sx, pt, pl, mult = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    dw = op[1] == 2
    if KH * KW > 255 or C > 255:  # (tap and channel share a u16 index)
        return None
    zin = xt[4]
    padded = pt > 0 or pl > 0 or (OH - 1) * sy + KH - pt > H or (OW - 1) * sx + KW - pl > W
    z = zin + 128 if padded else 0
    R = _rows(m, op, op[6])
    for r in range(OC):
        if ptr[r] < ptr[r + 1]:
            # bias folded with zin by the loader; refold: unfolded (z != 0) or with the offset's zp + 128
            R[8 * r + 7] = bias[r] + (zin if z else -128) * _sumw(vals, ptr[r], ptr[r + 1])
    n = OH * OW
    kept = ptr[OC]
    cols_n = KH * KW * (1 if dw else C)
    T = _z('i', 5 * KH * KW)
    for ky in range(KH):
        for kx in range(KW):
            q = 5 * (ky * KW + kx)
            oy0 = (pt - ky + sy - 1) // sy if ky < pt else 0
            oy1 = max(oy0, min(OH, (H - 1 + pt - ky) // sy + 1))
            ox0 = (pl - kx + sx - 1) // sx if kx < pl else 0
            ox1 = max(ox0, min(OW, (W - 1 + pl - kx) // sx + 1))
            T[q] = oy0
            T[q + 1] = oy1
            T[q + 2] = ox0
            T[q + 3] = ox1
            T[q + 4] = ((oy0 * sy + ky - pt) * W + ox0 * sx + kx - pl) * C
    # interior: output rows/columns whose whole window lies inside the input
    ya = (pt + sy - 1) // sy
    yb = max(ya, min(OH, (H - KH + pt) // sy + 1))
    xa = (pl + sx - 1) // sx
    xb = max(xa, min(OW, (W - KW + pl) // sx + 1))
    oss_ok = ((KH - 1) * W + KW) * C <= 0xFFFF  # (u16 input offsets)
    use = layout
    if layout == 'auto':
        # the cost model's inputs, per layout (taps in the padding skipped): MACs and inner loops of the
        # weight-stationary loop, interior and border visits of the output-stationary sparse one, MACs and
        # window rows of the dense one
        sm = sl = dm = dl = 0
        for r in range(OC):
            for j in range(ptr[r], ptr[r + 1]):
                c = (j - ptr[r]) if cols is None else cols[j]
                q = 5 * (c if dw else c // C)
                sm += (T[q + 1] - T[q]) * (T[q + 3] - T[q + 2])
                sl += T[q + 1] - T[q]
        for q in range(0, 5 * KH * KW, 5):
            dm += (T[q + 1] - T[q]) * (T[q + 3] - T[q + 2])
        for ky in range(KH):
            dl += T[5 * ky * KW + 1] - T[5 * ky * KW]
        inner = (yb - ya) * (xb - xa)
        best = _cost('ws', (sm, sl, n * OC))
        use = 'ws'
        if oss_ok:
            c = _cost('sparse', (kept * inner, kept * (n - inner), n * OC))
            if c < best:
                best = c
                use = 'sparse'
        if not dw and _cost('dense', (dm * C * OC, dl * OW * OC, n * OC)) < best and _fits(OC * cols_n):
            use = 'dense'
    dense = use == 'dense' and not dw
    Kv = None
    if dense:
        try:
            K = _dense_w(ptr, cols, vals, OC, cols_n)
        except MemoryError:  # (a fragmented heap: no block that large) the sparse layout needs no copy
            dense = False
    if dense:
        for r in range(OC):
            if ptr[r] < ptr[r + 1]:  # dense rows are contiguous: p0, p1 only tell empty rows apart
                R[8 * r + 5] = 0
                R[8 * r + 6] = 1
    else:
        # indices rewritten in place to (ci << 8) | tap: no second copy of the weights
        K = cols if cols is not None else _z('H', kept)
        Kv = vals
        for r in range(OC):
            for j in range(ptr[r], ptr[r + 1]):
                c = (j - ptr[r]) if cols is None else cols[j]
                if dw:
                    K[j] = ((r // mult) << 8) | c
                else:
                    K[j] = ((c % C) << 8) | (c // C)
    O = None
    if Kv is not None and use != 'ws' and oss_ok:
        # output-stationary sparse (conv_oss): each kept weight's input offset from the window's corner
        O = _z('H', kept)
        for j in range(kept):
            k = K[j]
            tap = k & 0xFF
            O[j] = ((tap // KW) * W + tap % KW) * C + (k >> 8)
    G = array('i', [OH, OW, OC, sy * W * C, sx * C, z, 0, 0, S, H, W, C, KH, KW, sy, sx, pt, pl, ya, yb, xa, xb])
    P = array('i', [n, 0, OC, 0, 0, yt[4], lo, hi, S])
    return (V.conv, op[1], op[2], op[3], op[4], (m.bufs[xt[3]], m.bufs[yt[3]], G, R, K, T, P, Kv, O))


def _fc(m, op, layout):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals = op[5]
    rows = yt[2]
    n = xt[0] * xt[1] * xt[2]
    R = _rows(m, op, None)
    empty = []
    for r in range(rows):
        if ptr[r] < ptr[r + 1]:
            R[8 * r + 7] = bias[r] - 128 * _sumw(vals, ptr[r], ptr[r + 1])
        else:
            empty.append(r)
    dense = layout == 'dense'
    if layout == 'auto':
        dense = _cost('dense fc', (rows * n, 0, rows)) < _cost('sparse fc', (ptr[rows], 0, rows)) and _fits(rows * n)
    Kv = None
    if dense:
        try:
            K = _dense_w(ptr, cols, vals, rows, n)
        except MemoryError:
            dense = False
    if dense:
        R[5] = 0
        R[6] = n  # fc_dense reads the row length here
    else:
        K = cols
        Kv = vals
        if cols is None:  # (rows expanded by Model(dense=True))
            K = _z('H', ptr[rows])
            for r in range(rows):
                for j in range(ptr[r], ptr[r + 1]):
                    K[j] = j - ptr[r]
    P = array('i', [rows, 0, 1, 0, 8, yt[4], lo, hi, S])
    return (V.fc, 3, op[2], op[3], op[4], (m.bufs[xt[3]], m.bufs[yt[3]], R, K, P, tuple(empty), Kv))


def _s8(v):
    return v - 256 if v > 127 else v


def _pool(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    g = op[5]
    G = array('i', [xt[0], xt[1], xt[2], yt[0], yt[1], g[0], g[1], g[2], g[3], g[4], g[5],
                    g[6] + 128, g[7] + 128])  # (the limits come signed: smf_bodies)
    return (V.pool_, op[1], op[2], op[3], op[4], (m.bufs[xt[3]], m.bufs[yt[3]], G, 1 if op[1] == 5 else 0))


def _mean(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    g = op[5]
    C = xt[2]
    n = xt[0] * xt[1]
    R = array('i', [LO, HI, g[0] | (g[1] << 8), g[2] | (g[3] << 8), _s8(g[4]), 0, 0, 0])
    P = array('i', [C, 0, 1, 0, 0, yt[4], -128, 127, S])
    return (V.mean, 6, op[2], op[3], op[4], (m.bufs[xt[3]], m.bufs[yt[3]], C, n, -(128 + xt[4]) * n, R, P))


def _pad(m, op):
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    g = op[5]
    G = array('i', [xt[0], xt[1], xt[2], yt[0], yt[1], g[0], g[2], g[4]])
    return (V.pad_, 8, op[2], op[3], op[4], (m.bufs[xt[3]], m.bufs[yt[3]], G))


def _add(m, op):
    # ADD: TFLite's int8 add, y = clamp(MBQM(MBQM((a - za) << ls, m1, s1) + MBQM((b - zb) << ls, m2, s2),
    # m_out, s_out) + zo); the inner two depend on one int8 each: tables of 256 int32, indexed by the byte
    from smf_requant import mbqm, lo15, hi16
    t = m.tensors
    at = t[op[2]]
    bt = t[op[3]]
    yt = t[op[4]]
    g = op[5]
    ls = g[15]
    TA = _z('i', 256)
    TB = _z('i', 256)
    for u in range(256):
        v = _s8(u)
        TA[u] = mbqm((v - at[4]) << ls, lo15(g, 0), hi16(g, 0), _s8(g[12]))
        TB[u] = mbqm((v - bt[4]) << ls, lo15(g, 4), hi16(g, 4), _s8(g[13]))
    R = array('i', [LO, HI, g[8] | (g[9] << 8), g[10] | (g[11] << 8), _s8(g[14]), 0, 0, 0])
    P = array('i', [0, 0, 1, 0, 0, yt[4], _s8(g[16]), _s8(g[17]), S])
    b = m.bufs
    return (V.add, 7, op[2], op[3], op[4],
            (b[at[3]], b[bt[3]], b[yt[3]], TA, TB, R, P, yt[0] * yt[1] * yt[2]))


def _requant(m, op):
    # REQUANTIZE: y = clamp(MBQM(x - zi) + zo) for the 256 int8 values, as bytes indexed by the input byte
    from smf_requant import mbqm, lo15, hi16
    t = m.tensors
    xt = t[op[2]]
    yt = t[op[4]]
    g = op[5]
    L = bytearray(256)
    for u in range(256):
        v = mbqm(_s8(u) - xt[4], lo15(g, 0), hi16(g, 0), _s8(g[4])) + yt[4]
        L[u] = (-128 if v < -128 else (127 if v > 127 else v)) & 0xFF
    return (V.requant, 10, op[2], op[3], op[4], (m.bufs[xt[3]], m.bufs[yt[3]], L, yt[0] * yt[1] * yt[2]))


def _slow(m, op):
    # no native kernel (a convolution of unusual geometry): the bytecode kernel, imported only now
    k = getattr(__import__(op[0][0]), op[0][1])
    return (V.slow, op[1], op[2], op[3], op[4], op[5], k) + op[6:]


def prepare(m, layout):
    # replaces m.ops by native-kernel operators; m.vacc: int32 scratch for every kernel
    need = m.acc and len(m.acc) or 0
    for i in range(len(m.ops)):
        op = m.ops[i]
        code = op[1]
        new = None
        if code <= 2:
            new = _conv(m, op, layout)
        elif code == 3:
            new = _fc(m, op, layout)
            need = max(need, m.tensors[op[4]][2])
        elif code in (4, 5):
            new = _pool(m, op)
        elif code == 6:
            new = _mean(m, op)
            need = max(need, m.tensors[op[2]][2])
        elif code == 8:
            new = _pad(m, op)
        elif code == 7:
            new = _add(m, op)
            need = max(need, 64)
        elif code == 10:
            new = _requant(m, op)
        m.ops[i] = new if new is not None else _slow(m, op)
        op = new = None
        gc.collect()  # the decoded rows of this operator are garbage now: peak = one layer in two forms
    if need and (m.acc is None or len(m.acc) < need):  # (the loader's scratch is reused when large enough)
        m.acc = None
        gc.collect()
        m.acc = _z('i', need)
