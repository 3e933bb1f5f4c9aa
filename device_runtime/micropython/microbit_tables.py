# microbit_engine loader, part 2 (run once by microbit_convert.convert, then dropped): buffer sizes, tensor table and operators;
# fully connected layers are decoded afterwards by microbit_channels.
# (Small functions: each function's bytecode needs one contiguous block of a fragmented heap.)
from array import array


def u16(d, p):
    return d[p] | d[p + 1] << 8


def s8(v):
    return v - 256 if v > 127 else v


def tables(m, r):
    # header, buffer sizes, tensor table (h, w, c, buffer, zero point)
    h = r(24)
    m.input = u16(h, 18)
    m.output = u16(h, 20)
    r(4 * u16(h, 16))  # (buffer sizes: microbit_check)
    d = r(12 * u16(h, 12))
    m.tensors = [(u16(d, p), u16(d, p + 2), u16(d, p + 4), d[p + 6], s8(d[p + 7])) for p in range(0, len(d), 12)]
    m.ops = []
    return u16(h, 14)


def op(m, r, q):
    # one operator at file offset q: header, body -> m.ops entry (kernel, opcode, in0, in1, out, params);
    # fully connected params are (file offset, length) of the body until microbit_channels decodes them
    T = m.tensors
    d = r(12)
    c = d[0]
    a = u16(d, 2)
    y = u16(d, 6)
    n = u16(d, 8) | u16(d, 10) << 16
    d = r(n)
    if c == 5:
        m.ops.append((None, c, a, 0xFFFF, y, tuple(d[0:6]) + (s8(d[6]), s8(d[7]))))
    elif c == 3 or c == 1 and d[0:8] == b'\x01\x01\x01\x01\x00\x00\x01\x00' and T[a][0] * T[a][1] == 1:
        # FULLY_CONNECTED, or a CONV_2D that is one (1x1 kernel, stride 1, no padding, 1x1 input)
        m.ops.append((None, c, a, 0xFFFF, y, (q + 12, n)))
    elif c != 9:  # (RESHAPE: the writer aliases its buffers)
        raise ValueError('operator %d not supported by smf_mb' % c)  # noqa: UP031
    return q + 12 + n


def load(m, path):
    f = open(path, 'rb')
    n = tables(m, f.read)
    q = 24 + 4 * len(m.bufs) + 12 * len(m.tensors)
    for _ in range(n):
        q = op(m, f.read, q)
    f.close()
    T = m.tensors
    t = T[m.input]
    m.input_size = t[0] * t[1] * t[2]
    t = T[m.output]
    m.out = array('b', bytearray(t[0] * t[1] * t[2]))
