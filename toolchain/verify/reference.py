"""Host reference of a device's on-device ZO rounds (``device_runtime/micropython/ft.py``, docs/ondevice.md).

The device splits the model at its last dense layer (the *head*): the layers before it run int8 in the
sparse engine (bit-exact with TFLite Micro), the head runs in float over the head's int8 input ``q``:

    logits_r = b_r + s_in * sum_j W_rj * (q_j - zp_in)     (j over the kept weights of row r, in column order)

``W`` (kept weights only) and ``b`` are the float32 trainable set, in the canonical order of docs/zo.md
(kept weights row-major, then the biases). Here:

* the int8 part is reproduced **bit-exactly** by running the device engine's own code under CPython
  (:func:`engine_features`);
* the float part is computed in float64 in the device's order (column order inside a row, rows in order,
  samples in order, ``exp``/``log`` per sample), so double ports (CPython, MicroPython on WebAssembly) agree to
  libm rounding (measured 0 to 1e-9 on the scalars); float32 ports (ESP32) and the micro:bit's 30-bit floats
  within the bound of docs/zo.md section 9.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.contracts.paths import MICROPYTHON_ENGINE
from toolchain.contracts.smf import CONV_2D, FULLY_CONNECTED, RESHAPE, SmfModel, read_smf
from toolchain.contracts.zo import ClientReply, apply_update, estimate

ENGINE_DIR = MICROPYTHON_ENGINE
ESTIMATORS = ("forward", "central", "one_point")


class HeadError(ValueError):
    """The model has no last dense layer that the on-device fine-tuner can train."""


@dataclass
class Head:
    """The trainable last dense layer of a sparse model, as the device holds it."""

    op: int  # index of the head operator in the device engine's ``Model.ops`` (RESHAPEs dropped); the backbone is before it
    rows: int  # outputs (classes)
    cols: int  # inputs (features)
    in_zp: int
    in_scale: float
    mask: np.ndarray  # bool [rows, cols]: kept weights
    weights: np.ndarray  # float32 [nnz + rows]: the active vector (kept weights row-major, then biases)

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def ptr(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.mask.sum(1))]).astype(np.uint16)

    @property
    def col(self) -> np.ndarray:
        return np.nonzero(self.mask)[1].astype(np.uint8 if self.cols <= 256 else np.uint16)

    def dense(self, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(W float64 [rows, cols] with zeros at pruned positions, b float64 [rows]) of the active vector ``w``."""
        w = self.weights if w is None else w
        full = np.zeros((self.rows, self.cols), np.float64)
        full[self.mask] = w[: self.nnz]
        return full, w[self.nnz :].astype(np.float64)

    def to_bytes(self) -> bytes:
        """``head.bin``: f32 w[nnz + rows], u16 ptr[rows + 1], cols[nnz] (u8, or u16 if cols > 256), little-endian."""
        return (self.weights.astype("<f4").tobytes() + self.ptr.astype("<u2").tobytes()
                + self.col.astype("<u1" if self.cols <= 256 else "<u2").tobytes())

    def spec(self, file: str = "head.bin") -> dict:
        """The ``head`` entry of the bundle's ``config.json``."""
        return {"op": self.op, "rows": self.rows, "cols": self.cols, "nnz": self.nnz, "in_zp": self.in_zp,
                "in_scale": self.in_scale, "file": file}


def _mbqm_float(bias: int, multiplier: int, shift: int) -> float:
    return bias * multiplier * 2.0 ** (shift - 31)


