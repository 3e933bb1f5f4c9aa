"""Normalized sparse convolution (NSConv): BN-free convolutions for FedMef (Huang et al., CVPR 2024).

Scaled weight standardisation (Brock et al., NF-Nets; the FedMef authors' ``WSConv2D``) adapted to
pruned filters. For output filter o, with the statistics taken over the set A_o of entries chosen by
``stats``:

    What_o = g_o * (W_o - mu_o) / sqrt(max(n_o * var_o, eps)) * m_o,   eps = 1e-4, g_o learnable (init 1)

* ``stats="active"`` (default, "normalized *sparse*"): A_o = the unpruned entries of filter o,
  n_o = |A_o|, ``var_o`` unbiased over A_o. This is "method 1" in the authors' code.
* ``stats="all"``: A_o = every entry (pruned zeros included), n_o = fan-in, then re-masked; "method 2",
  the variant that is active in the authors' code.

So every filter's effective weights have mean 0 and unbiased variance 1/n_o over A_o (times g_o^2),
which keeps pre-activations normalised without BatchNorm and makes SAP's small-|x| dropping safe.
A filter with a single selected entry (n_o = 1: frequent at 1 % density and in pruned depthwise filters)
is not centred (mu_o = 0), so What_o = g_o * sign(w): centring it would zero the filter and no gradient
could revive it (measured: MobileNetV2 at 10 % and ResNet-8 at 1 % did not learn at all with that).

The standardisation is its own autograd Function: backward recomputes (W - mu) from the parameter and
saves only per-filter mean and scale, so the training graph holds no weight-sized temporaries beyond
the effective weight the convolution needs (measured by the saved-tensor hooks, see ``docs/fedmef.md``).

The layer needs the mask (a grown weight is 0 but active, so ``W != 0`` is not the mask):
``toolchain.learning.fl.masks.apply_masks`` calls :meth:`NSConv.set_mask`; until a mask is set the layer is dense.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

EPS = 1e-4
STATS = ("active", "all")
INITS = ("nf", "ones")
# Gain of a standardised conv followed by ReLU (Brock et al. 2021, NF-Nets: 1 / std of ReLU(N(0, 1))): without it
# every ReLU halves the second moment and, with no BatchNorm to restore it, the signal fades with depth.
RELU_GAIN = (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5


class _Standardize(torch.autograd.Function):
    """What = g * s * a*(W - mu) * m with per-filter mu, s over the entries selected by ``a``.

    Written in the setup_context style with ``generate_vmap_rule`` so that torch.func.vmap can run it over a
    batch of clients (toolchain/learning/fl/vectorised.py); the per-filter statistics are extra outputs that
    backward reuses, and ``_Standardize.apply(...)[0]`` is the effective weight."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: torch.Tensor, gain: torch.Tensor, mask: torch.Tensor,  # type: ignore[override]
                active_stats: bool) -> tuple[torch.Tensor, ...]:
        co = weight.shape[0]
        w = weight.reshape(co, -1)
        m = mask.reshape(co, -1).to(weight.dtype)
        a = m if active_stats else torch.ones_like(w)
        n = a.sum(1, keepdim=True)
        # A filter with a single selected entry (common at 1 % density, and in depthwise 3x3 filters) has no
        # spread to standardise; centring it would zero the filter for good. Such filters keep their sign and
        # magnitude instead (mu = 0, so What = g * sign(w)): the gain carries its scale.
        mu = torch.where(n > 1.0, (w * a).sum(1, keepdim=True) / n.clamp_min(1.0), torch.zeros_like(n))
        c = a * (w - mu)
        # unbiased variance (torch.var's default, as in the authors' WSConv2D); with one entry, its square
        var = (c * c).sum(1, keepdim=True) / (n - 1.0).clamp_min(1.0)
        v = n * var
        s = torch.rsqrt(v.clamp_min(EPS))
        g = gain.reshape(co, 1)
        out = g * s * c * m
        return out.reshape(weight.shape), mu, s, n, (v > EPS).to(weight.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        weight, gain, mask, active_stats = inputs
        _out, mu, s, n, unclamped = output
        ctx.active_stats = active_stats
        ctx.mark_non_differentiable(mu, s, n, unclamped)
        ctx.save_for_backward(weight, gain, mask, mu, s, n, unclamped)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_stats: Any) -> tuple[torch.Tensor | None, ...]:
        weight, gain, mask, mu, s, n, unclamped = ctx.saved_tensors
        co = weight.shape[0]
        w = weight.reshape(co, -1)
        m = mask.reshape(co, -1).to(weight.dtype)
        a = m if ctx.active_stats else torch.ones_like(w)
        c = a * (w - mu)
        gr = grad.reshape(co, -1)
        g = gain.reshape(co, 1)
        grad_gain = (gr * s * c * m).sum(1).reshape(gain.shape)
        u = gr * g * m
        # d/dc of s*c with s = (n*var)^-1/2, var = sum(c^2)/(n-1): s*u - s^3 * n/(n-1) * <u, c> * c
        k = unclamped * s ** 3 * n / (n - 1.0).clamp_min(1.0)
        dc = s * u - k * (u * c).sum(1, keepdim=True) * c
        dc = a * dc
        dw = a * (dc - (n > 1.0) * dc.sum(1, keepdim=True) / n.clamp_min(1.0))  # (mu is constant 0 when n <= 1)
        return dw.reshape(weight.shape), grad_gain, None, None


