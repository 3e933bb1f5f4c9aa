# microbit_engine loader, part 4 (run once by microbit_convert.convert, then dropped): the weights block of every fully
# connected operator, decoded by microbit_dec_<encoding> (only the encodings used are compiled) into rows of
# kept weights (ptr[r]..ptr[r+1] index cols and vals); the input zero point is folded into the bias and
# rows without kept weights get their constant output instead (converters saturate their biases).
# write(): the decoded model -> the cache file that microbit_engine.Model reads (layout: microbit_convert).
from array import array

# the decoder module of each weight encoding (on the micro:bit, where they are smf_mbe<encoding>, the '# microbit:'
# line below names them: a table of names does not fit the converter's heap there, measured)
DECODERS = ('microbit_dec_dense', 'microbit_dec_bitmap', 'microbit_dec_csr', 'microbit_dec_rle')  # microbit:


def put(s, q, v):
    # weight v (u8) at position q of the row-major [rows, cols] matrix, if kept
    if v:
        j = s[4]
        s[0][q // s[3] + 1] += 1
        s[1][j] = q % s[3]
        s[2][j] = v - 256 if v > 127 else v
        s[4] = j + 1


def mbqm(x, L, H, s):
    # TFLite's MultiplyByQuantizedMultiplier with plain (big) ints: load time only
    if s > 0:
        x <<= s
    t = x * (H << 15 | L)
    t += 0x40000000 if t >= 0 else 1 - 0x40000000
    v = t >> 31 if t >= 0 else -(-t >> 31)
    e = -s if s < 0 else 0
    r = v & (1 << e) - 1
    v >>= e
    return v + (r > ((1 << e) - 1 >> 1) + (v < 0))


def fold(g, s, zi, zo):
    lo, hi, B, L, H, S = g[:6]
    P = s[0]
    for r in range(len(B)):
        a = P[r]
        P[r + 1] += a
        if a < P[r + 1]:
            for i in range(a, P[r + 1]):
                B[r] -= zi * s[2][i]
        else:
            v = mbqm(B[r], L[r], H[r], S[r]) + zo
            # (int(str()): a small int; 1.9.2 stores a negative big int into array('i') wrongly)
            B[r] = int(str(lo if v < lo else hi if v > hi else v))
    return lo, hi, B, L, H, S, P, s[1], s[2]


def load(m, path):
    import microbit_convert
    T = m.tensors
    f = open(path, 'rb')
    q = 0
    E = {}  # decoder modules used: dropped at the end (1.9.2 cannot import a dropped module again)
    for i in range(len(m.ops)):
        o = m.ops[i]
        if o[1] != 5:
            g = o[5]
            while q < g[6]:  # (skip to the weights block)
                q += len(f.read(min(64, g[6] - q)))
            d = f.read(16)
            R = len(g[2])
            k = d[8] | d[9] << 8 | d[10] << 16
            s = [array('H', bytearray(2 * R + 2)), array('H', bytearray(2 * k)), array('b', bytearray(k)),
                 d[4] | d[5] << 8 | d[6] << 16, 0]
            if d[0] not in E:
                E[d[0]] = __import__(DECODERS[d[0]])  # microbit: E[d[0]] = __import__('smf_mbe%d' % d[0])
            e = E[d[0]]
            d = d + f.read(d[12] | d[13] << 8 | d[14] << 16)
            q += len(d)
            e.dec(d, 0, R, k, s, put)
            d = e = None
            m.ops[i] = o[:5] + (fold(g, s, T[o[2]][4], T[o[4]][4]),)
    f.close()
    for e in E:
        microbit_convert.drop(E[e])


def write(m, dst):
    f = open(dst, 'wb')
    f.write(b'SMC1')
    f.write(array('h', [len(m.bufs), len(m.tensors), len(m.ops), m.input, m.output, m.input_size, len(m.out)]))
    f.write(array('H', m.bufs))
    for t in m.tensors:
        f.write(array('h', t))
    for o in m.ops:
        g = o[5]
        if o[1] == 5:
            f.write(array('h', [5, o[2], o[4], 8, 0]))
            f.write(array('h', g))
        else:
            f.write(array('h', [o[1], o[2], o[4], len(g[2]), len(g[8])]))
            f.write(array('h', g[:2]))
            for a in g[2:]:
                f.write(a)
    f.close()
