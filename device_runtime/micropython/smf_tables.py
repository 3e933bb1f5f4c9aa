# Loader, part 2: activation buffers, tensor table and operator table of a sparse model file.
# Imported by smf.load, dropped afterwards. KERNELS: generated from the host's format module (one table).
from smf_reader import _u16, _u32, _s8, src, rd, skip

# -- generated from toolchain/contracts/smf.py KERNELS by toolchain.package.load.engine_tables: edit it there --
# opcode -> (module, function) of its kernel; None: no kernel (RESHAPE: the writer aliases its buffers)
KERNELS = (
    None,  # 0 (none)
    ('smf_conv', 'conv'),  # 1 CONV_2D
    ('smf_conv', 'conv'),  # 2 DEPTHWISE_CONV_2D
    ('smf_fc', 'fc'),  # 3 FULLY_CONNECTED
    ('smf_maxpool', 'maxpool'),  # 4 MAX_POOL_2D
    ('smf_avgpool', 'avgpool'),  # 5 AVERAGE_POOL_2D
    ('smf_mean', 'mean'),  # 6 MEAN
    ('smf_elementwise', 'add'),  # 7 ADD
    ('smf_elementwise', 'pad'),  # 8 PAD
    None,  # 9 RESHAPE
    ('smf_elementwise', 'requant'),  # 10 REQUANTIZE
)
# -- end of generated KERNELS --


def load(self, s):
    # fills the tensor table, buffer sizes and self.ops = [(kernel, code, in0, in1, out, (offset, length))]
    r = src(s)
    d = rd(r, 24)
    nt = _u16(d, 12)
    no = _u16(d, 14)
    nb = _u16(d, 16)
    self.input = _u16(d, 18)
    self.output = _u16(d, 20)
    self.acc = _u16(d, 22)  # scratch words
    d = rd(r, 4 * nb)
    self.bufs = [_u32(d, 4 * i) for i in range(nb)]  # sizes; allocated once loading is over
    d = rd(r, 12 * nt)
    self.tensors = []  # (h, w, c, buffer, zero_point); scales are not needed on the device
    for p in range(0, 12 * nt, 12):
        self.tensors.append((_u16(d, p), _u16(d, p + 2), _u16(d, p + 4), d[p + 6], _s8(d[p + 7])))
    t = self.tensors[self.output]
    self.out = t[0] * t[1] * t[2]
    t = self.tensors[self.input]
    self.input_size = t[0] * t[1] * t[2]
    self.ops = []
    for i in range(no):
        d = rd(r, 12)
        code = d[0]
        a = _u16(d, 2)
        b = _u16(d, 4)
        y = _u16(d, 6)
        n = _u32(d, 8)
        if a >= nt or y >= nt or (b != 0xFFFF and b >= nt):
            raise ValueError('sparse model file is malformed at operator %d' % i)
        if code == 0 or code >= len(KERNELS):
            raise ValueError('operator code %d is not supported by this engine' % code)
        if KERNELS[code] is not None:
            self.ops.append((KERNELS[code], code, a, b, y, (r[2], n)))
        skip(r, n)
    if r[0]:
        r[0].close()
