"""Fold every BatchNorm that follows a convolution into the convolution (inference graph).

Uses ``torch.fx`` to trace the model and fuses ``Conv2d -> BatchNorm2d`` pairs into one conv with
a bias, so the exported graph has no BN and pruned weights stay exactly zero (the BN scale is per
output channel, so a zero weight stays zero after folding).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from toolchain.models.nsconv import materialize


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """An eval-mode ``GraphModule`` equal to ``model`` with conv+BN pairs fused.

    BN-free NSConv layers are first materialised into plain convolutions holding their effective
    (standardised, gained, masked) weights, and training-only layer subclasses (SAP) become their
    plain base classes (``toolchain.models.nsconv.materialize``)."""
    m = materialize(model)
    gm = fuse(m, inplace=True)
    leftover = [n for n, mod in gm.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    if leftover:
        raise ValueError(f"BatchNorm not preceded by a conv cannot be folded: {leftover}")
    return gm


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    return float((a(x) - b(x)).abs().max())