class NSConv(nn.Conv2d):
    """``nn.Conv2d`` whose effective weight is the standardised, gained, masked ``weight``.

    Subclasses ``nn.Conv2d`` so masks, pruning and the FL engine treat ``weight`` as the prunable
    tensor; ``gain`` (C_out) and ``bias`` are dense parameters. ``mask`` is a bool buffer (it is model
    state, not a float, so it never travels in FL weight payloads; masks travel separately).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, stats: str = "active") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if stats not in STATS:
            raise ValueError(f"NSConv stats must be one of {STATS}, got {stats!r}")
        self.stats = stats
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")  # as the authors' BN-free ResNet
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask.copy_(mask.to(torch.bool).reshape(self.mask.shape))

    def effective_weight(self) -> torch.Tensor:
        return _Standardize.apply(self.weight, self.gain, self.mask, self.stats == "active")[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stats={self.stats}"


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def convert_to_nsconv(model: nn.Module, stats: str = "active", init: str = "nf") -> nn.Module:
    """In place: every ``Conv2d -> BatchNorm2d`` pair becomes ``NSConv -> Identity``.

    The Identity keeps the module indices of the BN model, so state-dict keys of convolutions and
    classifiers match between ``norm="bn"`` and ``norm="nsconv"`` builds. NSConv gets a bias (BN's
    shift is gone). Raises if a BatchNorm is left that does not follow a convolution.

    ``init`` sets the gains, the only thing that keeps activations at scale without BatchNorm:
    ``"nf"`` (default) = ``RELU_GAIN`` for a conv followed by ReLU/ReLU6 (NF-Nets' scaled weight
    standardisation) and 0 for the last conv of a residual branch (SkipInit, De & Smith 2020: each block
    starts as its shortcut, so the sum does not double the variance per block); blocks mark their branch
    with ``residual = True`` and name it ``body``. ``"ones"``: every gain 1 (measured: the logits of
    MobileNetV2 come out ~30x too small and it does not train; ResNet-8 trains slowly).
    """
    if init not in INITS:
        raise ValueError(f"NSConv init must be one of {INITS}, got {init!r}")
    pairs: list[tuple[str, str]] = []
    gains: dict[str, float] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for k, ((cn, c), (bn_name, b)) in enumerate(zip(kids[:-1], kids[1:], strict=True)):
                if type(c) is nn.Conv2d and isinstance(b, nn.BatchNorm2d):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + cn, prefix + bn_name))
                    after = kids[k + 2][1] if k + 2 < len(kids) else None
                    if isinstance(after, (nn.ReLU, nn.ReLU6)):
                        gains[prefix + cn] = RELU_GAIN
    for name, mod in model.named_modules():
        body = getattr(mod, "body", None)
        if getattr(mod, "residual", False) and isinstance(body, nn.Sequential):
            prefix = f"{name}.body." if name else "body."
            last = [prefix + n for n, c in body.named_children() if type(c) is nn.Conv2d]
            if last:
                gains[last[-1]] = 0.0
    for conv_name, bn_name in pairs:
        parent, attr = _parent(model, conv_name)
        old: nn.Conv2d = getattr(parent, attr)
        new = NSConv(old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0],
                     old.padding[0] if isinstance(old.padding, tuple) else old.padding, old.dilation[0], old.groups,
                     bias=True, stats=stats)
        if init == "nf":
            nn.init.constant_(new.gain, gains.get(conv_name, 1.0))
        setattr(parent, attr, new)
        parent, attr = _parent(model, bn_name)
        setattr(parent, attr, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f"BatchNorm layers not following a convolution cannot become NSConv: {left}")
    return model


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference export: every NSConv becomes a plain ``nn.Conv2d`` whose weight
    is the effective (standardised, gained, masked) weight, and every subclass of Conv2d/Linear/ReLU
    that only changes training behaviour (e.g. SAP layers) becomes its plain base class, so
    ``torch.fx`` treats them as leaf modules. Pruned entries stay exactly 0."""
    out = copy.deepcopy(model).eval()
    for name, mod in list(out.named_modules()):
        if not name:
            continue
        plain: nn.Module | None = None
        if isinstance(mod, NSConv):
            plain = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                              mod.dilation, mod.groups, mod.bias is not None)
            plain.weight.copy_(mod.effective_weight())
            if mod.bias is not None:
                plain.bias.copy_(mod.bias)
        elif isinstance(mod, nn.Conv2d) and type(mod) is not nn.Conv2d:
            plain = copy.deepcopy(mod)
            plain.__class__ = nn.Conv2d
        elif isinstance(mod, nn.Linear) and type(mod) is not nn.Linear:
            plain = copy.deepcopy(mod)
            plain.__class__ = nn.Linear
        elif isinstance(mod, nn.ReLU) and type(mod) is not nn.ReLU:
            plain = nn.ReLU()
        if plain is not None:
            parent, attr = _parent(out, name)
            setattr(parent, attr, plain.eval())
    return out


@contextmanager
def recording_effective_weights(model: nn.Module) -> Iterator[dict[int, int]]:
    """Within the block, every NSConv of ``model`` records the effective weight it computes: yields
    ``{storage data_ptr: kept entries}``, filled as forwards run.

    The convolution saves that weight for its input gradient. It is derived from the parameters, not from
    the batch, and it is zero wherever the mask is, so a device holds only its kept entries; memory
    accounting (``toolchain.learning.fl.memory``) uses this to tell it apart from activations."""
    seen: dict[int, int] = {}
    convs = [m for m in model.modules() if isinstance(m, NSConv)]
    for m in convs:
        def effective(m: NSConv = m) -> torch.Tensor:
            w = type(m).effective_weight(m)
            seen[w.untyped_storage().data_ptr()] = int(m.mask.sum())
            return w

        m.effective_weight = effective  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        for m in convs:
            del m.effective_weight


def has_nsconv(model: nn.Module) -> bool:
    return any(isinstance(m, NSConv) for m in model.modules())
