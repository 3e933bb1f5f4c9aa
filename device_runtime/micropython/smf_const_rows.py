# Loader, part 4: rows without kept weights give a constant output, computed once and stored in place of
# the bias (converters give such channels saturated biases, whose requantization would allocate big ints
# at every inference). Kernels test ptr[r] == ptr[r + 1].
from smf_requant import mbqm


def load(m, op):
    geo, lo, hi, bias, ml, mh, sh, ptr, cols, vals = op[5]
    zp = m.tensors[op[4]][4]
    for r in range(len(bias)):
        if ptr[r] == ptr[r + 1]:
            v = mbqm(bias[r], ml[r], mh[r], sh[r]) + zp
            # (int(str()): a small int; 1.9.2 stores a negative big int, which a saturated bias gives, into
            # array('i') wrongly)
            bias[r] = int(str(lo if v < lo else (hi if v > hi else v)))
