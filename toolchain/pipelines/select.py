"""What a board really loads, before and after training: the budget gate and the model picker.

One set of rules (:func:`footprint`) reads the files a build writes and counts, per kind of board:

| board (``runtime``) | flash | RAM |
|---|---|---|
| MicroPython (``micropython``) | every file of ``bundle/`` that ``toolchain flash`` copies (``model.smf``, the engine and runtime code, ``head.bin``, ``config.json``; micro:bit: whole 126-byte file-system chunks, as ``toolchain.package.load.stored_size``) | the engine's heap for this model (:func:`engine_heap`) |
| TFLite Micro / C (``tflite-micro``) | ``model.tflite`` | the TFLite Micro arena (measured by bisection) |
| Jetson (``onnxruntime``) | ``model.onnx`` (+ ``model_int8.onnx``) | the ONNX weights + float32 activations |

The profile's ``ram_bytes`` is the heap left once the runtime (engine code included) is loaded, so code
counts against flash only. :func:`preflight` applies the same rules to the same exporters run on the
untrained model, masked to the requested density layer by layer, before a second of training: file sizes
depend on the architecture and on how many weights are kept, not on their trained values, so the estimate
lands within a few percent of the build's figures (docs/build.md). When it does not fit, :func:`advise`
searches for changes that do (a smaller zoo model, a lower density), checking each with the same estimator.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolchain.boards.profiles import BoardProfile
from toolchain.contracts.errors import BudgetError, ToolchainError
from toolchain.contracts.smf import (
    ADD,
    AVERAGE_POOL_2D,
    CONV_2D,
    DEPTHWISE_CONV_2D,
    MAX_POOL_2D,
    MEAN,
    PAD,
    REQUANTIZE,
    read_smf,
)
from toolchain.export.keras_mirror import build_keras_mirror
from toolchain.export.onnx_export import export_onnx
from toolchain.export.silence import captured_fds
from toolchain.export.smf_writer import tflite_to_smf
from toolchain.export.tflite import convert_int8
from toolchain.models.fold_bn import fold_batchnorm
from toolchain.models.zoo import build_model, prunable_layers
from toolchain.package.bundle import write_bundle
from toolchain.package.load import stored_size
from toolchain.verify.interpreters import tflm_min_arena

# Largest first: the first candidate whose estimate fits the board is trained.
CANDIDATES: dict[tuple[int, int, int], list[str]] = {
    (28, 28, 1): ["lenet5", "micro-mlp"],
    (32, 32, 3): ["resnet8", "lenet5"],
}
KINDS = {"micropython": "micropython", "tflite-micro": "tflm", "onnxruntime": "onnx"}
ADVICE_DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)
PREFLIGHT_CALIBRATION = 32  # calibration images for the estimate's int8 conversion (sizes do not depend on them)

# Engine heap (device_runtime/micropython/smf*.py) on a 32-bit port: the GC hands out 16-byte blocks and every
# array is a 16-byte object plus its item buffer; tuples are 8 bytes + 4 per item.
GC_BLOCK = 16
ARRAY_OBJECT = 16
MODEL_OBJECTS = 256  # the Model instance, its attribute dict and the lists that hold tensors, buffers, ops


def board_kind(profile: BoardProfile) -> str:
    try:
        return KINDS[profile.runtime]
    except KeyError:
        raise ToolchainError(f"board {profile.name} has runtime '{profile.runtime}'; the toolchain builds for "
                             f"{', '.join(KINDS)}") from None


def _blocks(n: int) -> int:
    return max(1, -(-n // GC_BLOCK)) * GC_BLOCK


def _array(nbytes: int) -> int:
    return ARRAY_OBJECT + _blocks(nbytes)


def _tuple(items: int) -> int:
    return _blocks(8 + 4 * items)


def engine_heap(smf: bytes, native: bool = False) -> dict[str, int]:
    """Heap the MicroPython engine holds for a loaded model, by part: what ``smf.Model`` keeps once loading
    is over (loader code dropped), from the model file's own tables. Weighted operators keep, per output
    row, an int32 bias, two u16 multiplier halves, an int8 shift and an int32 row pointer, and per kept
    weight a u16 column and an int8 value (smf_params.py, smf_dec_*.py); convolutions add two int32 clamp limits
    per channel (smf_clamp_limits.py); other operators keep their body bytes; activation buffers, the int32
    accumulator and the output array are allocated once (smf.py).

    ``native`` (a board with a native emitter, ``mpy_march`` set): the viper path's per-operator blocks
    (:func:`_native_blocks`) replace the per-row parameters; convolutions keep their clamp limits.

    Measured on the Cortex-M3 port (MicroPython 1.28; docs/device-engine.md, "Heap of a loaded model"): the
    model's data (heap held by the loaded model, engine code excluded) is within -1.1 % .. +0.4 % of this count
    for the bytecode engine and +2.0 % .. +5.3 % for the native one, on six models (before the native blocks
    were counted, the native engine's data was 16-20 % above it). Code is not counted: the profile's
    ``ram_bytes`` is the heap left once the runtime is loaded."""

    m = read_smf(smf)
    weights = params = other = 0
    for op in m.ops:
        if op.weights is not None:
            rows = op.weights.shape[0]
            kept = int(np.count_nonzero(op.weights))
            weights += _array(2 * kept) + _array(kept) + _array(4 * (rows + 1))
            params += _array(4 * rows) + 2 * _array(2 * rows) + _array(rows) + _tuple(10) + _tuple(6) + _blocks(8)
            if op.opcode in (CONV_2D, DEPTHWISE_CONV_2D):
                params += 2 * _array(4 * rows) + _tuple(3)
        else:
            other += _tuple(6) + _blocks(16 + 16)
    out = m.tensors[m.output].shape
    buffers = sum(_array(b) for b in m.buffer_sizes) + (_array(4 * m.scratch) if m.scratch else 0) \
        + _array(int(np.prod(out)))
    tables = _tuple(5) * len(m.tensors) + MODEL_OBJECTS + other
    parts = {"weights": weights, "parameters": params, "activations": buffers, "tables": tables}
    if native:
        parts["parameters"] = sum(_clamp_limits(op) for op in m.ops if op.opcode in (CONV_2D, DEPTHWISE_CONV_2D))
        parts["native blocks"] = sum(_native_blocks(op) for op in m.ops)
    return parts


def _clamp_limits(op: Any) -> int:
    return 2 * _array(4 * op.weights.shape[0]) + _tuple(3)


def _native_blocks(op: Any) -> int:
    """What smf_viper_prep.py builds for one operator (int32 arrays unless said): per weighted operator R (eight
    per output row: clamp limits, multiplier halves, shift, row span, bias; it replaces the bytecode path's
    per-row parameters) and P (nine); convolutions add T (five per kernel tap), G (22) and a u16 input offset
    per kept weight; ADD two 256-entry tables, R (eight) and P; MEAN R and P; pooling G (12); PAD G (8);
    REQUANTIZE a 256-byte table."""
    i32 = lambda n: _array(4 * n)  # noqa: E731
    if op.weights is not None:
        size = i32(8 * op.weights.shape[0]) + i32(9)
        if op.opcode in (CONV_2D, DEPTHWISE_CONV_2D):
            size += i32(5 * op.params["kh"] * op.params["kw"]) + i32(22) + _array(2 * int(np.count_nonzero(op.weights)))
        return size
    return {MAX_POOL_2D: i32(12), AVERAGE_POOL_2D: i32(12), MEAN: i32(8) + i32(9), PAD: i32(8),
            ADD: 2 * i32(256) + i32(8) + i32(9), REQUANTIZE: _array(256)}.get(op.opcode, 0)


@dataclass
class Footprint:
    """What a board loads: ``flash`` and ``ram`` needed, each with the parts it counts."""

    kind: str
    flash_needed: int
    ram_needed: int
    flash_parts: dict[str, int] = field(default_factory=dict)
    ram_parts: dict[str, int] = field(default_factory=dict)
    problem: str = ""  # the board's runtime cannot run the model at all (e.g. convolutions on the micro:bit)

    def fits(self, profile: BoardProfile) -> bool:
        return not self.problem and self.ram_needed <= profile.ram_bytes and self.flash_needed <= profile.flash_bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> str:
        return f"{self.ram_needed} B RAM, {self.flash_needed} B flash"


def bundle_files(out_dir: Path) -> dict[str, bytes]:
    """The files ``toolchain flash`` copies from ``out_dir/bundle`` (toolchain.package.load.load_bundle: no .hex, no .md)."""
    bundle = out_dir / "bundle"
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*"))
            if p.is_file() and p.suffix not in (".hex", ".md")}


def footprint(profile: BoardProfile, out_dir: Path, arena: int | None = None,
              activation_floats: int = 0) -> Footprint:
    """Count what ``profile``'s board loads from a build folder (or the estimate's scratch folder).

    ``arena``: the TFLite Micro arena (TFLite Micro boards); ``activation_floats``: the largest pair of live
    activations, in elements (Jetson RAM)."""
    kind = board_kind(profile)
    if kind == "micropython":

        files = bundle_files(out_dir)
        flash = {name: stored_size(name, data, profile) for name, data in files.items()}
        ram = engine_heap((out_dir / "model.smf").read_bytes(), native=bool(profile.mpy_march))
    elif kind == "tflm":
        if arena is None:
            raise ValueError("a TFLite Micro board's footprint needs the arena")
        flash = {"model.tflite": (out_dir / "model.tflite").stat().st_size}
        ram = {"arena": arena}
    else:
        flash = {n: (out_dir / n).stat().st_size for n in ("model.onnx", "model_int8.onnx") if (out_dir / n).is_file()}
        ram = {"weights": flash["model.onnx"], "activations": 4 * activation_floats}
    return Footprint(kind, sum(flash.values()), sum(ram.values()), flash, ram)


def live_activations(model: torch.nn.Module, in_shape: tuple[int, int, int]) -> int:
    """Largest input + output element count of any leaf module (two live activation tensors)."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, i, o: sizes.append(i[0].numel() + o.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, in_shape[2], in_shape[0], in_shape[1]))
    for h in hooks:
        h.remove()
    return max(sizes)


