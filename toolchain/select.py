"""Choose a zoo model that fits a board's budget before training it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hw.profiles import BoardProfile
from models.zoo import build_model, prunable_layers
from toolchain.errors import BudgetError

# Largest first: the first candidate whose estimate fits the board is trained.
CANDIDATES: dict[tuple[int, int, int], list[str]] = {
    (28, 28, 1): ["lenet5", "micro-mlp"],
    (32, 32, 3): ["resnet8", "lenet5"],
}
TFLITE_OVERHEAD = 3000  # flatbuffer metadata, op table, quantization parameters (measured ~2-4 KB)
SPARSE_OVERHEAD = 256  # sparse model format header, layer table, requantization parameters
ARENA_OVERHEAD = 2000  # TFLM's persistent allocations on a 32-bit MCU (host measures a little more)


@dataclass
class Estimate:
    name: str
    flash_bytes: int
    ram_bytes: int


def estimate(model: nn.Module, in_shape: tuple[int, int, int], density: float = 1.0) -> tuple[int, int]:
    """(model bytes, RAM) of the int8 model: int8 weights (all of them when ``density`` is 1, as in a
    .tflite; else kept weights with a 1-byte index each, as in the sparse format) and the largest pair
    of live int8 activations between consecutive layers."""
    weights = sum(m.weight.numel() for _, m in prunable_layers(model))
    biases = sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for _, m in prunable_layers(model))
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, i, o: sizes.append(i[0].numel() + o.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, in_shape[2], in_shape[0], in_shape[1]))
    for h in hooks:
        h.remove()
    if density >= 1.0:
        return weights + 4 * biases + TFLITE_OVERHEAD, max(sizes) + ARENA_OVERHEAD
    return int(2 * density * weights) + 4 * biases + SPARSE_OVERHEAD, max(sizes) + ARENA_OVERHEAD


def select_model(profile: BoardProfile, in_shape: tuple[int, int, int], num_classes: int, density: float) -> str:
    """Boards that hold weights in RAM run the sparse format, so their weights cost scales with density."""
    options = CANDIDATES.get(tuple(in_shape))
    if not options:
        raise BudgetError(f"no zoo model is registered for inputs of shape {in_shape}; pass --model NAME")
    tried = []
    for name in options:
        model = build_model(name, in_shape, num_classes)
        flash, ram = estimate(model, in_shape)
        if profile.weights_in_ram:
            flash = estimate(model, in_shape, density)[0]
            ram += flash
        if flash <= profile.flash_bytes and ram <= profile.ram_bytes:
            return name
        tried.append(f"{name} (~{ram} B RAM, ~{flash} B flash)")
    raise BudgetError(f"no zoo model fits {profile.name} ({profile.ram_bytes} B RAM, {profile.flash_bytes} B flash): "
                      f"tried {', '.join(tried)}; choose a board with more memory")
