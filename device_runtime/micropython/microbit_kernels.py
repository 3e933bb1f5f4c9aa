# The micro:bit engine's kernels (imported by microbit_engine), bit-exact with TFLite Micro: the general engine's
# requantization and AVERAGE_POOL_2D kernel (smf_requant.mbqm, smf_avgpool.avgpool) and a FULLY_CONNECTED kernel
# of its own. On the micro:bit the bundle links mbqm and avgpool into this module, shipped as smf_mbk
# (toolchain.package.microbit.link_source): one module compiled and held, not three, and without smf_requant's
# lo15/hi16. fc is smf_fc.fc without the rows of dense-encoded weights (cols None), which the micro:bit's converter
# never gives (it keeps nonzero weights only): sharing smf_fc.fc leaves 48 B less free heap there (README.md).
# A separate module from microbit_engine: on MicroPython 1.9.2 a module's compilation needs about 3x its (minified)
# source in free heap.
from smf_avgpool import avgpool  # noqa: F401 (the engine's kernel)
from smf_requant import mbqm


def fc(m, o):
    # y = clamp(MBQM(bias' + sum(w * x)) + zp_out) over kept weights (zp_in folded into bias'); rows
    # without kept weights hold their constant output in bias'
    t = m.tensors
    x = m.bufs[t[o[2]][3]]
    Y = t[o[4]]
    y = m.bufs[Y[3]]
    lo, hi, B, L, H, S, P, C, V = o[5]
    for r in range(Y[2]):
        a = B[r]
        p = P[r]
        q = P[r + 1]
        if p < q:
            for j in range(p, q):
                a += V[j] * x[C[j]]
            a = mbqm(a, L[r], H[r], S[r]) + Y[4]
            a = lo if a < lo else hi if a > hi else a
        y[r] = a