def _mask_uniform(model: torch.nn.Module, density: float) -> None:
    """Keep the largest ``density`` fraction of each prunable layer's weights (at least one per layer)."""
    with torch.no_grad():
        for _, layer in prunable_layers(model):
            w = layer.weight
            k = max(1, round(density * w.numel()))
            thresh = w.abs().flatten().kthvalue(w.numel() - k + 1).values if k < w.numel() else -1.0
            w.mul_((w.abs() >= thresh).to(w.dtype))


@dataclass
class Estimate:
    model: str
    density: float
    footprint: Footprint
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "density": self.density, "seconds": round(self.seconds, 2),
                **self.footprint.as_dict()}


def preflight(profile: BoardProfile, model_name: str, density: float, in_shape: tuple[int, int, int],
              num_classes: int, calibration: np.ndarray, dense_as_conv: bool = True, seed: int = 0) -> Estimate:
    """The footprint of ``model_name`` at ``density`` on ``profile``, from the real exporters run on the
    untrained model (each prunable layer masked to ``density``), in a scratch folder."""
    import time

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(model_name, in_shape, num_classes).eval()
    _mask_uniform(model, density)
    folded = fold_batchnorm(model)
    kind = board_kind(profile)
    with tempfile.TemporaryDirectory(prefix="toolchain-preflight.") as tmp:
        d = Path(tmp)
        arena = None
        if kind == "onnx":

            export_onnx(folded, in_shape, d / "model.onnx")
        else:
            with captured_fds():
                tfl = convert_int8(build_keras_mirror(folded, in_shape, dense_as_conv), calibration)
            (d / "model.tflite").write_bytes(tfl.data)
            if kind == "tflm":

                arena = tflm_min_arena(d / "model.tflite")
            else:

                (d / "model.smf").write_bytes(tflite_to_smf(tfl.data))
                try:
                    write_bundle(d, profile)
                except ToolchainError as exc:  # the build would stop at the same point, after training
                    return Estimate(model_name, density, Footprint(kind, 0, 0, problem=str(exc).split("; ")[0]),
                                    time.perf_counter() - t0)
        fp = footprint(profile, d, arena, live_activations(model, in_shape))
    return Estimate(model_name, density, fp, time.perf_counter() - t0)


