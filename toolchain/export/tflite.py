"""Full-int8 post-training quantization to a TFLite flatbuffer (int8 input/output, per-channel weights)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# TFLite Micro ships these builtin kernels; anything else in the graph would fail on the board.
TFLM_BUILTINS = {
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "ADD", "PAD",
    "RESHAPE", "QUANTIZE", "DEQUANTIZE", "SOFTMAX", "MUL", "CONCATENATION",
}


@dataclass
class QuantParams:
    scale: float
    zero_point: int


@dataclass
class TfliteModel:
    data: bytes
    ops: list[str]
    input_quant: QuantParams
    output_quant: QuantParams


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf


def convert_int8(keras_model, calibration_nhwc: np.ndarray) -> TfliteModel:
    """Quantize ``keras_model`` with ``calibration_nhwc`` (float inputs, NHWC) as representative data."""
    tf = _quiet_tf()

    def representative() -> Iterator[list[np.ndarray]]:
        for i in range(len(calibration_nhwc)):
            yield [calibration_nhwc[i:i + 1].astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    data = conv.convert()
    return describe(data)


def describe(data: bytes) -> TfliteModel:
    """Op names and I/O quantization of a .tflite flatbuffer (read with LiteRT)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    ops = [d["op_name"] for d in it._get_ops_details()]  # LiteRT's only op listing API
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    return TfliteModel(data, ops, QuantParams(*i["quantization"]), QuantParams(*o["quantization"]))


def unsupported_ops(ops: list[str]) -> list[str]:
    return sorted(set(ops) - TFLM_BUILTINS)
