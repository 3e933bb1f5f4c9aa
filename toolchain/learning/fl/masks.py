"""Masks over prunable tensors: first-class objects shared by server and clients.

A mask set maps the parameter name of each prunable ``weight`` (conv/linear) to a bool tensor of
the same shape. Density is (#kept prunable weights) / (#prunable weights).
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.zoo import prunable_layers

Masks = dict[str, torch.Tensor]


def prunable_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" if name else "weight" for name, _ in prunable_layers(model)]


def dense_masks(model: nn.Module) -> Masks:
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_names(model)}


def density(masks: Masks) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / max(total, 1)


def kept_count(masks: Masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


def global_topk(scores: dict[str, torch.Tensor], target_density: float) -> Masks:
    """Keep exactly ``round(target_density * total)`` entries with the largest scores across all tensors.

    Ties are broken by position (stable), so the result is deterministic.
    """
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    keep = max(1, int(round(target_density * flat.numel())))
    order = torch.argsort(flat, descending=True, stable=True)
    keep_flat = torch.zeros(flat.numel(), dtype=torch.bool)
    keep_flat[order[:keep]] = True
    out: Masks = {}
    offset = 0
    for name, s in scores.items():
        out[name] = keep_flat[offset:offset + s.numel()].view_as(s).clone()
        offset += s.numel()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every pruned weight in place, and hand the mask to layers that need it in their forward
    (``set_mask``: NSConv normalises over the unpruned entries, and a grown weight is 0 yet active)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)
        owner = model.get_submodule(name.rpartition(".")[0])
        if hasattr(owner, "set_mask"):
            owner.set_mask(mask)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Masks) -> None:
    """Reset momentum / Adam moments of pruned entries so they cannot revive a pruned weight."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        state = optimizer.state.get(params[name], {})
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            buf = state.get(key)
            if buf is not None:
                buf.mul_(mask)


def masks_equal(a: Masks, b: Masks) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
