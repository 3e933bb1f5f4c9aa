# The micro:bit engine's converter (first boot; the bundle runs it on the host instead:
# toolchain.package.bundle.smc_from_smf): checks and decodes a .smf file (docs/sparse-model-format.md) with the
# loaders microbit_check, _tables, _channels, _weights (+ microbit_dec_<encoding>), each compiled, run once and
# dropped, and writes the decoded model to a cache file that microbit_engine.Model reads at the next boot:
#   import microbit_convert; microbit_convert.convert('model.smf', 'model.smc')   # then reset
# (on the micro:bit: import smf_mbc; smf_mbc.convert(...)). Its own loaders, not the general engine's: those do
# not fit the micro:bit's heap here (README.md, measured).
# On MicroPython 1.9.2 the heap cannot hold the loaders' compiled code and the runtime together (each
# module's compilation needs about 3x its source in free heap); on other ports both can run in one go.
# Cache 'model.smc' (little-endian): b'SMC1', h[7] = (buffers, tensors, ops, input, output, input size,
# output size), H[buffers] sizes, h[5 x tensors] (h, w, c, buffer, zero point), then per operator
# h[5] = (opcode, in, out, rows, kept) followed by h[8] pool params (AVERAGE_POOL_2D; act min/max signed) or, for fully
# connected, h[2] act min/max, i[rows] bias, H[rows] mult bits 0..14, H[rows] bits 15..30, b[rows] shift,
# H[rows + 1] row pointers, H[kept] columns, b[kept] values.

def drop(mod):
    # forget a loader module's code (1.9.2 has no sys.modules: there, one conversion per boot)
    import sys
    for k in dir(mod):
        if k[0] != '_':
            setattr(mod, k, None)
    if hasattr(sys, 'modules'):
        sys.modules.pop(mod.__name__)
    import gc
    gc.collect()


class Loaded:
    pass


def convert(src, dst):
    m = Loaded()
    w = __import__('microbit_weights')  # (the biggest compile first, on the cleanest heap)
    mod = __import__('microbit_check')
    m.bufs = mod.load(src)  # checks (ValueError naming the failed one); buffer sizes
    drop(mod)
    for n in ('microbit_tables', 'microbit_channels'):  # tables and operators, channel blocks
        mod = __import__(n)
        mod.load(m, src)
        drop(mod)
    w.load(m, src)  # weights
    w.write(m, dst)
    drop(w)
