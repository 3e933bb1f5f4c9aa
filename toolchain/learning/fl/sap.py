"""Scaled activation pruning (SAP, FedMef) and a measured training footprint.

SAP replaces the autograd function of conv and linear layers. The forward output is computed by the
same ``F.conv2d``/``F.linear`` call as the plain layer (bit-identical). For backward it saves only the
top ``ceil((1 - gamma) * numel(x))`` entries of its input by ``|x|`` (DropIT "min-k" dropping) as
values (fp16 by default, as under the authors' autocast) plus int32 flat indices, through
``ctx.save_for_backward`` so saved-tensor hooks see their true dtype and size. Backward rebuilds
``x~`` (zeros elsewhere): the weight gradient uses ``x~``, the input gradient uses only the weight and
the output gradient, so the error signal passed down is exact.

``gamma`` defaults to 0.7 (the authors' research code, which produced the paper's numbers; their
library uses 0.5). With fp16 values and int32 indices a kept entry costs 6 B against 4 B for the
plain fp32 cache, so SAP saves memory only for keep-ratios below 2/3 (gamma > 1/3).

ReLU saves its whole fp32 output for backward, and that output is the next convolution's input: it
would keep the dense tensor alive and cancel SAP. ``relu_bits=True`` swaps ReLU for one that saves
only the sign as a packed bit mask (1/8 B per element), which is what ReLU's backward needs.

:func:`enable_sap` swaps layer classes in place (the state dict is unchanged);
``toolchain.models.nsconv.materialize`` swaps them back for export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.learning.fl.memory import F32, measure_saved_tensors, sparse_tensor_bytes
from toolchain.models.nsconv import NSConv

DEFAULT_GAMMA = 0.7


# ---- compression of saved inputs ------------------------------------------------------------------
def keep_count(numel: int, gamma: float) -> int:
    """ceil((1 - gamma) * numel), without float noise (1 - 0.7 is 0.30000000000000004)."""
    return min(numel, math.ceil(round((1.0 - gamma) * numel, 9)))


def compress(x: torch.Tensor, gamma: float, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, int32 flat indices) of the ``ceil((1-gamma)*numel)`` largest-|x| entries.

    With ``gamma == 0`` every entry is kept in order and no indices are stored."""
    flat = x.detach().reshape(-1)
    k = keep_count(flat.numel(), gamma)
    vdtype = torch.float16 if fp16 else flat.dtype
    if k >= flat.numel():
        return flat.to(vdtype).clone(), torch.empty(0, dtype=torch.int32, device=flat.device)
    # the k-th largest |x| as a threshold (kthvalue is ~2x faster than topk on CPU), then every entry
    # above it plus as many ties as needed: exactly k entries, the same set as topk up to ties
    a = flat.abs()
    thr = torch.kthvalue(a, a.numel() - k + 1).values
    above = torch.nonzero(a > thr).flatten()
    ties = torch.nonzero(a == thr).flatten()[:k - above.numel()]
    idx = torch.cat([above, ties])
    return flat[idx].to(vdtype), idx.to(torch.int32)


def decompress(values: torch.Tensor, idx: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if idx.numel() == 0 and values.numel() == math.prod(shape):
        return values.to(dtype).reshape(shape)
    out = torch.zeros(math.prod(shape), dtype=dtype, device=values.device)
    out[idx.long()] = values.to(dtype)
    return out.reshape(shape)


class _SAPConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any,
                dilation: Any, groups: int, gamma: float, fp16: bool) -> torch.Tensor:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        values, idx = compress(x, gamma, fp16)
        ctx.save_for_backward(values, idx, weight)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, idx, weight = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups, has_bias = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(shape, weight, gy, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            x_rec = decompress(values, idx, shape, dtype)
            gw = torch.nn.grad.conv2d_weight(x_rec, weight.shape, gy, stride, padding, dilation, groups)
        if has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None


class _SAPLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: float,
                fp16: bool) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        values, idx = compress(x, gamma, fp16)
        ctx.save_for_backward(values, idx, weight)
        ctx.conf = (x.shape, x.dtype, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, idx, weight = ctx.saved_tensors
        shape, dtype, has_bias = ctx.conf
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight).reshape(shape)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ decompress(values, idx, shape, dtype).reshape(-1, shape[-1])
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


class _BitReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        ctx.save_for_backward(pack_bits(y > 0))
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> torch.Tensor:
        (bits,) = ctx.saved_tensors
        return gy * unpack_bits(bits, ctx.shape).to(gy.dtype)


_POW2 = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    flat = b.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _POW2.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = (packed.unsqueeze(1) & _POW2.to(packed.device)).ne(0).reshape(-1)
    return bits[:math.prod(shape)].reshape(shape)


