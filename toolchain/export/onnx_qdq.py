"""QDQ int8 ONNX (onnxruntime static quantization, per-channel int8 weights) for the Jetson runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def quantize_qdq(float_onnx: Path, out: Path, calibration_nchw: np.ndarray, input_name: str = "input") -> None:
    """``quantize_static`` of ``float_onnx`` into ``out``: QDQ format, int8 activations and per-channel int8 weights,
    activation ranges calibrated (MinMax) on ``calibration_nchw`` (float32 model inputs, one sample per batch)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: np.ascontiguousarray(x[None], np.float32)} for x in calibration_nchw)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(float_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
