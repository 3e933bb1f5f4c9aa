"""One-shot scoring and mask functions shared by pruning strategies (and other engineers' baselines).

Every function returns :data:`toolchain.learning.fl.masks.Masks` over ``prunable_names(model)`` (conv/linear
``weight``; biases and norm layers are never masked) and keeps an *exact* number of weights:

- global scopes keep exactly ``keep_count(total, density) = max(1, round(density * total))`` weights
  (ties broken by position, so results are deterministic; see ``global_topk``);
- ERK allocations keep exactly ``erk_counts(model, density)[name]`` weights per layer, and those counts
  sum exactly to ``keep_count(total, density)`` (largest-remainder rounding);
- ``scope="local"`` keeps ``max(1, round(density * n_l))`` weights in every layer (uniform density).

Nothing here mutates the model's weights (SynFlow works on a copy).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.fl.masks import Masks, global_topk, prunable_names


def keep_count(total: int, density: float) -> int:
    """Number of weights a global mask at ``density`` keeps (the rule of ``global_topk``)."""
    return max(1, int(round(density * total)))


def _prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in prunable_names(model)}


def erk_probabilities(shapes: dict[str, torch.Size], density: float) -> dict[str, float]:
    """ERK layer densities before rounding to counts (Evci et al. 2020, RigL ``sparse_utils``):
    p_l = eps * sum(dims)/prod(dims), eps chosen so that sum_l p_l n_l = density * N; layers that would exceed 1
    become dense and eps is solved again over the rest. ``erk_counts`` rounds them to exact counts."""
    total = sum(math.prod(s) for s in shapes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(math.prod(shapes[n]) for n in dense)
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items() if n not in dense}
        denom = sum(raw[n] * math.prod(shapes[n]) for n in raw)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in raw if eps * raw[n] > 1.0]
        if not over:
            out = {n: 1.0 for n in dense}
            out.update({n: eps * r for n, r in raw.items()})
            return {n: out[n] for n in shapes}
        dense.update(over)


def erk_counts(model: nn.Module, density: float) -> dict[str, int]:
    """Exact kept count per prunable layer under ERK, summing to ``keep_count(N, density)``.

    Floors of p_l * n_l are topped up by largest remainder (ties by layer order); no layer gets
    more than n_l or fewer than 1.
    """
    shapes = {n: p.shape for n, p in _prunable(model).items()}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    target = keep_count(sum(sizes.values()), density)
    probs = erk_probabilities(shapes, density)
    ideal = {n: min(probs[n], 1.0) * sizes[n] for n in shapes}
    counts = {n: min(sizes[n], max(1, math.floor(v))) for n, v in ideal.items()}
    diff = target - sum(counts.values())
    order = sorted(shapes, key=lambda n: -(ideal[n] - math.floor(ideal[n])))
    while diff != 0:
        moved = False
        for n in order:
            if diff > 0 and counts[n] < sizes[n]:
                counts[n] += 1
                diff -= 1
                moved = True
            elif diff < 0 and counts[n] > 1:
                counts[n] -= 1
                diff += 1
                moved = True
            if diff == 0:
                break
        if not moved:
            break
    return counts


BUDGETS = ("erk", "equal")


def equal_counts(sizes: dict[str, int], total: int) -> dict[str, int]:
    """``total`` kept weights spread evenly over the layers, none above its size (water-filling; the remainder goes
    to the smallest layers first)."""
    counts, left, open_ = dict.fromkeys(sizes, 0), total, sorted(sizes, key=lambda n: sizes[n])
    while open_ and left > 0:
        share = left // len(open_)
        if sizes[open_[0]] <= share:  # the smallest layer fills up; the others share what is left
            counts[open_[0]] = sizes[open_[0]]
            left -= sizes[open_.pop(0)]
            continue
        for i, n in enumerate(open_):
            counts[n] = share + (1 if i < left - share * len(open_) else 0)
        left = 0
    return counts


def layer_counts(model: nn.Module, density: float, budget: str = "erk") -> dict[str, int]:
    """Kept weights per prunable layer, summing to ``keep_count(N, density)``: ``erk`` (``erk_counts``, every
    paper's setting) or ``equal`` (the same count in every layer; at 1 % it trains far better than ERK on
    LeNet-5, docs/training.md and bench/results/layer_allocation.md)."""
    if budget == "erk":
        return erk_counts(model, density)
    if budget == "equal":
        sizes = {n: p.numel() for n, p in _prunable(model).items()}
        return equal_counts(sizes, keep_count(sum(sizes.values()), density))
    raise ToolchainError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r} (e.g. --budget equal)")


def erk_densities(model: nn.Module, density: float) -> dict[str, float]:
    """ERK per-layer densities, realised exactly: ``erk_counts / n_l`` (global density = ``keep_count/N``)."""
    sizes = {n: p.numel() for n, p in _prunable(model).items()}
    return {n: c / sizes[n] for n, c in erk_counts(model, density).items()}


def random_masks(model: nn.Module, density: float, generator: torch.Generator, bernoulli: bool = False,
                 budget: str = "erk") -> Masks:
    """Random mask: exactly ``layer_counts(model, density, budget)`` uniformly random positions per layer (ERK
    by default). ``bernoulli=True`` keeps each weight independently with its layer's probability (FedMef's [AUTH]
    ``erdos-renyi-kernel`` init with ERK; the count is then only right in expectation).
    """
    params = _prunable(model)
    out: Masks = {}
    if bernoulli:  # each weight kept with its layer's probability: ERK's, or the equal budget's count / size
        probs = (erk_probabilities({n: p.shape for n, p in params.items()}, density) if budget == "erk" else
                 {n: c / params[n].numel() for n, c in layer_counts(model, density, budget).items()})
        for n, p in params.items():
            out[n] = torch.rand(p.shape, generator=generator) < min(probs[n], 1.0)
        return out
    return random_masks_with_counts(model, layer_counts(model, density, budget), generator)


def random_masks_with_counts(model: nn.Module, counts: dict[str, int], generator: torch.Generator) -> Masks:
    """``counts[name]`` uniformly random positions in each named prunable tensor (drawn in ``counts``' order)."""
    params = _prunable(model)
    out: Masks = {}
    for n, k in counts.items():
        p = params[n]
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=generator)[:k]] = True
        out[n] = flat.view(p.shape)
    return out


