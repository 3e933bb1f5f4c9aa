"""Per-device training memory: weights, gradients, optimizer state and activations.

Activations are *measured*: the bytes of every distinct tensor autograd saves for the backward
pass during a real forward of one batch (``torch.autograd.graph.saved_tensors_hooks``), excluding
the model's own state (counted as weights) and charging a parameter-derived copy at its kept entries.
The other terms follow the formulas in ``docs/memory.md``.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from toolchain.learning.fl.masks import Masks
from toolchain.models.nsconv import recording_effective_weights

F32 = 4
# Version of the rules in docs/memory.md that figures are measured under. 2 (2026-12-04): saved model buffers are
# not activations; an NSConv effective weight costs its kept entries. Results carry it (bench/fl_grid.py).
MEMORY_RULE = 2


@dataclass
class MemoryReport:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    extra: int = 0  # method-specific buffers (e.g. top-K gradient buffers), ``Strategy.extra_device_bytes``

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.extra

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass
class SavedTensors:
    """What one training forward saves for backward, in bytes (``measure_saved_tensors``)."""

    activations: int  # distinct batch-derived tensors (input batch included)
    weight_copies: int  # parameter-derived tensors (NSConv effective weights), dense as this simulation holds them
    weight_copies_device: int  # the same at their kept entries, 4 B each: what a device holds
    buffers: int  # model buffers saved as they are (BN statistics, NSConv masks): the weights term holds them
    activation_tensors: int


def measure_saved_tensors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, backward: bool = False) -> SavedTensors:
    """Sort every distinct tensor autograd saves in one training forward of ``(x, y)`` (``saved_tensors_hooks``).

    Model state (parameters, BN statistics, NSConv masks) saved as it is costs nothing extra: the weights term
    holds it. An NSConv effective weight is recorded apart (``recording_effective_weights``): a device holds its
    kept entries only. Everything else counts once, by data pointer, at the bytes of the view itself (a batch
    sliced from a larger dataset tensor costs only the batch on a device). ``backward`` also runs the backward
    pass (a real step, e.g. to exercise SAP's backward on what it saved); it saves nothing more.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}
    copies: dict[int, tuple[int, int]] = {}
    buffer_bytes: dict[int, int] = {}
    was_training = model.training
    model.train()
    with recording_effective_weights(model) as effective:  # filled by the forward, read by pack()

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                return t
            nbytes = t.numel() * t.element_size()
            key = t.data_ptr() if t.numel() else id(t)
            if ptr in params:
                pass
            elif ptr in buffers:
                buffer_bytes[key] = nbytes
            elif ptr in effective:
                copies[key] = (nbytes, effective[ptr] * t.element_size())
            else:
                saved[key] = max(saved.get(key, 0), nbytes)
            # detached: the graph keeps what pack returns, and a saved output returned as itself would hold its
            # own grad_fn, a cycle through C++ that Python's gc cannot break (every call's graph, activations
            # and model copy leaked: ~15 MB a round for ResNet-8 on CIFAR-10). Backward needs values only.
            return t.detach()

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = F.cross_entropy(model(x), y)
            if backward:
                loss.backward()
        finally:
            if backward:
                model.zero_grad(set_to_none=True)
            model.train(was_training)
    return SavedTensors(sum(saved.values()), sum(c[0] for c in copies.values()), sum(c[1] for c in copies.values()),
                        sum(buffer_bytes.values()), len(saved))


def sparse_tensor_bytes(numel: int, nnz: int) -> int:
    """Bytes of a pruned tensor stored as values plus the cheaper of a bitmap or 16/32-bit indices."""
    index = 2 if numel <= 65536 else 4
    return nnz * F32 + min((numel + 7) // 8, nnz * index)


def training_memory(model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, optimizer: str = "sgd",
                    momentum: float = 0.9, dense_gradient_layers: Collection[str] = (),
                    extra_activation_bytes: int = 0, extra_bytes: int = 0) -> MemoryReport:
    """Device memory to train ``model`` under ``masks`` on batch ``(x, y)`` (the rules of docs/memory.md).

    A masked tensor's gradient costs its kept entries (a device computes dW only where W is kept), except
    for the tensors in ``dense_gradient_layers``: those whose dense gradient the method computes in this
    round (growth scores, importances) are charged in full. Optimizer state covers the trained entries
    only (kept weights + unmasked parameters): a dense gradient used for scoring is not stepped.
    """
    weights = grads = trained = 0
    for name, p in model.named_parameters():
        if name in masks:
            nnz = int(masks[name].sum())
            weights += sparse_tensor_bytes(p.numel(), nnz)
            grads += (p.numel() if name in dense_gradient_layers else nnz) * F32
            trained += nnz
        else:
            weights += p.numel() * F32
            grads += p.numel() * F32
            trained += p.numel()
    weights += sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    if optimizer == "adam":
        opt = 2 * trained * F32
    elif optimizer == "sgd" and momentum > 0:
        opt = trained * F32
    else:
        opt = 0
    saved = measure_saved_tensors(model, x, y)
    act = saved.activations + saved.weight_copies_device + extra_activation_bytes
    return MemoryReport(weights, grads, opt, act, extra_bytes)


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live float tensors created by aten ops (a storage counts from its creating op until
    the last Python reference to that tensor dies); ``peak`` is the maximum of the running sum."""

    def __init__(self, exclude: set[int], start: int) -> None:
        super().__init__()
        self.exclude = exclude
        self.live = self.peak = start
        self.held: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        self.live -= self.held.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            # Integer outputs are max-pool argmax indices, which an inference kernel never materialises.
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.exclude or ptr in self.held or storage.nbytes() == 0:
                continue  # parameters, views of them (e.g. a transposed weight), or an already counted buffer
            self.held[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr)
        return out


def measure_forward_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of live activations (input batch included) during one ``torch.no_grad()`` eval forward.

    Forward-only (ZO) training keeps nothing for a backward pass, so its activation memory is the largest
    set of tensors alive at once: every float tensor an aten op returns is counted from creation until it
    is freed (``TorchDispatchMode`` + ``weakref.finalize``); tensors sharing storage with parameters or
    buffers are excluded (they are the weights term). Op-internal scratch (e.g. a conv's im2col) is not
    seen, as with ``measure_saved_tensors``.
    """
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    was_training = model.training
    model.eval()
    tracker = _LiveTensorBytes(exclude, x.numel() * x.element_size())
    with torch.no_grad(), tracker:
        out = model(x)
    del out
    model.train(was_training)
    return tracker.peak


def forward_only_memory(model: nn.Module, masks: Masks, x: torch.Tensor, scalar_bytes: int = 0,
                        graph: nn.Module | None = None) -> MemoryReport:
    """Device memory of forward-only (zeroth-order) training on ``x`` under ``masks`` (docs/ntk-zo.md).

    Weights as in :func:`training_memory` (kept values + the cheaper index/bitmap, float buffers); no
    gradients and no optimizer state (the update is rebuilt from seeds, in place); activations = the measured
    forward peak of ``graph`` (default ``model``; e.g. the BN-folded graph a device runs); ``extra`` =
    ``scalar_bytes`` (the K float32 scalars a client keeps for its reply).
    """
    weights = 0
    for name, p in model.named_parameters():
        weights += sparse_tensor_bytes(p.numel(), int(masks[name].sum())) if name in masks else p.numel() * F32
    weights += sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
    return MemoryReport(weights, 0, 0, measure_forward_peak_bytes(graph if graph is not None else model, x),
                        scalar_bytes)