def _active(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


# ---- the same gradients for torch.func.vmap (clients batched: toolchain/learning/fl/vectorised.py) ------------
# The autograd functions above cut a data-dependent number of entries (nonzero), which vmap cannot batch. A layer
# with ``sap_batched = True`` computes the same gradients from vmappable operations instead: the kept set as a
# mask (the same entries as ``compress``, ties taken in index order), and the output split in two so that the
# weight gradient sees only the kept, fp16-rounded input while the input gradient stays exact:
#     y = layer(x_kept, W) + layer(x - x_kept, W.detach()),  x_kept = x * keep + (fp16 rounding).detach()
# The forward value equals layer(x, W) up to rounding; the graph holds dense tensors (no memory saving: this
# mode is for simulation speed, and memory is measured on the sequential layers).
def kept_mask(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The entries ``compress(x, gamma, ...)`` keeps, as a bool tensor shaped like ``x`` (vmappable)."""
    a = x.detach().abs().reshape(-1)
    k = keep_count(a.numel(), gamma)
    if k >= a.numel():
        return torch.ones_like(x, dtype=torch.bool)
    thr = a.kthvalue(a.numel() - k + 1).values
    above, ties = a > thr, a == thr
    return (above | (ties & (ties.cumsum(0) <= k - above.sum()))).reshape(x.shape)


def split_input(x: torch.Tensor, gamma: float, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_kept, x - x_kept): the kept part carries the stored (fp16-rounded) values, gradients pass straight."""
    kept = x * kept_mask(x, gamma)
    if fp16:
        kept = kept + (kept.half().to(x.dtype) - kept).detach()
    return kept, x - kept


# ---- layer classes (swapped in place by enable_sap) ----------------------------------------------
class _SAPConvMixin:
    sap_gamma: float = DEFAULT_GAMMA
    sap_fp16: bool = True
    sap_batched: bool = False  # the vmappable formulation (set on the vectorised engine's own copy)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.sap_batched and torch.is_grad_enabled():
            kept, rest = split_input(x, self.sap_gamma, self.sap_fp16)
            return (super()._conv_forward(kept, weight, bias)  # type: ignore[misc]
                    + super()._conv_forward(rest, weight.detach(), None))  # type: ignore[misc]
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not _active(x, weight):
            return super()._conv_forward(x, weight, bias)  # type: ignore[misc]
        return _SAPConv2dFn.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                                  self.sap_gamma, self.sap_fp16)


class SAPConv2d(_SAPConvMixin, nn.Conv2d):
    pass


class SAPNSConv(_SAPConvMixin, NSConv):
    pass


class SAPLinear(nn.Linear):
    sap_gamma: float = DEFAULT_GAMMA
    sap_fp16: bool = True
    sap_batched: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sap_batched and torch.is_grad_enabled():
            kept, rest = split_input(x, self.sap_gamma, self.sap_fp16)
            return F.linear(kept, self.weight, self.bias) + F.linear(rest, self.weight.detach())
        if not _active(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return _SAPLinearFn.apply(x, self.weight, self.bias, self.sap_gamma, self.sap_fp16)


class BitReLU(nn.ReLU):
    """ReLU that saves a packed sign bitmap for backward instead of its fp32 output."""

    sap_batched: bool = False  # batched clients: plain ReLU, whose gradient is the same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sap_batched or not (torch.is_grad_enabled() and x.requires_grad):
            return torch.relu(x)
        return _BitReLUFn.apply(x)


_SWAP: dict[type, type] = {nn.Conv2d: SAPConv2d, NSConv: SAPNSConv, nn.Linear: SAPLinear}


def enable_sap(model: nn.Module, gamma: float = DEFAULT_GAMMA, fp16: bool = True, relu_bits: bool = True) -> nn.Module:
    """In place: conv/linear layers (plain or NSConv) become SAP layers; ReLU saves bits if ``relu_bits``."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"SAP gamma must be in [0, 1), got {gamma}")
    for mod in model.modules():
        cls = type(mod)
        if cls in _SWAP:
            mod.__class__ = _SWAP[cls]
        elif relu_bits and cls is nn.ReLU and not getattr(mod, "inplace", False):
            mod.__class__ = BitReLU
        if isinstance(mod, (_SAPConvMixin, SAPLinear)):
            mod.sap_gamma = float(gamma)
            mod.sap_fp16 = bool(fp16)
    return model


# ---- measured footprint ----------------------------------------------------------------------------
@dataclass
class Footprint:
    """Device training footprint in bytes, FedMef's definition: model + activations saved for backward.

    ``model``: prunable weights as values + cheapest index (``sparse_tensor_bytes``), every other
    parameter and float buffer dense. ``activations``: measured, every distinct non-parameter,
    non-buffer tensor autograd saved in one training forward (hooks see SAP's fp16 values and int32
    indices at their true size). ``weight_copies``: measured separately, the effective NSConv weights
    that convolutions save for the input gradient (dense in this simulation; ``weight_copies_device``
    is the same at the kept entries only, ``nnz * 4``)."""

    model: int
    activations: int
    weight_copies: int
    weight_copies_device: int
    activation_tensors: int

    @property
    def total(self) -> int:
        return self.model + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total,
                "total_incl_weight_copies_device": self.total + self.weight_copies_device}


def model_bytes(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    total = 0
    for name, p in model.named_parameters():
        total += sparse_tensor_bytes(p.numel(), int(masks[name].sum())) if name in masks else p.numel() * F32
    return total + sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())


def measure_footprint(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor) -> Footprint:
    """Measure the footprint during a real training step (forward + backward) on batch ``(x, y)``."""
    saved = measure_saved_tensors(model, x, y, backward=True)  # backward: SAP's backward runs on what was saved
    return Footprint(model_bytes(model, masks), saved.activations, saved.weight_copies, saved.weight_copies_device,
                     saved.activation_tensors)