def topk_masks(scores: dict[str, torch.Tensor], density: float, scope: str = "global") -> Masks:
    """Keep the largest scores: globally (exact ``keep_count``) or per layer (``scope="local"``)."""
    if scope == "global":
        return global_topk(scores, density)
    if scope == "local":
        return {n: global_topk({n: s}, density)[n] for n, s in scores.items()}
    raise ToolchainError(f"scope must be 'global' or 'local' (magnitude masks also take a budget: "
                         f"{', '.join(BUDGETS)}), got {scope!r}")


def layer_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping exactly ``k`` largest entries of ``score`` (stable tie-break by position)."""
    flat = score.detach().flatten().float()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return keep.view(score.shape)


def magnitude_masks(model: nn.Module, density: float, scope: str = "global") -> Masks:
    """One-shot magnitude pruning: keep the largest |theta|.

    ``scope="erk"`` keeps, in every layer, its ERK count (``erk_counts``) of largest |theta| ([LIB]'s
    ``ERK_magnitude``). On an *untrained* network a global ranking compares init scales, not importance:
    PyTorch's init has std ~ 1/sqrt(fan_in), so LeNet-5's 400-input fc1 loses every weight at 5 % and the
    network is cut in two (measured: fc1 kept 0 of 48000)."""
    scores = {n: p.detach().abs() for n, p in _prunable(model).items()}
    if scope in BUDGETS:  # per-layer counts from that budget (``equal``: the same in every layer)
        return {n: layer_topk(scores[n], k) for n, k in layer_counts(model, density, scope).items()}
    return topk_masks(scores, density, scope)


def snip_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, density: float, scope: str = "global") -> Masks:
    """SNIP (Lee et al. 2019): score |dL/dtheta * theta| from one batch (model in train mode, as in
    Synaptic-Flow's ``SNIP``), keep the largest. Gradients are taken on a copy; ``model`` is untouched."""
    net = copy.deepcopy(model)
    net.train()
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    scores = {n: (p.grad.detach() * p.detach()).abs() for n, p in _prunable(net).items()}
    return topk_masks(scores, density, scope)


def synflow_masks(model: nn.Module, in_shape: tuple[int, int, int], density: float, iterations: int = 100,
                  scope: str = "global") -> Masks:
    """SynFlow (Tanaka et al. 2020), data-free and iterative.

    ``in_shape`` is the HWC image shape (as given to ``build_model`` / stored in ``model.arch``). On a
    float64 copy with |theta| and BN in eval mode, R = sum(f(1)); score = |dR/dtheta * theta|. Over
    ``iterations`` rounds the density follows the exponential schedule density**(k/iterations), each
    round re-scoring the masked network, as in the Synaptic-Flow reference code.
    """
    net = copy.deepcopy(model).double()
    net.eval()  # BN uses running stats (identity at init), as in Synaptic-Flow
    params = _prunable(net)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    h, w, c = in_shape
    ones = torch.ones(1, c, h, w, dtype=torch.float64)
    masks: Masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    original = {n: p.detach().clone() for n, p in params.items()}
    for k in range(1, iterations + 1):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n] * masks[n])
        net.zero_grad(set_to_none=True)
        torch.sum(net(ones)).backward()
        scores = {n: (p.grad.detach() * p.detach()).abs() for n, p in params.items()}
        # Already-pruned entries must stay pruned: their score is 0 but ties could pick them.
        scores = {n: torch.where(masks[n], s, torch.full_like(s, -1.0)) for n, s in scores.items()}
        masks = topk_masks(scores, density ** (k / iterations), scope)
    return masks