def _need(profile: BoardProfile, fp: Footprint) -> str:
    over = []
    if fp.ram_needed > profile.ram_bytes:
        over.append(f"{fp.ram_needed} B RAM of {profile.ram_bytes}")
    if fp.flash_needed > profile.flash_bytes:
        over.append(f"{fp.flash_needed} B flash of {profile.flash_bytes}")
    return " and ".join(over) or fp.short()


def advise(profile: BoardProfile, model_name: str, density: float, in_shape: tuple[int, int, int],
           estimate_fn: Callable[[str, float], Estimate], user_model: bool) -> list[str]:
    """Changes that the estimator says fit, best first: the same model at the highest lower density that
    fits (MicroPython boards, whose model file shrinks with density) and a smaller zoo model at the same
    density (first when the picker chose the model); failing both, a smaller model at a lower density.
    Empty when nothing in reach fits."""
    options = CANDIDATES.get(tuple(in_shape), [model_name])
    smaller = options[options.index(model_name) + 1:] if model_name in options else []
    sparse = board_kind(profile) == "micropython"

    def lower_density(name: str) -> float | None:
        lowest = [d for d in ADVICE_DENSITIES if d < density]
        # sizes only grow with density: if the lowest does not fit, none does (one estimate instead of seven)
        if not sparse or not lowest or not estimate_fn(name, lowest[-1]).footprint.fits(profile):
            return None
        return next(d for d in lowest if estimate_fn(name, d).footprint.fits(profile))

    def same_density() -> str | None:
        for name in smaller:
            e = estimate_fn(name, density)
            if e.footprint.fits(profile):
                return f"--model {name} (~{e.footprint.short()})"
        return None

    found: list[str] = []
    if not user_model and (hit := same_density()):
        return [hit]
    if (d := lower_density(model_name)) is not None:
        found.append(f"--density {d} (~{estimate_fn(model_name, d).footprint.short()})")
    if user_model and (hit := same_density()):
        found.append(hit)
    if not found:
        for name in smaller:
            if (d := lower_density(name)) is not None:
                return [f"--model {name} --density {d} (~{estimate_fn(name, d).footprint.short()})"]
    return found


