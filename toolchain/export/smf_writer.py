"""Encode a full-int8 ``.tflite`` as a sparse model file (``.smf``) for the MicroPython engine.

Layout and semantics: ``docs/sparse-model-format.md``; the format's constants and the reader are
``toolchain.contracts.smf``. The ``.tflite`` flatbuffer is parsed with the generated schema module
``ai_edge_litert.schema_py_generated`` (object API, no TensorFlow import needed). Requantization parameters come from
``toolchain.export.requant`` (TFLite Micro's ``Prepare`` arithmetic), so the device only does integer work.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from toolchain.contracts.smf import (
    ADD,
    AVERAGE_POOL_2D,
    BITMAP,
    CONV_2D,
    CSR,
    DENSE,
    DEPTHWISE_CONV_2D,
    FULLY_CONNECTED,
    HEADER,
    MAGIC,
    MAX_POOL_2D,
    MEAN,
    NO_TENSOR,
    OP,
    PAD,
    REQUANTIZE,
    RESHAPE,
    RLE,
    TENSOR,
    VERSION,
    WEIGHTS,
    SmfError,
)
from toolchain.export.requant import activation_range, f32, quantize_multiplier

# ---------------------------------------------------------------- weight encodings

def _rle_pairs(flat: np.ndarray) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    prev = -1
    for i in np.flatnonzero(flat):
        gap = int(i) - prev - 1
        while gap > 255:  # (255, 0) = 255 zeros then a literal zero: 256 positions
            pairs.append((255, 0))
            gap -= 256
        pairs.append((gap, int(flat[i]) & 0xFF))
        prev = int(i)
    return pairs


def encode_weights(w: np.ndarray) -> bytes:
    """Encode an int8 [rows, cols] matrix with whichever of dense / bitmap / CSR / RLE is smallest."""
    rows, cols = w.shape
    if rows > 0xFFFF or cols > 0xFFFFFFFF:
        raise SmfError(f"weight matrix {rows}x{cols} is too large for the format")
    flat = w.reshape(-1).astype(np.int8)
    nz = np.flatnonzero(flat)
    nnz = len(nz)
    vals = flat[nz].tobytes()
    index_bytes = 1 if cols <= 256 else 2
    candidates: dict[int, bytes] = {}
    candidates[DENSE] = flat.tobytes()
    bitmap = np.packbits((flat != 0).astype(np.uint8), bitorder="little").tobytes()
    candidates[BITMAP] = bitmap + vals
    if cols <= 0xFFFF:
        counts = np.count_nonzero(w, axis=1).astype("<u2").tobytes()
        idx = (nz % cols).astype("<u1" if index_bytes == 1 else "<u2").tobytes()
        candidates[CSR] = counts + idx + vals
    pairs = _rle_pairs(flat)
    candidates[RLE] = np.array(pairs, dtype=np.uint8).reshape(-1).tobytes() if pairs else b""
    # Smallest wins; on a tie prefer the cheaper decode (dense, CSR, bitmap, RLE).
    order = {DENSE: 0, CSR: 1, BITMAP: 2, RLE: 3}
    enc = min(candidates, key=lambda e: (len(candidates[e]), order[e]))
    payload = candidates[enc]
    count = len(pairs) if enc == RLE else nnz
    ib = index_bytes if enc == CSR else 0
    return WEIGHTS.pack(enc, ib, rows, cols, count, len(payload)) + payload



# ---------------------------------------------------------------- tflite -> smf

@dataclass
class _Tensor:
    shape: tuple[int, int, int]
    zp: int
    scale: float
    buffer: int = -1


def _schema():  # noqa: ANN202 - generated module
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _hwc(shape: list[int] | np.ndarray) -> tuple[int, int, int]:
    s = [int(d) for d in shape]
    if len(s) == 4 and s[0] == 1:
        return s[1], s[2], s[3]
    if len(s) == 2 and s[0] == 1:
        return 1, 1, s[1]
    if len(s) == 3 and s[0] == 1:
        return 1, s[1], s[2]
    if len(s) == 1:
        return 1, 1, s[0]
    raise SmfError(f"tensor shape {s} is not supported (batch 1, rank <= 4)")


class _Converter:
    def __init__(self, tflite: bytes) -> None:
        schema = _schema()
        self.S = schema
        try:
            self.model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
        except Exception as exc:  # flatbuffers raises assorted errors on garbage
            raise SmfError(f"not a valid .tflite flatbuffer: {exc}") from exc
        if not self.model.subgraphs or len(self.model.subgraphs) != 1:
            raise SmfError("the .tflite must have exactly one subgraph")
        self.g = self.model.subgraphs[0]
        self.names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.tmap: dict[int, int] = {}  # tflite tensor index -> smf tensor id
        self.tensors: list[_Tensor] = []
        self.ops: list[tuple[int, int, int, int, bytes]] = []  # opcode, in0, in1, out, body
        self.aliases: dict[int, int] = {}  # smf tensor -> the tensor whose storage it shares (RESHAPE)

    # tflite helpers
    def const(self, idx: int) -> np.ndarray:
        t = self.g.tensors[idx]
        buf = self.model.buffers[t.buffer].data if t.buffer < len(self.model.buffers) else None
        if buf is None or len(buf) == 0:
            raise SmfError(f"tensor {idx} ({self._name(idx)}) should be a constant")
        dtype = {self.S.TensorType.INT8: np.int8, self.S.TensorType.INT32: np.int32,
                 self.S.TensorType.INT64: np.int64}.get(t.type)
        if dtype is None:
            raise SmfError(f"constant {self._name(idx)} has unsupported type {t.type}")
        return np.frombuffer(bytes(bytearray(buf)), dtype).reshape([int(d) for d in t.shape])

    def _name(self, idx: int) -> str:
        n = self.g.tensors[idx].name
        return n.decode() if isinstance(n, bytes) else str(n)

    def qparams(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.g.tensors[idx].quantization
        if q is None or q.scale is None or len(q.scale) == 0:
            raise SmfError(f"tensor {self._name(idx)} is not quantized (full-int8 models only)")
        return np.asarray(q.scale, np.float32), np.asarray(q.zeroPoint, np.int64)

    def is_const(self, idx: int) -> bool:
        t = self.g.tensors[idx]
        b = self.model.buffers[t.buffer].data if t.buffer < len(self.model.buffers) else None
        return b is not None and len(b) > 0

    def act(self, idx: int) -> int:
        """smf id of the activation tensor ``idx`` (created on first sight)."""
        if idx in self.tmap:
            return self.tmap[idx]
        t = self.g.tensors[idx]
        if t.type != self.S.TensorType.INT8:
            raise SmfError(f"activation {self._name(idx)} is not int8 (export a full-int8 model)")
        scale, zp = self.qparams(idx)
        self.tensors.append(_Tensor(_hwc(t.shape), int(zp[0]), float(scale[0])))
        self.tmap[idx] = len(self.tensors) - 1
        if len(self.tensors) > 0xFFFE:
            raise SmfError("too many tensors")
        return self.tmap[idx]

    def convert(self) -> bytes:
        g = self.g
        if len(g.inputs) != 1 or len(g.outputs) != 1:
            raise SmfError("the model must have one input and one output")
        inp = self.act(int(g.inputs[0]))
        for op in g.operators:
            code = self.model.operatorCodes[op.opcodeIndex]
            name = self.names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            outs = [int(o) for o in op.outputs]
            if all(self.g.tensors[o].type != self.S.TensorType.INT8 for o in outs) and name in (
                "SHAPE", "STRIDED_SLICE", "PACK", "CONCATENATION", "GATHER", "SLICE"
            ):
                continue  # shape arithmetic for a dynamic-batch RESHAPE: no activation data flows through it
            handler = getattr(self, "op_" + name.lower(), None)
            if handler is None:
                raise SmfError(f"operator {name} is not supported by the sparse engine")
            handler(op)
        out_idx = int(g.outputs[0])
        if out_idx not in self.tmap:
            raise SmfError("the model output is not produced by a supported operator")
        out = self.tmap[out_idx]
        n_buffers, scratch = self.plan(inp, out)
        return self.pack(inp, out, n_buffers, scratch)

    # ---- op handlers: each appends (opcode, in0, in1, out, body)
    def _acc_ops(self, op, kind: int) -> None:  # noqa: ANN001
        i_idx, w_idx = int(op.inputs[0]), int(op.inputs[1])
        b_idx = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        o_idx = int(op.outputs[0])
        x, y = self.act(i_idx), None
        w = self.const(w_idx).astype(np.int8)
        w_scale, w_zp = self.qparams(w_idx)
        if np.any(w_zp != 0):
            raise SmfError("weights must be symmetric int8 (zero point 0)")
        in_t = self.tensors[x]
        y = self.act(o_idx)
        out_t = self.tensors[y]
        opt = op.builtinOptions
        if kind == FULLY_CONNECTED:
            if opt is not None and getattr(opt, "keepNumDims", False) and len(self.g.tensors[o_idx].shape) > 2:
                raise SmfError("FULLY_CONNECTED with keep_num_dims on a >2-D input is not supported")
            rows, cols = w.shape
            if cols != in_t.shape[0] * in_t.shape[1] * in_t.shape[2]:
                raise SmfError(f"FULLY_CONNECTED input has {in_t.shape} elements, weights expect {cols}")
            mat = w
            geometry = b""
        else:
            if opt.dilationHFactor != 1 or opt.dilationWFactor != 1:
                raise SmfError("dilated convolutions are not supported")
            if kind == CONV_2D:
                oc, kh, kw, ic = w.shape
                if ic != in_t.shape[2]:
                    raise SmfError("grouped convolutions are not supported")
                mat = w.reshape(oc, kh * kw * ic)
                mult = 1
                if (kh, kw) == (1, 1) and in_t.shape[:2] == (1, 1) and out_t.shape[:2] == (1, 1):
                    # A 1x1 kernel on a 1x1 map is a fully connected layer with per-channel scales: the same
                    # accumulation and the same per-channel MultiplyByQuantizedMultiplier as TFLite Micro's
                    # conv (the exporter emits dense layers this way; see docs/sparse-model-format.md).
                    # Stored as FULLY_CONNECTED: no geometry, no scratch, the small FC kernel on devices.
                    kind = FULLY_CONNECTED
            else:
                _, kh, kw, oc = w.shape
                mult = int(opt.depthMultiplier) or oc // in_t.shape[2]
                if oc != in_t.shape[2] * mult:
                    raise SmfError("depthwise channel count does not match the depth multiplier")
                mat = w.reshape(kh * kw, oc).T.copy()  # rows = output channels, cols = taps
            sh, sw = int(opt.strideH), int(opt.strideW)
            pt = self._pad(opt.padding, in_t.shape[0], out_t.shape[0], kh, sh)
            pl = self._pad(opt.padding, in_t.shape[1], out_t.shape[1], kw, sw)
            geometry = struct.pack("<BBBBBBBB", kh, kw, sh, sw, pt, pl, mult, 0) if kind != FULLY_CONNECTED else b""
        rows = mat.shape[0]
        if len(w_scale) == 1:
            w_scale = np.repeat(w_scale, rows)
        if len(w_scale) != rows:
            raise SmfError("per-channel weight scales do not match the output channels")
        bias = self.const(b_idx).astype(np.int64).reshape(-1) if b_idx >= 0 else np.zeros(rows, np.int64)
        mults, shifts = [], []
        for c in range(rows):
            # TFLM (PopulateConvolutionQuantizationParams): double(in) * double(filter[c]) / double(out)
            m, s = quantize_multiplier(float(in_t.scale) * float(w_scale[c]) / float(out_t.scale))
            mults.append(m)
            shifts.append(s)
        act_min, act_max = activation_range(int(opt.fusedActivationFunction) if opt else 0, out_t.scale, out_t.zp)
        body = geometry + struct.pack("<bbH", act_min, act_max, 0)
        body += np.asarray(bias, "<i4").tobytes() + np.asarray(mults, "<i4").tobytes()
        body += np.asarray(shifts, np.int8).tobytes()
        body += encode_weights(mat)
        self.ops.append((kind, x, NO_TENSOR, y, body))

    @staticmethod
    def _pad(padding: int, n_in: int, n_out: int, k: int, s: int) -> int:
        if padding == 1:  # VALID
            return 0
        total = max((n_out - 1) * s + k - n_in, 0)
        return total // 2  # TFLite puts the odd pixel at the end

    def op_conv_2d(self, op) -> None:  # noqa: ANN001
        self._acc_ops(op, CONV_2D)

    def op_depthwise_conv_2d(self, op) -> None:  # noqa: ANN001
        self._acc_ops(op, DEPTHWISE_CONV_2D)

    def op_fully_connected(self, op) -> None:  # noqa: ANN001
        self._acc_ops(op, FULLY_CONNECTED)

    def _pool(self, op, kind: int) -> None:  # noqa: ANN001
        x = self.act(int(op.inputs[0]))
        y = self.act(int(op.outputs[0]))
        it, ot = self.tensors[x], self.tensors[y]
        if (it.zp, f32(it.scale)) != (ot.zp, f32(ot.scale)):
            raise SmfError("pooling must keep its input quantization")
        o = op.builtinOptions
        pt = self._pad(o.padding, it.shape[0], ot.shape[0], o.filterHeight, o.strideH)
        pl = self._pad(o.padding, it.shape[1], ot.shape[1], o.filterWidth, o.strideW)
        lo, hi = activation_range(int(o.fusedActivationFunction), ot.scale, ot.zp)
        body = struct.pack("<BBBBBBbb", o.filterHeight, o.filterWidth, o.strideH, o.strideW, pt, pl, lo, hi)
        self.ops.append((kind, x, NO_TENSOR, y, body))

    def op_max_pool_2d(self, op) -> None:  # noqa: ANN001
        self._pool(op, MAX_POOL_2D)

    def op_average_pool_2d(self, op) -> None:  # noqa: ANN001
        self._pool(op, AVERAGE_POOL_2D)

    def op_mean(self, op) -> None:  # noqa: ANN001
        x = self.act(int(op.inputs[0]))
        axis = sorted(int(a) % 4 for a in self.const(int(op.inputs[1])).reshape(-1))
        if axis != [1, 2] or len(self.g.tensors[int(op.inputs[0])].shape) != 4:
            raise SmfError(f"MEAN over axes {axis} is not supported (only global average pooling, axes 1 and 2)")
        y = self.act(int(op.outputs[0]))
        it, ot = self.tensors[x], self.tensors[y]
        # TFLM QuantizedMeanOrSum (integer form, verified bit-exact against the tflite_micro wheel):
        # (m, s) = QuantizeMultiplier(in/out), then 1/n is folded in: m' = (m << k) // n, s' = s - k,
        # k = min(floor(log2 n), 32, 31 + s); out = MBQM(sum(x) - zp_in * n, m', s') + zp_out.
        n = it.shape[0] * it.shape[1]
        m, s = quantize_multiplier(float(it.scale) / float(ot.scale))
        k = min(n.bit_length() - 1, 32, 31 + s)
        body = struct.pack("<ib3x", (m << k) // n, s - k)
        self.ops.append((MEAN, x, NO_TENSOR, y, body))

    def op_add(self, op) -> None:  # noqa: ANN001
        a_idx, b_idx = int(op.inputs[0]), int(op.inputs[1])
        if self.is_const(a_idx) or self.is_const(b_idx):
            raise SmfError("ADD with a constant operand is not supported")
        a, b = self.act(a_idx), self.act(b_idx)
        y = self.act(int(op.outputs[0]))
        at, bt, ot = self.tensors[a], self.tensors[b], self.tensors[y]
        if at.shape != bt.shape or at.shape != ot.shape:
            raise SmfError(f"ADD with broadcasting ({at.shape} + {bt.shape}) is not supported")
        left_shift = 20  # TFLM add.cc for int8
        twice_max = 2 * max(float(at.scale), float(bt.scale))
        m1, s1 = quantize_multiplier(float(at.scale) / twice_max)
        m2, s2 = quantize_multiplier(float(bt.scale) / twice_max)
        mo, so = quantize_multiplier(twice_max / ((1 << left_shift) * float(ot.scale)))
        opt = op.builtinOptions
        lo, hi = activation_range(int(opt.fusedActivationFunction) if opt else 0, ot.scale, ot.zp)
        body = struct.pack("<iiibbbBbbH", m1, m2, mo, s1, s2, so, left_shift, lo, hi, 0)
        self.ops.append((ADD, a, b, y, body))

    def op_pad(self, op) -> None:  # noqa: ANN001
        x = self.act(int(op.inputs[0]))
        pads = self.const(int(op.inputs[1])).reshape(-1, 2)
        if pads.shape[0] != 4 or pads[0].any() or pads[3].any() or (pads < 0).any() or (pads > 255).any():
            raise SmfError("PAD is supported on height and width only (0..255 each side)")
        y = self.act(int(op.outputs[0]))
        value = self.tensors[y].zp
        if len(op.inputs) > 2 and int(op.inputs[2]) >= 0:
            value = int(self.const(int(op.inputs[2])).reshape(-1)[0])
        body = struct.pack("<BBBBbxxx", int(pads[1][0]), int(pads[1][1]), int(pads[2][0]), int(pads[2][1]), value)
        self.ops.append((PAD, x, NO_TENSOR, y, body))

    def op_padv2(self, op) -> None:  # noqa: ANN001
        self.op_pad(op)

    def op_reshape(self, op) -> None:  # noqa: ANN001
        x = self.act(int(op.inputs[0]))
        y = self.act(int(op.outputs[0]))
        it, ot = self.tensors[x], self.tensors[y]
        if math.prod(it.shape) != math.prod(ot.shape) or (it.zp, it.scale) != (ot.zp, ot.scale):
            raise SmfError("RESHAPE must keep the element count and quantization")
        self.aliases[y] = x
        self.ops.append((RESHAPE, x, NO_TENSOR, y, b""))

    def op_quantize(self, op) -> None:  # noqa: ANN001
        x = self.act(int(op.inputs[0]))
        y = self.act(int(op.outputs[0]))
        it, ot = self.tensors[x], self.tensors[y]
        # TFLM quantize.cc int8 -> int8: MultiplyByQuantizedMultiplier(x - in_zp, m, s) + out_zp
        m, s = quantize_multiplier(float(it.scale) / float(ot.scale))
        self.ops.append((REQUANTIZE, x, NO_TENSOR, y, struct.pack("<ib3x", m, s)))

    # ---- memory planning: activation buffers reused by liveness (ping-pong for plain chains)
    def plan(self, inp: int, out: int) -> tuple[int, int]:
        last_use = {t: -1 for t in range(len(self.tensors))}
        for i, (_, a, b, _, _) in enumerate(self.ops):
            for t in (a, b):
                if t != NO_TENSOR:
                    last_use[t] = i
        last_use[out] = len(self.ops)

        def root(t: int) -> int:
            while t in self.aliases:
                t = self.aliases[t]
            return t

        # a buffer stays busy until the last use of every tensor sharing it
        busy_until: dict[int, int] = {}
        for t in range(len(self.tensors)):
            r = root(t)
            busy_until[r] = max(busy_until.get(r, -1), last_use[t])
        free_at: list[int] = []  # per buffer: op index after which it is free
        sizes: list[int] = []

        def assign(t: int, now: int) -> None:
            n = math.prod(self.tensors[t].shape)
            for k, f in enumerate(free_at):
                if f < now:
                    self.tensors[t].buffer = k
                    free_at[k] = busy_until[t]
                    sizes[k] = max(sizes[k], n)
                    return
            self.tensors[t].buffer = len(free_at)
            free_at.append(busy_until[t])
            sizes.append(n)

        assign(inp, -1)
        scratch = 0
        for i, (code, _, _, y, _) in enumerate(self.ops):
            if code == RESHAPE:
                self.tensors[y].buffer = self.tensors[root(y)].buffer
                continue
            if self.tensors[y].buffer < 0:
                assign(y, i)
            if code in (CONV_2D, DEPTHWISE_CONV_2D):
                scratch = max(scratch, self.tensors[y].shape[0] * self.tensors[y].shape[1])
            elif code == MEAN:
                scratch = max(scratch, self.tensors[y].shape[2])
        if len(sizes) > 255:
            raise SmfError("too many activation buffers")
        self.buffer_sizes = sizes
        return len(sizes), scratch

    def pack(self, inp: int, out: int, n_buffers: int, scratch: int) -> bytes:
        parts = [b""]  # header placeholder
        parts.append(b"".join(struct.pack("<I", s) for s in self.buffer_sizes))
        for t in self.tensors:
            h, w, c = t.shape
            parts.append(TENSOR.pack(h, w, c, t.buffer, t.zp, t.scale))
        for code, a, b, y, body in self.ops:
            parts.append(OP.pack(code, 0, a, b, y, len(body)) + body)
        if scratch > 0xFFFF:
            raise SmfError("a convolution output plane is too large (> 65535 pixels)")
        size = HEADER.size + sum(len(p) for p in parts) + 4
        parts[0] = HEADER.pack(MAGIC, VERSION[0], VERSION[1], 0, size, len(self.tensors), len(self.ops),
                               n_buffers, inp, out, scratch)
        data = b"".join(parts)
        return data + struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)


def tflite_to_smf(tflite: bytes) -> bytes:
    """Encode a full-int8 ``.tflite`` (one subgraph, supported builtin ops) as a sparse model file."""
    return _Converter(bytes(tflite)).convert()

