# Loader, part 3 driver: reads operator bodies in file order, one at a time, and decodes them with smf_w
# and the smf_e<encoding> modules (imported only if used). A separate module: small compile units.
from smf_u import src, rd, skip
from smf_w import encoding, params


def load(m, data, dense):
    expand = None
    if dense:  # baseline: decoded rows expanded to every weight
        import smf_dense
        expand = smf_dense.load
    used = ['smf_dense'] if dense else []
    r = src(data)
    for i in range(len(m.ops)):  # bodies are read in file order, one at a time
        o = m.ops[i]
        skip(r, o[5][0] - r[2])
        d = rd(r, o[5][1])
        if o[1] <= 3:  # weighted op: decode its weights with the module for the block's encoding
            e = 'smf_e%d' % encoding(m, d, o)
            if e not in used:
                used.append(e)
            m.ops[i] = params(m, d, o, __import__(e).load, expand)
        else:  # fixed-size bodies are kept as bytes: kernels unpack them
            m.ops[i] = o[:5] + (d,)
        d = None
    if r[0]:
        r[0].close()
    from smf import drop
    for e in used:
        drop(e)
