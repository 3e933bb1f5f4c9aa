# Loader, part 3 driver: reads operator bodies in file order, one at a time, and decodes them with smf_params
# and the decoder module of each weights block's encoding (DECODERS, generated from the host's format module;
# imported only if used). A separate module: small compile units.
from smf_reader import _u32, _s8, src, rd, skip
from smf_params import block, params

# -- generated from toolchain/contracts/smf.py DECODERS by toolchain.package.load.engine_tables: edit it there --
# weight encoding -> the module whose load(d, p, rows, cols) decodes it
DECODERS = (
    'smf_dec_dense',  # 0 dense
    'smf_dec_bitmap',  # 1 bitmap
    'smf_dec_csr',  # 2 csr
    'smf_dec_rle',  # 3 rle
)
# -- end of generated DECODERS --


def load(m, data, dense):
    # -> the decoder modules it imported (smf.load drops them)
    expand = None
    if dense:  # baseline: decoded rows expanded to every weight
        import smf_dense_baseline
        expand = smf_dense_baseline.load
    used = ['smf_dense_baseline'] if dense else []
    r = src(data)
    for i in range(len(m.ops)):  # bodies are read in file order, one at a time
        o = m.ops[i]
        skip(r, o[5][0] - r[2])
        d = rd(r, o[5][1])
        if o[1] <= 3:  # weighted op (opcodes 1..3): decode its weights with the module for the block's encoding
            p = block(m, d, o)
            e = DECODERS[d[p]]
            if e not in used:
                used.append(e)
            w = __import__(e).load(d, p, m.tensors[o[4]][2], _u32(d, p + 4))  # (rows, columns)
            m.ops[i] = params(m, d, o, w, expand)
            w = None
        elif o[1] <= 5:  # pooling (4, 5): the 8 parameters, act min/max signed (the kernels unpack them as they are)
            m.ops[i] = o[:5] + (tuple(d[:6]) + (_s8(d[6]), _s8(d[7])),)
        else:  # other fixed-size bodies are kept as bytes: kernels unpack them
            m.ops[i] = o[:5] + (d,)
        d = None
    if r[0]:
        r[0].close()
    return used
