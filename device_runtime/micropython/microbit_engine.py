# Sparse int8 engine for the BBC micro:bit v1 (MicroPython 1.9.2, ~9.7 KB heap), for the subset small MLPs
# use: FULLY_CONNECTED (and CONV_2D with a 1x1 kernel on a 1x1 map, the same layer), AVERAGE_POOL_2D,
# RESHAPE, any weight encoding. The general engine's kernels (microbit_kernels) and loaders (microbit_convert),
# bit-exact with TFLite Micro. 1.9.2 compiles .py on the device (a module's compilation needs about 3x its
# minified source in free heap), so loading is split from running: at a first boot microbit_convert.convert
# checks and decodes the .smf (docs/sparse-model-format.md) into a cache file; this runtime module reads it:
#   import microbit_convert; microbit_convert.convert('model.smf', 'model.smc')      # first boot, then reset
#   import microbit_kernels, microbit_engine                                          # second boot
#   m = microbit_engine.Model('model.smc'); out = m.infer(input_bytes)                # or fill m.input_buffer()
# Import microbit_kernels first: the bigger compile on the cleaner heap. On the micro:bit these modules are
# smf_mbc, smf_mbk and smf_mb, minified (toolchain.package.microbit: every identifier is a heap qstr there).
from array import array

from microbit_kernels import avgpool, fc


def rd(f, t, n):
    # n items of type t from the cache file
    a = array(t, bytearray(n * (4 if t == 'i' else 2 if t in 'hH' else 1)))
    f.readinto(a)
    return a


class Model:
    def __init__(self, path):
        # path: the model cache written by microbit_convert.convert. As smf.Model: tensors[i] = (h, w, c, buffer,
        # zero_point); ops[i] = (kernel, opcode, in0, in1, out, params) without RESHAPEs; bufs; input,
        # output (tensor ids), input_size; out (the output array, reused)
        f = open(path, 'rb')
        if f.read(4) != b'SMC1':
            raise ValueError('not a smf_mb model cache (write one with smf_mbc.convert)')  # (shipped names)
        h = rd(f, 'h', 7)
        self.input = h[3]
        self.output = h[4]
        self.input_size = h[5]
        b = list(rd(f, 'H', h[0]))
        for i in range(h[0]):  # activation buffers first: the biggest blocks
            b[i] = array('b', bytearray(b[i]))
        self.bufs = b
        self.out = array('b', bytearray(h[6]))
        t = []
        for _ in range(h[1]):
            t.append(tuple(rd(f, 'h', 5)))
        self.tensors = t
        self.ops = []
        for _ in range(h[2]):
            o = rd(f, 'h', 5)
            if o[0] == 5:
                g = (avgpool, tuple(rd(f, 'h', 8)))
            else:
                R = o[3]
                g = (fc, tuple(rd(f, 'h', 2)) + (rd(f, 'i', R), rd(f, 'H', R), rd(f, 'H', R), rd(f, 'b', R),
                                                  rd(f, 'H', R + 1), rd(f, 'H', o[4]), rd(f, 'b', o[4])))
            self.ops.append((g[0], o[0], o[1], 0xFFFF, o[2], g[1]))
        f.close()

    def input_buffer(self):
        # the int8 array whose first input_size entries infer() reads
        return self.bufs[self.tensors[self.input][3]]

    def infer(self, x=None):
        # x: int8 input as bytes (two's complement) or array('b'), or None if input_buffer() was filled;
        # returns the output as array('b'), reused by the next call
        if x is not None:
            b = self.input_buffer()
            for i in range(self.input_size):
                v = x[i]
                b[i] = v - 256 if v > 127 else v
        o = self.ops
        for i in range(len(o)):
            o[i][0](self, o[i])
        b = self.bufs[self.tensors[self.output][3]]
        o = self.out
        for i in range(len(o)):
            o[i] = b[i]
        return o
