"""Federated dynamic prune/grow machinery (RigL-style, as in FedTiny and FedMef), reusable.

Round-based schedule (algorithms.md §0.3, §1.7.5): adjustments happen in rounds t with
``t % delta == 0`` and ``t < t_end``; the adjustment rate is

    alpha_t = (alpha / 2) * (1 + cos(pi * t / t_end))          (0 from t_end on)

``t_end`` is exclusive, as in RigL: alpha_t is 0 at t = t_end, so a round t_end "adjustment" would swap
nothing yet still cost the devices a dense gradient and a top-K upload (issue 14). With the authors'
delta = 10 and t_end = 100 the adjustments are rounds 10..90, the same masks as before.

and layer l swaps ``k_l = ceil(alpha_t * nnz_l)`` connections (capped so it never exceeds the active
or the inactive count of the layer).

One adjustment, split over the two sides:

- server, ``round_config``: sends ``{"adjust": {layer: k_l}}`` for the layers adjusted this round
  (JSON in the instruction, so it is byte-accounted);
- client, :func:`topk_inactive_gradients`: from the dense gradient of the *last local mini-batch*
  (``local_train(keep_last_grads=True)``) keep, per layer, the ``k_l`` largest |g| at currently pruned
  positions; upload them sparse in ``TrainRes.extras`` (index + value, byte-accounted by the codec);
- server, :func:`aggregate_sparse_gradients`: g = sum_k (n_k / sum_j n_j) g_k, entries a client did not
  send count as 0 (FedTiny "Eq. (8)" per [3P]; FedMef's code);
- server, :func:`prune_and_grow`: after FedAvg, per layer prune the ``k_l`` active weights with smallest
  |theta|, grow the ``k_l`` positions with largest |g| among those inactive *before* the adjustment
  (where gradients were reported), set grown weights to exactly 0; the layer's nnz is unchanged.
  :meth:`DynamicPruning.set_masks` then bumps the mask version, so the new mask travels next round.

:class:`DynamicPruning` wires this into a :class:`~toolchain.learning.fl.strategy.Strategy`; subclasses choose
the initial mask (``initial_masks``) and which layers an adjustment touches (``adjust_layers``).
Options (``--algo-opt``): ``delta`` (default 10), ``t_end`` (100), ``alpha`` (0.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from toolchain.learning.fl.local import local_train
from toolchain.learning.fl.masks import Masks, apply_masks
from toolchain.learning.fl.messages import TrainIns, TrainRes
from toolchain.learning.fl.strategy import ClientData, Strategy, float_state

SparseVec = tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]
F32 = 4


def cosine_rate(alpha: float, t: int, t_end: int) -> float:
    """alpha_t = (alpha/2)(1 + cos(pi t / t_end)) for t <= t_end, else 0."""
    if t > t_end or t_end <= 0:
        return 0.0
    return 0.5 * alpha * (1.0 + math.cos(math.pi * t / t_end))


def is_adjust_round(t: int, delta: int, t_end: int) -> bool:
    return delta > 0 and t % delta == 0 and t < t_end


def swap_counts(masks: Masks, names: list[str], rate: float) -> dict[str, int]:
    """k_l = ceil(rate * nnz_l), capped at min(nnz_l, n_l - nnz_l) so prune and grow both fit."""
    out = {}
    for n in names:
        nnz = int(masks[n].sum())
        k = math.ceil(rate * nnz) if rate > 0 else 0
        out[n] = max(0, min(k, nnz, masks[n].numel() - nnz))
    return out


def index_bytes(numel: int) -> int:
    """Index width the wire codec uses for a tensor of ``numel`` entries."""
    return 2 if numel <= 65536 else 4


def topk_buffer_bytes(counts: dict[str, int], masks: Masks) -> int:
    """Device bytes of the top-K gradient buffer: value (f32) + index per kept entry."""
    return sum(k * (F32 + index_bytes(masks[n].numel())) for n, k in counts.items())


def topk_inactive_gradients(grads: dict[str, torch.Tensor], masks: Masks, counts: dict[str, int]) -> dict[str, SparseVec]:
    """Client side: per layer, the ``k_l`` largest |g| at currently pruned positions, as (flat idx, values, shape).

    Ties are broken by position (stable sort) so server and tests can reproduce the choice.
    """
    out: dict[str, SparseVec] = {}
    for n, k in counts.items():
        if k <= 0:
            continue
        g = grads[n].detach().flatten()
        inactive = ~masks[n].flatten()
        score = torch.where(inactive, g.abs(), torch.full_like(g, -1.0))
        idx = torch.argsort(score, descending=True, stable=True)[:k]
        idx = idx[inactive[idx]]  # never report an active position
        idx, _ = torch.sort(idx)
        out[n] = (idx, g[idx].clone(), tuple(grads[n].shape))
    return out


def aggregate_sparse_gradients(results: list[TrainRes], masks: Masks, weighted: bool = True) -> dict[str, torch.Tensor]:
    """Server side: sum_k w_k g_k over the sparse uploads, missing entries = 0.

    ``weighted`` (default): w_k = n_k / sum_j n_j; otherwise the unweighted mean of [AUTH] FedTiny.
    """
    total = sum(r.num_examples for r in results)
    out: dict[str, torch.Tensor] = {}
    for r in results:
        w = (r.num_examples / total) if weighted else 1.0 / len(results)
        for n, (idx, val, _shape) in r.extras.items():
            if n not in masks:
                continue
            acc = out.setdefault(n, torch.zeros(masks[n].numel(), dtype=torch.float32))
            acc.index_add_(0, idx.long(), val.float() * w)
    return {n: v.view(masks[n].shape) for n, v in out.items()}


@torch.no_grad()
def prune_and_grow(params: dict[str, torch.Tensor], masks: Masks, grads: dict[str, torch.Tensor],
                   counts: dict[str, int]) -> tuple[Masks, dict[str, torch.Tensor]]:
    """Server side: prune ``k_l`` smallest |theta| among active, grow ``k_l`` largest |g| among inactive.

    Returns (new masks, grown-position masks). Layers not in ``counts`` are copied unchanged. Grown
    weights are set to exactly 0 in ``params`` (they already are, being pruned; this makes it explicit
    and safe against weights that drifted under the mask).
    """
    new: Masks = {n: m.clone() for n, m in masks.items()}
    grown_all: dict[str, torch.Tensor] = {}
    for n, k in counts.items():
        if k <= 0:
            continue
        m = masks[n].flatten()
        w = params[n].detach().flatten().abs()
        g = grads.get(n, torch.zeros(m.numel())).flatten().abs()
        # prune: smallest |theta| among active (stable: lower index first on ties)
        prune_score = torch.where(m, w, torch.full_like(w, math.inf))
        drop = torch.argsort(prune_score, stable=True)[:k]
        # grow: largest |g| among positions inactive before this adjustment
        grow_score = torch.where(~m, g, torch.full_like(g, -1.0))
        grow = torch.argsort(grow_score, descending=True, stable=True)[:k]
        nm = m.clone()
        nm[drop] = False
        nm[grow] = True
        new[n] = nm.view(masks[n].shape)
        grown = torch.zeros_like(m)
        grown[grow] = True
        grown_all[n] = grown.view(masks[n].shape)
        params[n].view(-1)[grow] = 0.0
    return new, grown_all


class DynamicPruning(Strategy):
    """Sparse FedAvg with periodic server-side prune/grow from client top-K gradients.

    Subclasses override :meth:`initial_masks` and, to restrict adjustments, :meth:`adjust_layers`.
    """

    name = "dynamic"
    default_options: dict[str, Any] = {"delta": 10, "t_end": 100, "alpha": 0.1, "weighted_grads": 1}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.opts: dict[str, Any] = {**self.default_options, **cfg.algo_options}
        self._round_counts: dict[int, dict[str, int]] = {}
        self.adjustments = 0  # adjustments done so far (j in FedTiny's block counter)

    # ---- schedule ------------------------------------------------------------------------------
    def opt(self, key: str) -> Any:
        return self.opts[key]

    def adjust_layers(self, rnd: int) -> list[str]:
        """Layers the adjustment of round ``rnd`` touches (all masked layers by default)."""
        return list(self.masks)

    def round_counts(self, rnd: int) -> dict[str, int]:
        """k_l for round ``rnd`` (empty when it is not an adjustment round); computed once per round."""
        if rnd not in self._round_counts:
            delta, t_end = int(self.opt("delta")), int(self.opt("t_end"))
            if is_adjust_round(rnd, delta, t_end):
                rate = cosine_rate(float(self.opt("alpha")), rnd, t_end)
                self._round_counts[rnd] = swap_counts(self.masks, self.adjust_layers(rnd), rate)
            else:
                self._round_counts[rnd] = {}
        return self._round_counts[rnd]

    # ---- server ----------------------------------------------------------------------------------
    def round_config(self, rnd: int) -> dict[str, Any]:
        config = super().round_config(rnd)
        counts = {n: k for n, k in self.round_counts(rnd).items() if k > 0}
        if counts:
            config["adjust"] = counts
        return config

    def after_aggregate(self, rnd: int, results: list[TrainRes]) -> dict[str, float] | None:
        counts = {n: k for n, k in self.round_counts(rnd).items() if k > 0}
        if not counts:
            return None
        grads = aggregate_sparse_gradients(results, self.masks, bool(int(self.opt("weighted_grads"))))
        params = dict(self.model.named_parameters())
        new, grown = prune_and_grow(params, self.masks, grads, counts)
        self.set_masks(new)
        self.adjustments += 1
        self.last_grown = grown
        return {"swapped": float(sum(counts.values()))}

    def extra_device_bytes(self, rnd: int) -> int:
        return topk_buffer_bytes(self.round_counts(rnd), self.masks)

    def dense_gradient_layers(self, rnd: int) -> list[str]:
        # the top-K of inactive gradients comes from the adjusted layers' dense gradient (last mini-batch)
        return [n for n, k in self.round_counts(rnd).items() if k > 0]

    # ---- client ----------------------------------------------------------------------------------
    def local_step(self, ins: TrainIns, data: ClientData, model: nn.Module, generator: torch.Generator,
                   keep_last_grads: bool):
        """Masked local training; subclasses can add a regulariser or a learning-rate schedule here."""
        return local_train(model, ins.masks, data.x, data.y, self.cfg, ins.config["lr"], generator,
                           keep_last_grads=keep_last_grads)

    def client_train(self, ins: TrainIns, data: ClientData, model: nn.Module, generator: torch.Generator) -> TrainRes:
        model.load_state_dict(ins.weights, strict=False)
        apply_masks(model, ins.masks)
        counts = {n: int(k) for n, k in ins.config.get("adjust", {}).items()}
        res = self.local_step(ins, data, model, generator, keep_last_grads=bool(counts))
        extras = topk_inactive_gradients(res.last_grads, ins.masks, counts) if counts else {}
        return TrainRes(data.cid, float_state(model), len(data.y), {"loss": res.loss}, extras)
