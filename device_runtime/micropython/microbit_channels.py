# microbit_engine loader, part 3 (run once by microbit_convert.convert, then dropped): the channel block of every fully
# connected operator -> (act_min, act_max, bias, multiplier bits 0..14, bits 15..30, shift, file offset
# of its weights block, rows); microbit_weights decodes the weights.
from array import array


def load(m, path):
    f = open(path, 'rb')
    T = m.tensors
    q = 0
    for i in range(len(m.ops)):
        o = m.ops[i]
        if o[1] != 5:
            while q < o[5][0]:  # (skip to the body)
                q += len(f.read(min(64, o[5][0] - q)))
            R = T[o[4]][2]
            p = 8 if o[1] == 1 else 0
            d = f.read(p + 4 + 9 * R)
            q += len(d)
            lo, hi = array('b', bytearray(d[p:p + 2]))
            p += 4
            L = array('H', bytearray(2 * R))
            H = array('H', bytearray(2 * R))
            for r in range(R):  # int32 multipliers -> bits 0..14 and 15..30 (small ints)
                j = p + 4 * R + 4 * r
                L[r] = d[j] | (d[j + 1] & 0x7F) << 8
                H[r] = d[j + 1] >> 7 | d[j + 2] << 1 | d[j + 3] << 9
            m.ops[i] = o[:5] + ((lo, hi, array('i', bytearray(d[p:p + 4 * R])), L, H,
                                 array('b', bytearray(d[p + 8 * R:p + 9 * R])), q),)
            d = None
    f.close()
