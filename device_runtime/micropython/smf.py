# Sparse int8 inference engine (MicroPython 1.9.2 .. 1.29, also CPython). Format: docs/sparse-model-format.md;
# what each module is: README.md here.
#   m = Model(open('model.smf', 'rb').read())   # or Model('model.smf'): read piecewise (small boards)
#   out = m.infer(input_bytes)  # int8 in, array('b') out (reused by the next call)
# Loading runs loader modules whose code is dropped afterwards (load() below); kernels (smf_fc, smf_conv, ...)
# are imported only if the model uses them: on a micro:bit every module is compiled from source on the device
# and its code stays in the heap.


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


def load(m, data, dense=False):
    # the loaders, each imported, run and dropped: header and CRC (smf_check), tables (smf_tables), operator
    # bodies (smf_bodies: parameters by smf_params, weights by one decoder per encoding), constant rows
    # (smf_const_rows). Fills m.tensors, m.ops, m.bufs (activation buffers, array('b')), m.acc (int32
    # scratch), m.out (output array), m.input, m.output, m.input_size; ops[i] = (kernel (module, function),
    # opcode, in0, in1, out, params). Imports happen here, at a shallow call depth: the compiler is recursive.
    import gc
    import smf_reader  # (helpers for the loaders: compiled first, while the heap is still in one piece)
    gc.collect()
    import smf_check
    smf_check.load(data)
    drop('smf_check')
    import smf_tables
    smf_tables.load(m, data)
    drop('smf_tables')
    buffers(m)
    import smf_params  # (before smf_bodies, which imports it: no compile nested in another module's import)
    import smf_bodies
    for e in smf_bodies.load(m, data, dense):  # channel blocks and weights of every operator
        drop(e)  # (the weight decoders used)
    drop('smf_bodies')
    drop('smf_params')
    drop('smf_reader')
    import smf_const_rows
    for o in m.ops:
        if o[1] <= 3:  # (opcodes 1..3: the weighted operators, docs/sparse-model-format.md)
            smf_const_rows.load(m, o)
    drop('smf_const_rows')


def buffers(m):
    # the activation buffers and the int32 scratch, biggest first, as soon as their sizes are known: before
    # the weights, parameter blocks and native code split the heap. (Made last, they did not fit: a 1 %
    # ResNet-8 left 146 KB free but no 18.5 KB block for its padded 34x34x16 map on the Cortex-M3 board.)
    # One zeroed block is the initialiser of every buffer: array() copies a memoryview item by item into an
    # array of exactly its length, where a bytearray initialiser would need a temporary per buffer.
    from array import array
    b = m.bufs
    n = max(b + [4 * m.acc, m.out])
    z = memoryview(bytearray(n))
    order = sorted(range(len(b)), key=lambda i: -b[i])
    for i in order:
        b[i] = array('b', z[:b[i]])
    m.acc = array('i', z[:m.acc]) if m.acc else None
    m.out = array('b', z[:m.out])
    z = None


class Model:
    def __init__(self, data, dense=False, native=None, layout='auto'):
        # dense=True runs the same kernels over every weight (zeros included): the baseline for benchmarks
        # native: None = the viper kernels (smf_viper) where the port can run them, else bytecode; False =
        # bytecode; True = viper or an error. layout (viper only): 'auto' (per layer, cost model),
        # 'sparse' (kept weights only) or 'dense' (every weight, contiguous loops)
        # after loading: tensors[i] = (h, w, c, buffer, zero_point); input, output: tensor ids;
        # input_size; ops[i] = (kernel, opcode, in0, in1, out, params); v: the native kernels' module or None
        load(self, data, dense)
        if [o for o in self.ops if o[1] < 3]:  # convolutions (opcodes 1, 2): clamp limits (smf_clamp_limits)
            import smf_clamp_limits
            for i in range(len(self.ops)):
                if self.ops[i][1] < 3:
                    self.ops[i] = smf_clamp_limits.load(self, self.ops[i])
            drop('smf_clamp_limits')
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
        if self.v:  # native kernels: parameter blocks and per-layer layout (smf_viper_prep, dropped afterwards)
            import smf_viper_prep
            smf_viper_prep.prepare(self, layout)
            drop('smf_viper_prep')

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
