"""On-device ZO fine-tuning on a Jetson with onnxruntime (docs/jetson.md). Python 3.8+, numpy, onnx, onnxruntime.

The model (float ``model.onnx`` or QDQ int8 ``model_int8.onnx``) is split at its last dense layer (the last
``Gemm``): the backbone runs once per sample and round in onnxruntime (the graph with the head's input added as an
output), the head runs in onnxruntime too, as a float64 ``Gemm`` graph whose weight and bias are *inputs* (the
perturbed trainable weights are fed per forward pass). Trainable set = the head's non-zero weights (row-major,
``[out, in]``) then its biases, float32: the canonical active vector of docs/zo.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

try:
    from . import zo_np
except ImportError:  # run from the bundle folder (flat files)
    import zo_np  # type: ignore[no-redef]

ESTIMATORS = ("forward", "central", "one_point")


def _f32(x: float) -> float:
    return float(np.float32(x))


class JetsonFineTuner:
    def __init__(self, onnx_path: str, spec: dict[str, Any] | None = None,
                 providers: list[str] | None = None) -> None:
        spec = dict(spec or {})
        self.spec = spec
        self.estimator = spec.get("estimator", "forward")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}")
        inp = spec.get("input", {})
        self.in_scale = float(inp.get("scale", 1.0 / 255))
        self.in_zp = int(inp.get("zero_point", -128))
        self.providers = providers or ["CPUExecutionProvider"]
        model = onnx.load(str(onnx_path))
        gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
        if not gemms:
            raise ValueError(f"{onnx_path} has no Gemm (dense) layer to fine-tune")
        head = gemms[-1]
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
            raise ValueError("the last Gemm must be a plain dense layer (transA=0, alpha=beta=1)")
        self.feature_name, w_name = head.input[0], head.input[1]
        b_name = head.input[2] if len(head.input) > 2 and head.input[2] else ""
        inits = {i.name: i for i in model.graph.initializer}
        extra = [n for n in (self.feature_name, w_name, b_name) if n and n not in inits]
        for name in extra:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        self.sess = ort.InferenceSession(model.SerializeToString(), providers=self.providers)
        self.input_name = self.sess.get_inputs()[0].name
        self.input_shape = self.sess.get_inputs()[0].shape  # [batch, C, H, W]
        fetched: dict[str, np.ndarray] = {}
        if extra != [self.feature_name]:  # weights behind DequantizeLinear (QDQ): computed by onnxruntime
            shape = [1] + [int(d) for d in self.input_shape[1:]]
            outs = self.sess.run([n for n in extra if n != self.feature_name],
                                 {self.input_name: np.zeros(shape, np.float32)})
            fetched = dict(zip([n for n in extra if n != self.feature_name], outs, strict=False))

        def value(name: str) -> np.ndarray:
            return numpy_helper.to_array(inits[name]) if name in inits else fetched[name]

        w = np.asarray(value(w_name), np.float32)
        if attrs.get("transB", 0) == 0:
            w = w.T
        self.rows, self.cols = w.shape
        self.mask = w != 0
        b = np.asarray(value(b_name), np.float32).reshape(-1) if b_name else np.zeros(self.rows, np.float32)
        self.nnz = int(self.mask.sum())
        self.w = np.concatenate([w[self.mask], b]).astype(np.float32)  # the active vector
        self.head = ort.InferenceSession(self._head_graph().SerializeToString(), providers=self.providers)
        self.feats = np.zeros((0, self.cols), np.float64)
        self.ys = np.zeros(0, np.int64)

    def _head_graph(self) -> onnx.ModelProto:
        d = TensorProto.DOUBLE
        node = helper.make_node("Gemm", ["F", "W", "B"], ["Z"], transB=1)
        g = helper.make_graph([node], "head",
                              [helper.make_tensor_value_info("F", d, ["n", self.cols]),
                               helper.make_tensor_value_info("W", d, [self.rows, self.cols]),
                               helper.make_tensor_value_info("B", d, [self.rows])],
                              [helper.make_tensor_value_info("Z", d, ["n", self.rows])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def _inputs(self, xs: Sequence[Any]) -> np.ndarray:
        """float NCHW model inputs: numpy float arrays pass through, int8 bytes are dequantized (manifest input)."""
        shape = [int(d) for d in self.input_shape[1:]]
        out = []
        for x in xs:
            if isinstance(x, np.ndarray) and x.dtype.kind == "f":
                out.append(x.reshape(shape))
            else:
                q = np.frombuffer(bytes(x), np.int8).astype(np.float32) if not isinstance(x, np.ndarray) \
                    else x.astype(np.float32)
                c, h, w = shape
                out.append(((q - self.in_zp) * np.float32(self.in_scale)).reshape(h, w, c).transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(out), np.float32)

    def features(self, xs: Sequence[Any]) -> np.ndarray:
        """The head's inputs (float64 [n, cols]) computed by the backbone in onnxruntime."""
        x = self._inputs(xs)
        f = self.sess.run([self.feature_name], {self.input_name: x})[0]
        return np.asarray(f, np.float64).reshape(len(x), -1)

    def logits(self, w: np.ndarray, feats: np.ndarray) -> np.ndarray:
        full = np.zeros((self.rows, self.cols), np.float64)
        full[self.mask] = w[: self.nnz]
        return self.head.run(None, {"F": feats, "W": full, "B": w[self.nnz:].astype(np.float64)})[0]

    def _loss(self, w: np.ndarray) -> float:
        z = self.logits(w, self.feats)
        m = z.max(axis=1)
        per = m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[np.arange(len(z)), self.ys]
        return float(per.mean())

    def probe(self, round_seed: int, k: int, mu: float, xs: Sequence[Any], ys: Sequence[int]
              ) -> tuple[list[float], float, int]:
        """K scalars (float32 values) of round ``round_seed``, the round loss and the sample count (docs/zo.md)."""
        self.feats = self.features(xs)
        self.ys = np.asarray(ys, np.int64)
        m = _f32(mu)
        w = self.w
        out = np.zeros(k, np.float32)
        l0 = self._loss(w) if self.estimator == "forward" else 0.0
        total = 0.0
        for j in range(k):
            step = np.float32(m) * zo_np.signs(zo_np.derive(round_seed, j), w.size)
            wp = w + step
            lp = self._loss(wp)
            if self.estimator == "central":
                c = (lp + self._loss(wp - np.float32(2) * step)) / 2
                out[j] = (lp - c) / m
                total += c
            else:
                out[j] = (lp - l0) / m if self.estimator == "forward" else lp / m
                total += lp
        loss = l0 if self.estimator == "forward" else total / k
        return [float(v) for v in out], loss, len(self.ys)

    def update(self, round_seed: int, gbar_list: Sequence[float], lr: float) -> None:
        zo_np.update(self.w, round_seed, lr, gbar_list)

    def accuracy(self, xs: Sequence[Any], ys: Sequence[int]) -> float:
        if not len(xs):
            return 0.0
        z = self.logits(self.w, self.features(xs))
        return float((z.argmax(axis=1) == np.asarray(ys)).mean())