def head_from_smf(data: bytes | SmfModel) -> Head:
    """The float head of a sparse model: its last FULLY_CONNECTED (or 1x1 CONV_2D on a 1x1 input), dequantized.

    ``W_rj = s_w[r] * w_rj`` with ``s_w[r] = M_r s_out / s_in`` recovered from the stored requantization multiplier
    (``M_r = multiplier * 2^(shift-31)``, relative error < 2^-30) and ``b_r = s_in s_w[r] bias_r``, so the float
    logits equal the int8 layer's accumulator before requantization. Rows without kept weights keep the constant
    that the int8 model outputs for them.
    """
    m = data if isinstance(data, SmfModel) else read_smf(data)
    idx = max((i for i, o in enumerate(m.ops) if o.opcode in (CONV_2D, FULLY_CONNECTED)), default=-1)
    if idx < 0:
        raise HeadError("the model has no FULLY_CONNECTED or CONV_2D layer to fine-tune")
    op = m.ops[idx]
    if any(o.opcode != RESHAPE for o in m.ops[idx + 1 :]):
        raise HeadError("the last dense layer is followed by operators other than RESHAPE; cannot fine-tune it")
    t_in, t_out = m.tensors[op.inputs[0]], m.tensors[op.output]
    if op.opcode == CONV_2D and (op.params["kh"], op.params["kw"], t_in.shape[0], t_in.shape[1]) != (1, 1, 1, 1):
        raise HeadError("the last CONV_2D is not a dense layer (1x1 kernel on a 1x1 input)")
    assert op.weights is not None
    q = op.weights.astype(np.int64)
    rows, cols = q.shape
    s_in, s_out = float(t_in.scale), float(t_out.scale)
    mult, shift = op.params["multiplier"].astype(np.int64), op.params["shift"].astype(np.int64)
    bias = op.params["bias"].astype(np.int64)
    lo, hi = op.params["act"]
    mask = q != 0
    if rows + 1 > 65535 or int(mask.sum()) > 65535:
        raise HeadError(f"the last dense layer has {int(mask.sum())} kept weights; the device format holds < 65536")
    w_rows = np.zeros((rows, cols), np.float64)
    b = np.zeros(rows, np.float64)
    for r in range(rows):
        m_r = float(mult[r]) * 2.0 ** (int(shift[r]) - 31)
        s_w = m_r * s_out / s_in
        w_rows[r] = s_w * q[r]
        if mask[r].any():
            b[r] = s_in * s_w * float(bias[r])
        else:  # the int8 layer's constant output for this row
            y = min(max(round(_mbqm_float(int(bias[r]), int(mult[r]), int(shift[r]))) + t_out.zero_point, lo), hi)
            b[r] = s_out * (y - t_out.zero_point)
    weights = np.concatenate([w_rows[mask], b]).astype(np.float32)
    engine_op = sum(1 for o in m.ops[:idx] if o.opcode != RESHAPE)  # the device engine drops RESHAPEs
    return Head(engine_op, rows, cols, int(t_in.zero_point), s_in, mask, weights)


@contextlib.contextmanager
def _engine_path() -> Iterator[None]:
    sys.path.insert(0, str(ENGINE_DIR))
    try:
        yield
    finally:
        sys.path.remove(str(ENGINE_DIR))


def engine_features(smf: bytes, xs: np.ndarray, head: Head | None = None) -> np.ndarray:
    """The head's int8 inputs for int8 model inputs ``xs`` ([n, ...]), computed by the device engine under CPython.

    The engine's integer arithmetic is the same code the devices run, so these are bit-exact with them (and with
    TFLite Micro). Returns int8 [n, head.cols].
    """
    head = head or head_from_smf(smf)
    with _engine_path():
        import smf as engine  # device_runtime/micropython/smf.py

        model = engine.Model(bytes(smf))
    xs = np.ascontiguousarray(xs, np.int8).reshape(len(xs), -1)
    out = np.empty((len(xs), head.cols), np.int8)
    buf = model.input_buffer()
    feat = model.bufs[model.tensors[model.ops[head.op][2]][3]]
    for i, x in enumerate(xs):
        buf[: model.input_size] = type(buf)("b", x.tobytes())
        for o in model.ops[: head.op]:
            o[0](model, o)
        out[i] = np.frombuffer(feat.tobytes()[: head.cols], np.int8)
    return out


