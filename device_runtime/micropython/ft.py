# On-device forward-only ZO fine-tuning (docs/ondevice.md), MicroPython 1.9.2 .. 1.29 and CPython.
# Trainable set: the model's last dense layer (FULLY_CONNECTED or 1x1 CONV_2D over a 1x1 input), kept
# weights row-major then biases, float32 in one array('f'): the canonical active vector of docs/zo.md.
# The layers before it run int8 in the smf engine, once per sample and round (they are not trained):
# logits_r = b_r + s * sum_j w_j * (q_col[j] - zp), q = the head's int8 input, s its scale.
# head.bin (little-endian): f32 w[nnz + rows], u16 ptr[rows + 1], cols[nnz] (u8 if cols <= 256 else u16).
import math
from array import array

import zo


def _halves(s):
    # (s >> 16, s & 65535) as small ints: on MicroPython, arithmetic on a big int (a seed >= 2**30) returns heap
    # ints even when the result is small, and zo would then allocate at every hash (MemoryError on the micro:bit)
    return int(float(s >> 16)), int(float(s & 65535))


class FineTuner:
    # Fields: model, head_op (index of the head in model.ops), cols / rows (head inputs / outputs), in_zp,
    # in_scale (the head input's quantization), mode (estimator), w (trainable: kept weights then biases),
    # ptr / col_idx (the kept weights' rows and columns), w0 (w's copy for an exact restore), logits, feat_buf
    # (the batch's head inputs minus in_zp), batch (its size), labels, g (the round's scalars). On the micro:bit
    # they are shipped with the short names of README.md (toolchain.package.microbit.MICROBIT_ATTRS): every
    # attribute name is a heap qstr there.
    def __init__(self, model, spec):
        # model: smf.Model, or None if probe/accuracy get the head's int8 inputs (features) directly
        h = spec['head']
        self.model = model
        self.head_op = h['op']
        self.cols = h['cols']
        self.rows = h['rows']
        self.in_zp = h['in_zp']
        self.in_scale = h['in_scale']
        self.mode = ('forward', 'central', 'one_point').index(spec.get('estimator', 'forward'))
        f = open(h['file'], 'rb')
        self.w = array('f', bytearray(f.read(4 * (h['nnz'] + self.rows))))
        self.ptr = array('H', bytearray(f.read(2 * self.rows + 2)))
        self.col_idx = array('B' if self.cols <= 256 else 'H', bytearray(f.read(h['nnz'] * (1 if self.cols <= 256 else 2))))
        f.close()
        # exact restore from a copy (bit-identical with the server) unless the spec saves that memory
        self.w0 = array('f', self.w) if spec.get('copy_restore', 1) else None
        self.logits = [0.0] * self.rows
        self._buf(spec.get('batch_max', 16))
        self.batch = 0
        self.labels = None
        self.g = array('f', bytearray(4 * spec.get('k_max', 16)))  # the round's scalars (reallocated if K changes)

    def _buf(self, n):
        # head inputs minus their zero point, n samples x cols, allocated once (grown if a batch is larger):
        # one byte each when zp = -128 (ReLU features: q - zp in 0..255), else int16
        self.feat_buf = None
        b = self.in_zp == -128
        self.feat_buf = array('B' if b else 'h', bytearray(n * self.cols * (1 if b else 2)))

    def _feats(self, xs):
        n = len(xs)
        nf = self.cols
        if len(self.feat_buf) < n * nf:
            self._buf(n)
        fb = self.feat_buf
        zp = self.in_zp
        m = self.model
        for s in range(n):
            x = xs[s]
            if m is not None:
                b = m.input_buffer()
                for i in range(m.input_size):
                    v = x[i]
                    b[i] = v - 256 if v > 127 else v
                ops = m.ops
                for i in range(self.head_op):
                    o = ops[i]
                    o[0](m, o)
                x = m.bufs[m.tensors[ops[self.head_op][2]][3]]
            b = s * nf
            for i in range(nf):
                v = x[i]
                fb[b + i] = (v - 256 if v > 127 else v) - zp
        self.batch = n

    def _logits(self, i):
        w = self.w
        p = self.ptr
        c = self.col_idx
        fb = self.feat_buf
        z = self.logits
        b = i * self.cols
        nz = p[self.rows]
        for r in range(self.rows):
            a = 0.0
            for j in range(p[r], p[r + 1]):
                a += w[j] * fb[b + c[j]]
            z[r] = w[nz + r] + self.in_scale * a
        return z

    def _loss(self):
        # mean cross-entropy over the batch, in the port's float (double / float32 / 30-bit)
        t = 0.0
        for i in range(self.batch):
            z = self._logits(i)
            m = max(z)
            e = 0.0
            for r in range(self.rows):
                e += math.exp(z[r] - m)
            t += m + math.log(e) - z[self.labels[i]]
        return t / self.batch

    def probe(self, round_seed, k, mu, xs, ys):
        # K scalars of round round_seed (u32) over the batch xs (int8 inputs), ys (labels); weights restored
        self._feats(xs)
        self.labels = ys
        if len(self.g) != k:
            self.g = None
            self.g = array('f', bytearray(4 * k))
        w = self.w
        w0 = self.w0
        if w0 is not None:
            for i in range(len(w)):
                w0[i] = w[i]
        sh, sl = _halves(round_seed)
        loss = zo.probe(w, sh, sl, mu, self._loss, self.g, self.mode, 0, None, w0)
        return list(self.g), loss, self.batch

    def update(self, round_seed, gbar_list, lr):
        # the server's aggregated scalars of round round_seed: w -= lr/K sum_k g_k z_k (docs/zo.md section 8)
        sh, sl = _halves(round_seed)
        zo.update(self.w, sh, sl, lr, gbar_list)

    def accuracy(self, xs, ys):
        self._feats(xs)
        ok = 0
        for i in range(self.batch):
            z = self._logits(i)
            m = max(z)
            if z.index(m) == ys[i]:
                ok += 1
        return ok / self.batch if self.batch else 0.0
