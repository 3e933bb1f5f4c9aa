# Loader, part 3: per-operator parameters. Weight blocks are decoded by smf_dec_<encoding> (one small module
# per encoding, imported by smf_bodies only if used) into rows: ptr[r]..ptr[r+1] index cols and vals (int8).
# Small functions on purpose: each function's bytecode needs one contiguous block of a tiny heap.
from array import array
from smf_reader import _u32, _s8


def block(m, d, o):
    # position of the weights block in body d of operator o = (kernel, code, in0, in1, out, ...): after the
    # geometry (convolutions), act min/max and the channel block (bias, multiplier, shift per output row)
    return (8 if o[1] < 3 else 0) + 4 + 9 * m.tensors[o[4]][2]


def _mult(d, p, rows):
    # multipliers split into bits 0..14 and 15..30, so that no value reaches 2**30
    ml = array('H', bytearray(2 * rows))  # (not zeros(): one call level less, see smf_reader._u32)
    mh = array('H', bytearray(2 * rows))
    for r in range(rows):
        q = p + 4 * r
        ml[r] = d[q] | ((d[q + 1] & 0x7F) << 8)
        mh[r] = (d[q + 1] >> 7) | (d[q + 2] << 1) | (d[q + 3] << 9)
    return ml, mh


def _fold(bias, ptr, vals, zp, r):
    # input zero point folded into the bias: acc = bias - zp*sum(w) + sum(w*x)
    s = 0
    for j in range(ptr[r], ptr[r + 1]):
        s += vals[j]
    bias[r] -= zp * s


def params(m, d, o, w, expand):
    # o with its body (bytes d) replaced by (geometry, act min, act max, bias, ml, mh, shift, ptr, cols, vals);
    # w = (ptr, cols, vals): its weights block decoded (smf_bodies calls the decoder: one call level less)
    code = o[1]
    a = o[2]
    y = o[4]
    p = 0
    geo = None
    if code < 3:
        geo = d[p:p + 8]
        p += 8
    lo = _s8(d[p])
    hi = _s8(d[p + 1])
    p += 4
    rows = m.tensors[y][2]
    bias = array('i', bytearray(d[p:p + 4 * rows]))  # int32 little-endian, copied raw
    ml, mh = _mult(d, p + 4 * rows, rows)
    sh = array('b', bytearray(d[p + 8 * rows:p + 9 * rows]))
    p += 9 * rows
    n = _u32(d, p + 4)  # columns
    ptr, cols, vals = w
    if expand is not None and cols is not None:
        ptr, cols, vals = expand(ptr, cols, vals, rows, n)
    for r in range(rows):
        if ptr[r] < ptr[r + 1]:  # (rows without kept weights: smf_const_rows)
            _fold(bias, ptr, vals, m.tensors[a][4], r)
    return o[:5] + ((geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals),)

