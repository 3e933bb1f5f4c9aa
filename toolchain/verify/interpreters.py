"""Run int8 TFLite models over a whole test set in LiteRT and in TFLite Micro, and size the TFLM arena."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from toolchain.contracts.paths import REPO
from toolchain.export.silence import captured_fds


def quantize_input(x_float_nhwc: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """float -> int8 exactly as TFLite's QUANTIZE: round half away from zero, then clamp."""
    q = np.round(x_float_nhwc / np.float32(scale)) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def litert_outputs(model: bytes, x_int8: np.ndarray) -> np.ndarray:
    """int8 outputs of LiteRT for every input (the graph has a static batch of 1, as on a board).

    Uses LiteRT's reference kernels: its optimized and XNNPACK int8 kernels round differently from
    TFLite Micro's reference kernels (measured: 1-LSB differences on CONV_2D and MEAN outputs).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=model,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    outs = np.empty((len(x_int8), *it.get_output_details()[0]["shape"][1:]), np.int8)
    for i, x in enumerate(x_int8):
        it.set_tensor(inp, x[None])
        it.invoke()
        outs[i] = it.get_tensor(out)[0]
    return outs


def tflm_outputs(model_path: Path, x_int8: np.ndarray, arena_size: int | None = None) -> np.ndarray:
    """int8 outputs of TFLite Micro (reference kernels) for every input, one invoke each."""
    from tflite_micro import runtime

    with captured_fds():
        it = runtime.Interpreter.from_file(str(model_path), arena_size=arena_size)
    outs = []
    for x in x_int8:
        it.set_input(x[None], 0)
        it.invoke()
        outs.append(it.get_output(0).copy())
    return np.concatenate(outs)


def _tflm_fits(model_path: Path, arena: int) -> bool:
    # TFLite Micro sometimes segfaults instead of raising when the arena is too small, so every
    # probe runs in its own process; a crash counts as "does not fit".
    proc = subprocess.run([sys.executable, "-m", "toolchain.verify.tflm_probe", str(model_path), str(arena)],
                          capture_output=True, timeout=120, cwd=REPO)
    return proc.returncode == 0


def tflm_min_arena(model_path: Path, limit: int = 1 << 24, granularity: int = 16) -> int:
    """Smallest arena (bytes, to ``granularity``) with which TFLite Micro allocates and invokes the model."""
    lo, hi = 0, 1 << 16
    while not _tflm_fits(model_path, hi):
        lo, hi = hi, hi * 4
        if hi > limit:
            raise RuntimeError(f"TFLite Micro could not run {model_path} even with a {limit}-byte arena")
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if _tflm_fits(model_path, mid):
            hi = mid
        else:
            lo = mid
    return hi
