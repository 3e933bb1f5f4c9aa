"""Per-device training memory: weights, gradients, optimizer state and activations.

Activations are *measured*: the bytes of every distinct tensor autograd saves for the backward
pass during a real forward of one batch (``torch.autograd.graph.saved_tensors_hooks``), excluding
the parameters themselves. The other terms follow the formulas in ``docs/memory.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.fl.masks import Masks

F32 = 4


@dataclass
class MemoryReport:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def measure_saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of distinct non-parameter tensors saved for backward in one training forward pass."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Count each saved tensor once by its data pointer, with the bytes of the view itself (a batch
        # sliced from a larger dataset tensor costs only the batch on a device).
        try:
            if t.untyped_storage().data_ptr() not in param_ptrs:
                seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    model.train(was_training)
    return sum(seen.values())


def sparse_tensor_bytes(numel: int, nnz: int) -> int:
    """Bytes of a pruned tensor stored as values plus the cheaper of a bitmap or 16/32-bit indices."""
    index = 2 if numel <= 65536 else 4
    return nnz * F32 + min((numel + 7) // 8, nnz * index)


def training_memory(model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, optimizer: str = "sgd",
                    momentum: float = 0.9, dense_gradients: bool = False,
                    extra_activation_bytes: int = 0) -> MemoryReport:
    """Device memory to train ``model`` under ``masks`` on batch ``(x, y)``.

    ``dense_gradients`` marks methods that materialise a dense gradient for every prunable tensor
    (e.g. gradient-based regrowth over all positions); otherwise only kept entries carry a gradient.
    """
    weights = grads = 0
    for name, p in model.named_parameters():
        if name in masks:
            nnz = int(masks[name].sum())
            weights += sparse_tensor_bytes(p.numel(), nnz)
            grads += (p.numel() if dense_gradients else nnz) * F32
        else:
            weights += p.numel() * F32
            grads += p.numel() * F32
    weights += sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    trained = grads // F32
    if optimizer == "adam":
        opt = 2 * trained * F32
    elif optimizer == "sgd" and momentum > 0:
        opt = trained * F32
    else:
        opt = 0
    act = measure_saved_activation_bytes(model, x, y) + extra_activation_bytes
    return MemoryReport(weights, grads, opt, act)
