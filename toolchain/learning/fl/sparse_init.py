"""Initialisation of the weights a sparse mask keeps at the start of training.

Why: a network initialised for its dense shape and then pruned to density d loses a factor ~sqrt(d) of
pre-activation scale in every masked layer (each unit sums d times fewer inputs of the same variance).
Through LeNet-5's five masked layers at 5 % that is a factor ~1e-3: the logits no longer depend on the
input (measured: across-batch logit std 5.7e-5 vs 1.2e-2 dense), the gradients vanish, and every
method whose initial mask is random (ERK) or magnitude stayed at chance (issue 14). Networks with BN
recover the scale in BN, which is why ResNet-8 trained and LeNet-5 did not.

``rescale`` (the default, ``--algo-opt sparse_init=rescale``) multiplies the kept weights of every output
unit (row of the weight viewed as [out, -1]) by ||w_dense|| / ||w_kept||, so each unit's pre-activation
variance under i.i.d. inputs equals the dense network's. For a random mask this is the per-unit
1/sqrt(kept fan-in) correction of sparse-aware initialisation (Evci et al. 2022, "Gradient flow in
sparse neural networks"); for a magnitude mask the factor is smaller because the kept weights are
the large ones. A unit that keeps nothing stays 0. ``none`` keeps the dense init masked (the authors'
code). The rescale is applied once, when the first sparse mask meets untrained (or server-pre-trained)
weights; weights grown later start at 0 as the methods specify.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.contracts.errors import ToolchainError

SPARSE_INITS = ("rescale", "kaiming", "none")


def check_sparse_init(value: str) -> str:
    if value not in SPARSE_INITS:
        raise ToolchainError(f"sparse_init must be one of {', '.join(SPARSE_INITS)}, got '{value}'")
    return value


@torch.no_grad()
def rescale_kept(model: nn.Module, masks: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 kaiming: bool = False) -> None:
    """Per output unit, scale the kept weights of ``model`` so their L2 norm equals the unit's norm in
    ``reference`` (the same weights before masking), or, with ``kaiming``, sqrt(2) (He et al.: variance
    2 / fan_in over the kept fan-in; 1 for the last layer, which has no ReLU). Dense masks are unchanged."""
    params = dict(model.named_parameters())
    last = list(masks)[-1]
    for name, mask in masks.items():
        if bool(mask.all()):
            continue
        ref = reference[name].flatten(1) if reference[name].dim() > 1 else reference[name].view(1, -1)
        kept = (reference[name] * mask).view_as(ref)
        dense_norm, kept_norm = ref.norm(dim=1), kept.norm(dim=1)
        if kaiming:
            dense_norm = torch.full_like(dense_norm, 1.0 if name == last else 2.0 ** 0.5)
        scale = torch.where(kept_norm > 0, dense_norm / kept_norm.clamp_min(1e-30), torch.zeros_like(kept_norm))
        params[name].copy_((kept * scale[:, None]).view_as(params[name]))