def head_logits(head: Head, w: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """float64 logits [n, rows] in the device's order: per row, kept columns in increasing order from 0.0."""
    full, b = head.dense(w)
    f = feats.astype(np.int64) - head.in_zp
    acc = np.zeros((len(f), head.rows), np.float64)
    for j in range(head.cols):  # column order; pruned columns add exactly 0.0 (no-op)
        acc += full[:, j] * f[:, j : j + 1]
    return b + head.in_scale * acc


def head_loss(head: Head, w: np.ndarray, feats: np.ndarray, ys: Sequence[int]) -> float:
    """Mean cross-entropy in float64, summed in the device's order (rows, then samples)."""
    z = head_logits(head, w, feats)
    m = z.max(axis=1)
    e = np.zeros(len(z), np.float64)
    for r in range(head.rows):
        e += np.exp(z[:, r] - m)
    per = m + np.log(e) - z[np.arange(len(z)), np.asarray(ys, np.int64)]
    total = 0.0
    for v in per.tolist():  # sequential, as the device (Python >= 3.12 sum() would compensate)
        total += v
    return total / len(per)


def head_accuracy(head: Head, w: np.ndarray, feats: np.ndarray, ys: Sequence[int]) -> float:
    z = head_logits(head, w, feats)
    return float((z.argmax(axis=1) == np.asarray(ys)).mean()) if len(z) else 0.0


def reference_probe(head: Head, w: np.ndarray, feats: np.ndarray, ys: Sequence[int], round_seed: int, k: int,
                    mu: float, estimator: str = "forward") -> ClientReply:
    """What ``FineTuner.probe(round_seed, k, mu, xs, ys)`` returns, for the head inputs ``feats`` of ``xs``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
    return estimate(lambda v: head_loss(head, v, feats, ys), np.asarray(w, np.float32), round_seed, k, mu,
                    estimator, len(feats))  # type: ignore[arg-type]


def reference_update(w: np.ndarray, round_seed: int, gbar: Sequence[float], lr: float) -> np.ndarray:
    """What ``FineTuner.update`` leaves in the weights (bit-exact on float32 and double ports)."""
    out = np.array(w, np.float32, copy=True)
    apply_update(out, round_seed, lr, np.asarray(gbar, np.float32))
    return out


def scalar_tolerance(loss: float, mu: float, float_bits: int) -> float:
    """docs/zo.md section 9: ``64 eps max(1, |L|) / mu``; eps = 2^-24 (float32, double), 2^-22 (micro:bit 30-bit)."""
    eps = 2.0**-22 if float_bits < 32 else 2.0**-24
    return 64 * eps * max(1.0, abs(loss)) / mu



# --- Jetson (onnxruntime) -----------------------------------------------------------------------------------------


@dataclass
class OnnxHead:
    """The last Gemm of an ONNX model: its input tensor name and its float weights (dequantized for QDQ models)."""

    path: Path
    feature: str
    weight: np.ndarray  # float32 [rows, cols] ([out, in])
    bias: np.ndarray  # float32 [rows]

    @property
    def mask(self) -> np.ndarray:
        return self.weight != 0

    @property
    def active(self) -> np.ndarray:
        return np.concatenate([self.weight[self.mask], self.bias]).astype(np.float32)


def onnx_head(path: Path) -> OnnxHead:
    """Find the last Gemm; weights from initializers, through ``DequantizeLinear`` (per-tensor or per-axis) in QDQ."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}

    def value(name: str) -> np.ndarray:
        if name in inits:
            return inits[name].astype(np.float64)
        node = producer[name]
        if node.op_type != "DequantizeLinear":
            raise HeadError(f"the head's parameter {name} is computed by {node.op_type}")
        q = inits[node.input[0]].astype(np.float64)
        scale = inits[node.input[1]].astype(np.float64)
        zp = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
        axis = int(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1))
        if np.ndim(scale) == 1 and q.ndim > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
        return ((q - zp) * scale).astype(np.float32).astype(np.float64)  # DequantizeLinear outputs float32

    w = value(gemm.input[1]).astype(np.float32)
    if attrs.get("transB", 0) == 0:
        w = w.T
    b = value(gemm.input[2]).astype(np.float32) if len(gemm.input) > 2 else np.zeros(w.shape[0], np.float32)
    return OnnxHead(Path(path), gemm.input[0], np.ascontiguousarray(w), b.reshape(-1))


def onnx_features(head: OnnxHead, x_nchw: np.ndarray) -> np.ndarray:
    """The head's inputs (float64 [n, cols]) from onnxruntime, the model with that tensor added as an output."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(head.path))
    model.graph.output.append(helper.make_empty_tensor_value_info(head.feature))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    f = sess.run([head.feature], {sess.get_inputs()[0].name: np.ascontiguousarray(x_nchw, np.float32)})[0]
    return np.asarray(f, np.float64).reshape(len(x_nchw), -1)


def onnx_head_loss(head: OnnxHead, w: np.ndarray, feats: np.ndarray, ys: Sequence[int]) -> float:
    full = np.zeros(head.weight.shape, np.float64)
    nnz = int(head.mask.sum())
    full[head.mask] = w[:nnz]
    z = feats @ full.T + w[nnz:].astype(np.float64)
    m = z.max(axis=1)
    per = m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[np.arange(len(z)), np.asarray(ys, np.int64)]
    return float(per.mean())


def onnx_reference_probe(head: OnnxHead, w: np.ndarray, feats: np.ndarray, ys: Sequence[int], round_seed: int,
                         k: int, mu: float, estimator: str = "forward") -> ClientReply:
    """What ``JetsonFineTuner.probe`` returns for the head inputs ``feats`` (same onnxruntime backbone)."""
    return estimate(lambda v: onnx_head_loss(head, v, feats, ys), np.asarray(w, np.float32), round_seed, k, mu,
                    estimator, len(feats))  # type: ignore[arg-type]
