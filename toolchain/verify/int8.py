"""The verify stage: the int8 model in both real interpreters, on the whole test set.

TFLite Micro's minimum arena is measured by bisection first and the test set then runs in exactly that arena,
so the arena the budget counts is one that was seen to work. LiteRT (reference kernels) runs the same inputs;
the two must agree (they do to the last bit with the 1x1-conv export of dense layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.export.tflite import TfliteModel
from toolchain.verify.interpreters import litert_outputs, quantize_input, tflm_min_arena, tflm_outputs


@dataclass
class Int8Run:
    arena: int  # bytes: the smallest TFLite Micro arena that runs the model
    litert: np.ndarray  # int8 outputs [n, classes]
    tflm: np.ndarray

    @property
    def mismatch(self) -> int:
        return int((self.litert != self.tflm).sum())

    def accuracy(self, labels: np.ndarray) -> tuple[float, float]:
        """(LiteRT, TFLite Micro) top-1 accuracy."""
        return float((self.litert.argmax(1) == labels).mean()), float((self.tflm.argmax(1) == labels).mean())


def run_int8(tfl: TfliteModel, tflite_path: Path, x_float_nhwc: np.ndarray) -> Int8Run:
    xq = quantize_input(x_float_nhwc, tfl.input_quant.scale, tfl.input_quant.zero_point)
    arena = tflm_min_arena(tflite_path)
    lite = litert_outputs(tfl.data, xq)
    micro = tflm_outputs(tflite_path, xq, arena_size=arena)  # the measured minimum arena runs the whole test set
    return Int8Run(arena, lite, micro)
