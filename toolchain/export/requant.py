"""TFLite's quantization arithmetic on the host, as TFLite Micro computes it at ``Prepare``.

``toolchain.export.smf_writer`` computes every requantization parameter of a ``.smf`` here (``QuantizeMultiplier`` on
the same double-precision expressions), so that the device engine only does integer work.
"""

from __future__ import annotations

import math

import numpy as np

from toolchain.contracts.smf import SmfError


def round_half_away(x: float) -> int:
    """C's ``std::round`` (TfLiteRound): halves go away from zero."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: ``real ~= m * 2**(shift - 31)`` with ``m`` in [2**30, 2**31)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m = round_half_away(q * (1 << 31))
    if m == 1 << 31:
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:  # TFLite saturates very large multipliers
        return (1 << 31) - 1, 30
    return m, shift


def f32(x: float) -> float:
    return float(np.float32(x))


def activation_range(act: int, scale: float, zp: int) -> tuple[int, int]:
    """TFLite's ``CalculateActivationRangeQuantized`` for int8 (fused NONE / RELU / RELU_N1_TO_1 / RELU6)."""
    def q(v: float) -> int:
        return zp + round_half_away(f32(np.float32(v) / np.float32(scale)))

    if act == 0:
        return -128, 127
    if act == 1:
        return max(-128, q(0.0)), 127
    if act == 2:
        return max(-128, q(-1.0)), min(127, q(1.0))
    if act == 3:
        return max(-128, q(0.0)), min(127, q(6.0))
    raise SmfError(f"fused activation {act} is not supported (NONE, RELU, RELU_N1_TO_1, RELU6 are)")

