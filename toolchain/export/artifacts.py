"""The export stage: a trained, batch-norm-folded model -> the files boards take.

``model.tflite`` (full int8, TFLite Micro builtins only), ``model_data.h/.cc`` (the same bytes as a C array)
and ``model.onnx`` (float), each checked where a check is cheap: the int8 graph uses no op TFLite Micro lacks,
and the ONNX graph computes what the torch model computes. The sparse model file is the package stage's
(boards that run it get it with their bundle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolchain.contracts.errors import EXIT_VERIFY, ToolchainError
from toolchain.export.c_array import write_c_array
from toolchain.export.keras_mirror import build_keras_mirror
from toolchain.export.onnx_export import export_onnx, onnx_logits
from toolchain.export.silence import captured_fds
from toolchain.export.tflite import TfliteModel, convert_int8, unsupported_ops

ONNX_TOLERANCE = 1e-3  # max |ONNX - torch| on the probe batch (float32 logits)


@dataclass
class Exported:
    tflite: TfliteModel
    tflite_path: Path
    onnx_path: Path
    onnx_max_error: float


def int8_tflite(folded: nn.Module, input_shape: tuple[int, int, int], calibration_nhwc: np.ndarray,
                dense_as_conv: bool = True) -> TfliteModel:
    """The full-int8 TFLite model of ``folded`` through its NHWC Keras mirror; refuses ops TFLite Micro lacks."""
    with captured_fds():  # TensorFlow prints to the file descriptors directly
        tfl = convert_int8(build_keras_mirror(folded, input_shape, dense_as_conv), calibration_nhwc)
    bad = unsupported_ops(tfl.ops)
    if bad:
        raise ToolchainError(f"the int8 graph uses ops TFLite Micro lacks: {', '.join(bad)}", EXIT_VERIFY)
    return tfl


def export_artifacts(folded: nn.Module, input_shape: tuple[int, int, int], calibration_nhwc: np.ndarray,
                     probe_nchw: torch.Tensor, out: Path, dense_as_conv: bool = True) -> Exported:
    """Write ``model.tflite``, ``model_data.h/.cc`` and ``model.onnx`` into ``out``; ``probe_nchw``: a batch
    of real inputs on which the ONNX graph must match the torch model."""
    tfl = int8_tflite(folded, input_shape, calibration_nhwc, dense_as_conv)
    tflite_path = out / "model.tflite"
    tflite_path.write_bytes(tfl.data)
    write_c_array(tfl.data, out)
    onnx_path = out / "model.onnx"
    export_onnx(folded, input_shape, onnx_path)
    with torch.no_grad():
        reference = folded(probe_nchw).numpy()
    error = float(np.abs(onnx_logits(onnx_path, probe_nchw.numpy()) - reference).max())
    if error > ONNX_TOLERANCE:
        raise ToolchainError(f"ONNX export differs from the torch model by {error:.2e}", EXIT_VERIFY)
    return Exported(tfl, tflite_path, onnx_path, error)
