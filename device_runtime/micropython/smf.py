# Sparse int8 inference engine (MicroPython 1.9.2 .. 1.29, also CPython). Format: docs/sparse-model-format.md.
#   m = Model(open('model.smf', 'rb').read())   # or Model('model.smf'): read piecewise (small boards)
#   out = m.infer(input_bytes)  # int8 in, array('b') out (reused by the next call)
# Loading runs loader modules whose code is dropped afterwards (smf_u: helpers, smf_chk: checks, smf_ld:
# tables, smf_w, smf_e<n>, smf_k, smf_thr: parameters and weights); kernels (smf_fc, smf_conv, ...) are imported only if the model uses
# them: on a micro:bit every module is compiled from source on the device and its code stays in the heap.


def drop(name):
    # forget a loader module: MicroPython 1.9.2 (micro:bit) has no sys.modules, but clearing the module's
    # attributes frees its function objects (there, a second model per boot cannot be loaded)
    import gc
    import sys
    m = __import__(name)
    for k in dir(m):
        if k[0] != '_':
            setattr(m, k, None)
    if hasattr(sys, 'modules'):
        del sys.modules[name]
    gc.collect()


class Model:
    def __init__(self, data, dense=False, native=None, layout='auto'):
        # dense=True runs the same kernels over every weight (zeros included): the baseline for benchmarks
        # native: None = the viper kernels (smf_viper) where the port can run them, else bytecode; False =
        # bytecode; True = viper or an error. layout (viper only): 'auto' (per layer, cost model),
        # 'sparse' (kept weights only) or 'dense' (every weight, contiguous loops)
        # after loading: tensors[i] = (h, w, c, buffer, zero_point); input, output: tensor ids;
        # input_size; ops[i] = (kernel, opcode, in0, in1, out, params)
        # imports happen here, at a shallow call depth: the compiler is recursive and the micro:bit stack small
        import gc
        import smf_u  # (helpers for the loaders: compiled first, while the heap is still in one piece)
        gc.collect()
        import smf_chk
        smf_chk.load(data)
        drop('smf_chk')
        import smf_ld
        smf_ld.load(self, data)
        drop('smf_ld')
        import smf_wl
        smf_wl.load(self, data, dense)  # channel blocks and weights of every operator
        drop('smf_wl')
        drop('smf_w')
        drop('smf_u')
        import smf_k
        for o in self.ops:
            if o[1] <= 3:
                smf_k.load(self, o)
        drop('smf_k')
        if [o for o in self.ops if o[1] < 3]:  # convolutions: clamp limits (smf_thr)
            import smf_thr
            for i in range(len(self.ops)):
                if self.ops[i][1] < 3:
                    self.ops[i] = smf_thr.load(self, self.ops[i])
            drop('smf_thr')
        self.v = None
        if native is not False:
            try:  # SyntaxError: no native emitter (WebAssembly); ValueError: .mpy of another architecture
                import smf_viper
                self.v = smf_viper
            except (ImportError, SyntaxError, ValueError):
                if native:
                    raise
        for i in range(len(self.ops)):
            o = self.ops[i]
            if not self.v:  # (the native path imports a bytecode kernel only for operators it lacks)
                self.ops[i] = (getattr(__import__(o[0][0]), o[0][1]),) + o[1:]
        # activation buffers last: the biggest allocations, made once code loading is over
        from array import array
        for i in range(len(self.bufs)):
            self.bufs[i] = array('b', bytearray(self.bufs[i]))  # (bytearray initialisers are copied raw)
        self.acc = array('i', bytearray(4 * self.acc)) if self.acc else None
        self.out = array('b', bytearray(self.out))
        if self.v:  # native kernels: parameter blocks and per-layer layout (smf_vp, dropped afterwards)
            import smf_vp
            smf_vp.prepare(self, layout)
            drop('smf_vp')

    def input_buffer(self):
        # the array('b') whose first input_size entries infer() reads (it may be longer: buffers are shared);
        # fill them (e.g. f.readinto(memoryview(b)[:m.input_size])) and call infer() to avoid a copy
        return self.bufs[self.tensors[self.input][3]]

    def infer(self, x=None):
        # x: int8 input as bytes/bytearray (two's complement) or array('b'), or None if input_buffer() was
        # filled; returns the output as array('b'), reused by the next call
        if self.v:
            return self.v.infer(self, x)
        if x is not None:
            b = self.input_buffer()
            for i in range(self.input_size):
                v = x[i]
                b[i] = v - 256 if v > 127 else v
        ops = self.ops
        for i in range(len(ops)):  # (iterating the list itself would allocate an iterator)
            op = ops[i]
            op[0](self, op)
        b = self.bufs[self.tensors[self.output][3]]
        o = self.out
        for i in range(len(o)):
            o[i] = b[i]
        return o
