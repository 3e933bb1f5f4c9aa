"""A tiny sparse int8 model + data set for the fleet tests and benchmark, made without TensorFlow.

Two FULLY_CONNECTED layers written straight into the sparse model format (docs/sparse-model-format.md):
``x (int8, n_in) -> FC + ReLU (hidden) -> FC (classes)``; the last layer is the ZO-trained head
(``toolchain.verify.reference.head_from_smf``). The same head as a one-Gemm ONNX model over the head's
inputs runs on the Jetson runtime, so every party of a mixed fleet starts from the same active vector.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.contracts.smf import (
    FULLY_CONNECTED,
    HEADER,
    MAGIC,
    NO_TENSOR,
    OP,
    TENSOR,
    VERSION,
)
from toolchain.export.requant import activation_range, quantize_multiplier
from toolchain.export.smf_writer import encode_weights
from toolchain.verify.reference import Head, engine_features, head_from_smf


def _quant_fc(w: np.ndarray, b: np.ndarray, s_in: float, s_out: float, zp_out: int, relu: bool) -> bytes:
    sw = np.maximum(np.abs(w).max(axis=1), 1e-6) / 127.0
    q = np.clip(np.round(w / sw[:, None]), -127, 127).astype(np.int8)
    bias = np.round(b / (s_in * sw)).astype(np.int64)
    mults, shifts = zip(*(quantize_multiplier(float(np.float32(s_in)) * float(np.float32(s)) / float(np.float32(s_out)))
                          for s in sw), strict=True)
    lo, hi = activation_range(1 if relu else 0, s_out, zp_out)
    body = struct.pack("<bbH", lo, hi, 0) + np.asarray(bias, "<i4").tobytes() + np.asarray(mults, "<i4").tobytes()
    return body + np.asarray(shifts, np.int8).tobytes() + encode_weights(q)


@dataclass
class FleetModel:
    smf: bytes
    head: Head
    x: np.ndarray  # int8 [n, n_in] model inputs
    y: np.ndarray  # labels
    feats: np.ndarray  # int8 [n, hidden]: the head's inputs (what the device engine computes)

    def config(self, **over: object) -> dict:
        """The bundle's config.json for this model (toolchain.package.bundle.default_spec's keys that ft.py reads)."""
        cfg = {"format": 1, "estimator": "forward", "k_max": 16, "batch_max": 32, "mu": 1e-3, "lr": 0.05,
               "copy_restore": 1, "head": self.head.spec()}
        cfg.update(over)
        return cfg

    def onnx(self, path: Path) -> Path:
        """The head as ONNX over its own inputs ([n, cols, 1, 1] -> Flatten -> Gemm), for the Jetson runtime."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        full, b = self.head.dense()
        nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
                 helper.make_node("Gemm", ["f", "W", "B"], ["z"], transB=1)]
        g = helper.make_graph(
            nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", self.head.cols, 1, 1])],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", self.head.rows])],
            [numpy_helper.from_array(full.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
        return Path(path)

    def jetson_spec(self) -> dict:
        return {**self.config(), "input": {"scale": self.head.in_scale, "zero_point": self.head.in_zp}}

    def split(self, parts: int) -> list[np.ndarray]:
        """Disjoint sample indices per device (interleaved, so every device sees every class)."""
        return [np.arange(i, len(self.y), parts) for i in range(parts)]


def make_model(seed: int = 0, n: int = 96, n_in: int = 16, hidden: int = 12, classes: int = 3,
               density: float = 0.6) -> FleetModel:
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-0.7, 0.7, (classes, n_in))
    y = rng.integers(0, classes, n)
    xf = np.clip(centers[y] + rng.normal(0, 0.25, (n, n_in)), -1, 1)
    s0 = 1 / 127
    x = np.round(xf / s0).astype(np.int8)
    w1 = rng.normal(0, 0.6, (hidden, n_in)) * (rng.random((hidden, n_in)) < density)
    b1 = rng.normal(0, 0.1, hidden)
    h = np.maximum(0, (x * s0) @ w1.T + b1)
    s1 = float(np.float32(max(h.max(), 1e-3) / 255))
    w2 = rng.normal(0, 0.3, (classes, hidden)) * (rng.random((classes, hidden)) < density)
    w2[:, 0] = np.where(w2[:, 0] == 0, 0.1, w2[:, 0])  # every row keeps a weight
    b2 = np.zeros(classes)
    s2 = float(np.float32(4.0 / 127))
    tensors = [(1, 1, n_in, 0, 0, s0), (1, 1, hidden, 1, -128, s1), (1, 1, classes, 0, 0, s2)]
    ops = [(FULLY_CONNECTED, 0, NO_TENSOR, 1, _quant_fc(w1, b1, s0, s1, -128, True)),
           (FULLY_CONNECTED, 1, NO_TENSOR, 2, _quant_fc(w2, b2, s1, s2, 0, False))]
    parts = [struct.pack("<I", max(n_in, classes)) + struct.pack("<I", hidden)]
    parts += [TENSOR.pack(*t) for t in tensors]
    parts += [OP.pack(c, 0, a, bb, o, len(body)) + body for c, a, bb, o, body in ops]
    size = HEADER.size + sum(len(p) for p in parts) + 4
    data = HEADER.pack(MAGIC, VERSION[0], VERSION[1], 0, size, 3, 2, 2, 0, 2, 0) + b"".join(parts)
    smf = data + struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)
    head = head_from_smf(smf)
    feats = engine_features(smf, x, head)
    return FleetModel(smf, head, x, y.astype(np.int64), feats)


def local_files(m: FleetModel, device: str, idx: np.ndarray, key: bytes, *, features: bool = False,
                with_model: bool = False, max_message: int = 600) -> dict[str, bytes]:
    """Provisioned files of a MicroPython board running app_boot.py: config, head, its data shard, key."""
    xs = m.feats[idx] if features else m.x[idx]
    loc = {"device": device, "n": len(idx), "size": int(xs.shape[1]), "labels": [int(v) for v in m.y[idx]],
           "key": key.hex(), "model_id": 0, "max_message": max_message}
    files = {"config.json": json.dumps(m.config()).encode(), "head.bin": m.head.to_bytes(),
             "data.bin": np.ascontiguousarray(xs, np.int8).tobytes()}
    if with_model:
        files["model.smf"] = m.smf
        loc["model_id"] = 1
    files["local.json"] = json.dumps(loc).encode()
    return files