def budget_message(profile: BoardProfile, model_name: str, density: float, fp: Footprint, advice: list[str],
                   estimated: bool) -> str:
    board = f"{profile.name} ({profile.ram_bytes} B RAM, {profile.flash_bytes} B flash for the model)"
    if fp.problem:
        head = f"{model_name} cannot run on {board}: {fp.problem}"
    else:
        head = f"{model_name} at density {density} {'would need' if estimated else 'needs'} {_need(profile, fp)} " \
               f"on {board}"
    if advice:
        return f"{head}; this fits: {' or '.join(advice)}"
    why = "" if board_kind(profile) == "micropython" else " (this board loads the dense model: density does not help)"
    return f"{head}; no smaller zoo model or density down to {ADVICE_DENSITIES[-1]} fits{why}: pick a board with more memory"


def select_model(profile: BoardProfile, in_shape: tuple[int, int, int], density: float,
                 estimate_fn: Callable[[str, float], Estimate], model: str | None = None) -> Estimate:
    """The estimate of ``model`` (or of the largest zoo model that fits) at ``density``; BudgetError (exit 3)
    with advice that fits when it does not."""
    options = [model] if model is not None else CANDIDATES.get(tuple(in_shape))
    if not options:
        raise BudgetError(f"no zoo model is registered for inputs of shape {in_shape}; pass --model NAME")
    for name in options:
        e = estimate_fn(name, density)
        if e.footprint.fits(profile):
            return e
    # the user's model, or the smallest candidate: what would make it fit
    advice = advise(profile, options[-1], density, in_shape, estimate_fn, user_model=True)
    tried = f" (tried {', '.join(options)})" if len(options) > 1 else ""
    raise BudgetError(budget_message(profile, options[-1], density, e.footprint, advice, estimated=True) + tried)
