"""ONNX export of the BN-folded float model (for Jetson / onnxruntime), checked against torch."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


def export_onnx(model: nn.Module, in_shape_hwc: tuple[int, int, int], path: Path) -> None:
    h, w, c = in_shape_hwc
    dummy = torch.zeros(1, c, h, w)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter writes one self-contained file with a dynamic batch axis.
        torch.onnx.export(model.eval(), (dummy,), buf, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    path.write_bytes(buf.getvalue())


def onnx_logits(path: Path, x_nchw: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x_nchw.astype(np.float32)})[0]
