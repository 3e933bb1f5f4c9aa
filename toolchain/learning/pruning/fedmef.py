"""FedMef: memory-efficient federated dynamic pruning (Huang et al., CVPR 2024; algorithms.md §2).

Built on :class:`toolchain.learning.pruning.dynamic.DynamicPruning` (cosine adjustment rate, per-layer ``k_l``,
client top-k inactive gradients uploaded sparse, n-weighted aggregation, magnitude prune + gradient
grow with grown weights = 0, mask broadcast) and adds:

* **BN-free model**: conv+BN pairs become NSConv (``toolchain/models/nsconv.py``), statistics over the unpruned
  entries (``nsconv_stats=active``, default) or all entries (``all``, the authors' active code path).
* **Random ERK initial mask** (``toolchain.learning.pruning.scores.random_masks``; exact per-layer counts by
  default, ``init=erk_bernoulli`` for the authors' independent draws).
* **SAP** (``toolchain/learning/fl/sap.py``) on every conv/linear layer of the client model, gamma 0.7 by default.
* **Budget-aware extrusion (BaE)** in the ``bae_rounds`` rounds that end with each adjustment round (the
  *window*). At the start of a window the server marks, per layer, the ``k_l`` lowest-|theta| *active*
  weights of the global model (``k_l`` = the swap count of the coming adjustment) and sends their
  indices in every window round (in the JSON config, so the bytes are counted). Marks stay fixed for
  the window (``marks=round`` recomputes them each round instead). Clients minimise
  ``CE + lambda * ||theta_low||_2^2`` with the learning rate
  ``max(eta_s, p(s) * (2 sigmoid(||theta_low||_2) - 1) * eta_0)``, ``p(s) = (2S - 2s) / (2S - s)``.
  The budget S counts local steps over the whole window: ``S = bae_rounds * steps_per_round`` and
  ``s = (rounds into the window) * steps_per_round + local step``, so p decays 1 -> 0 across the window.
* At the adjustment the server prunes the ``k_l`` lowest |theta| (``prune=magnitude``, default; the
  marked weights, which BaE drove to ~0) or exactly the marked ones (``prune=marked``), grows by
  aggregated gradient at 0, and always broadcasts the new mask (the authors' code skipped that).

Every option, its default and the authors' value are listed in ``docs/fedmef.md``.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.fl.local import LocalResult, local_train
from toolchain.learning.fl.messages import TrainIns, TrainRes
from toolchain.learning.fl.sap import DEFAULT_GAMMA, enable_sap
from toolchain.learning.fl.strategy import ClientData, ServerContext
from toolchain.learning.pruning.dynamic import (
    DynamicPruning,
    aggregate_sparse_gradients,
    index_bytes,
    is_adjust_round,
    prune_and_grow,
)
from toolchain.learning.pruning.scores import random_masks
from toolchain.models.nsconv import convert_to_nsconv, has_nsconv

NSCONV_ARCHS = ("resnet8", "resnet18", "mobilenetv2")


def rex_budget(s: int, total: int) -> float:
    """p(s) = (2S - 2s) / (2S - s): 1 at s = 0, 0 at s = S (REX-shaped)."""
    if total <= 0:
        return 0.0
    s = min(max(s, 0), total)
    return (2.0 * total - 2.0 * s) / (2.0 * total - s)


def bae_lr(eta_s: float, eta_0: float, s: int, total: int, low_norm: float) -> float:
    """Budget-aware learning rate: max(eta_s, p(s) * (2 sigmoid(||theta_low||) - 1) * eta_0)."""
    beta = rex_budget(s, total) * (2.0 / (1.0 + math.exp(-low_norm)) - 1.0) * eta_0
    return max(eta_s, beta)


def encode_indices(idx: torch.Tensor, numel: int) -> str:
    """Flat indices as base64 of little-endian u16/u32 (the codec's index width), for the JSON config."""
    dtype = np.dtype("<u2") if index_bytes(numel) == 2 else np.dtype("<u4")
    return base64.b64encode(idx.cpu().numpy().astype(dtype).tobytes()).decode()


def decode_indices(text: str, numel: int) -> torch.Tensor:
    dtype = np.dtype("<u2") if index_bytes(numel) == 2 else np.dtype("<u4")
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=dtype).astype(np.int64))


@torch.no_grad()
def lowest_active(param: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` smallest-|theta| *active* entries (pruned zeros never count; the public
    library's search over all entries marks only already-pruned weights at low density)."""
    score = torch.where(mask.flatten(), param.detach().flatten().abs(), torch.full((mask.numel(),), math.inf))
    k = min(k, int(mask.sum()))
    return torch.sort(torch.argsort(score, stable=True)[:k]).values


class FedMef(DynamicPruning):
    name = "fedmef"
    default_options: dict[str, Any] = {
        # dynamic-pruning schedule ([AUTH] values; DynamicPruning reads delta/t_end/alpha/weighted_grads)
        "delta": 10, "t_end": 300, "alpha": 0.3, "weighted_grads": 1,
        # BaE
        "bae": 1, "bae_rounds": None, "lam": 0.01, "lam_mode": "fixed", "lam_step": 1e-4, "penalty": "sq",
        "lr_norm": "l2", "bae_lr": 1, "max_lr": None, "marks": "window", "prune": "magnitude",
        # model / init / SAP
        "init": "erk", "budget": "erk", "nsconv": 1, "nsconv_stats": "active", "nsconv_init": "nf", "sap": 1, "gamma": DEFAULT_GAMMA,
        "sap_fp16": 1, "relu_bits": 1,
        # optional per-round exponential lr decay to min_lr over all rounds ([AUTH]); off = engine schedule
        "min_lr": None,
    }

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        unknown = set(cfg.algo_options) - set(self.default_options)
        if unknown:

            raise ToolchainError(f"unknown fedmef option(s) {sorted(unknown)}; known: {', '.join(self.default_options)}")
        self.marks: dict[str, torch.Tensor] = {}
        self._marks_for: int | None = None  # adjustment round the current marks belong to
        self.norm_at_marking = 0.0
        self.mask_broadcasts: list[int] = []  # rounds after which a new mask was broadcast

    # ---- schedule ------------------------------------------------------------------------------
    def bae_rounds(self) -> int:
        v = self.opt("bae_rounds")
        return int(self.opt("delta")) if v is None else min(int(v), int(self.opt("delta")))

    def window_target(self, rnd: int) -> int | None:
        """The adjustment round whose BaE window contains ``rnd`` (None outside every window)."""
        delta, t_end = int(self.opt("delta")), int(self.opt("t_end"))
        w = min(self.bae_rounds(), delta)  # windows never overlap
        if delta <= 0 or w <= 0:
            return None
        target = math.ceil(rnd / delta) * delta
        # An adjustment after the last round never happens: extruding weights for it only starves the final
        # model (a 5-round run spent all 5 rounds squeezing 30 % of its weights toward 0: 54.8 % at 1 %).
        if target > self.cfg.rounds:
            return None
        if is_adjust_round(target, delta, t_end) and target - w < rnd <= target:
            return target
        return None

    # ---- server ----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: ServerContext) -> None:
        if int(self.opt("nsconv")) and not has_nsconv(model):
            # in place: the simulator copies this model
            convert_to_nsconv(model, str(self.opt("nsconv_stats")), str(self.opt("nsconv_init")))
            arch = getattr(model, "arch", None)
            if arch and arch.get("name") in NSCONV_ARCHS:
                arch["kwargs"] = {**arch.get("kwargs", {}), "norm": "nsconv", "nsconv_stats": self.opt("nsconv_stats")}
        if int(self.opt("sap")):
            enable_sap(model, float(self.opt("gamma")), bool(int(self.opt("sap_fp16"))), bool(int(self.opt("relu_bits"))))
        self._init_gen = torch.Generator().manual_seed(int(ctx.rng.integers(2**31)))
        super().setup(model, ctx)

    def initial_masks(self, model: nn.Module, ctx: ServerContext):
        init = str(self.opt("init"))
        if init not in ("erk", "erk_bernoulli"):

            raise ToolchainError(f"fedmef init must be 'erk' or 'erk_bernoulli', got '{init}'")
        return random_masks(model, self.cfg.density, self._init_gen, bernoulli=init == "erk_bernoulli",
                            budget=str(self.opt("budget")))

    def set_masks(self, masks) -> None:
        super().set_masks(masks)
        self.mask_broadcasts.append(getattr(self, "_current_round", 0))

    def _refresh_marks(self, rnd: int, target: int) -> None:
        fixed = str(self.opt("marks")) == "window"
        if fixed and self._marks_for == target:
            return
        counts = {n: k for n, k in self.round_counts(target).items() if k > 0}
        params = dict(self.model.named_parameters())
        self.marks = {n: lowest_active(params[n], self.masks[n], k) for n, k in counts.items()}
        self._marks_for = target
        self.norm_at_marking = self.marked_norm()

    def round_config(self, rnd: int) -> dict[str, Any]:
        self._current_round = rnd
        config = super().round_config(rnd)
        min_lr = self.opt("min_lr")
        if min_lr is not None and self.cfg.rounds > 1:
            config["lr"] = self.cfg.lr * (float(min_lr) / self.cfg.lr) ** ((rnd - 1) / (self.cfg.rounds - 1))
        target = self.window_target(rnd)
        if target is not None:
            self._refresh_marks(rnd, target)  # also without BaE, to report the marked norm (ablation)
            if self.marks and int(self.opt("bae")):
                w = self.bae_rounds()
                config["bae"] = {
                    "pos": rnd - (target - w) - 1, "rounds": w,  # rounds into the window, window length
                    "marks": {n: encode_indices(i, self.masks[n].numel()) for n, i in self.marks.items()},
                }
        return config

    def marked_norm(self) -> float:
        params = dict(self.model.named_parameters())
        sq = sum(float(params[n].detach().flatten()[i].pow(2).sum()) for n, i in self.marks.items())
        return math.sqrt(sq)

    def after_aggregate(self, rnd: int, results: list[TrainRes]) -> dict[str, float] | None:
        metrics: dict[str, float] = {}
        if self.window_target(rnd) is not None and self.marks:
            metrics["marked_norm_at_marking"] = self.norm_at_marking  # of the global model when marked
            metrics["marked_norm"] = self.marked_norm()  # ||theta_low|| of the aggregated model
        counts = {n: k for n, k in self.round_counts(rnd).items() if k > 0}
        if counts and str(self.opt("prune")) == "marked" and self._marks_for == rnd:
            metrics.update(self._adjust_marked(results, counts))
        else:
            metrics.update(super().after_aggregate(rnd, results) or {})
        if counts:
            self.marks, self._marks_for = {}, None
        return metrics

    def _adjust_marked(self, results: list[TrainRes], counts: dict[str, int]) -> dict[str, float]:
        """Prune exactly the marked weights: reuse prune_and_grow on a surrogate |theta| where the marked
        entries score lowest, then zero the grown weights in the real model."""

        grads = aggregate_sparse_gradients(results, self.masks, bool(int(self.opt("weighted_grads"))))
        params = dict(self.model.named_parameters())
        surrogate = {}
        for n in self.masks:
            s = params[n].detach().abs().clone()
            if n in self.marks:
                s.view(-1)[self.marks[n]] = -1.0
            surrogate[n] = s
        new, grown = prune_and_grow(surrogate, self.masks, grads, counts)
        with torch.no_grad():
            for n, g in grown.items():
                params[n].masked_fill_(g, 0.0)
        self.set_masks(new)
        self.adjustments += 1
        self.last_grown = grown
        return {"swapped": float(sum(counts.values()))}

    def extra_device_bytes(self, rnd: int) -> int:
        marks = 0
        if self.window_target(rnd) is not None and int(self.opt("bae")):
            marks = sum(int(i.numel()) * index_bytes(self.masks[n].numel()) for n, i in self.marks.items())
        return super().extra_device_bytes(rnd) + marks

    # ---- client ----------------------------------------------------------------------------------
    def local_step(self, ins: TrainIns, data: ClientData, model: nn.Module, generator: torch.Generator,
                   keep_last_grads: bool) -> LocalResult:
        bae = ins.config.get("bae")
        lr = float(ins.config["lr"])
        if not bae:
            return local_train(model, ins.masks, data.x, data.y, self.cfg, lr, generator,
                               keep_last_grads=keep_last_grads)
        params = dict(model.named_parameters())
        marks = {n: decode_indices(t, params[n].numel()) for n, t in bae["marks"].items()}
        pos, window = int(bae["pos"]), int(bae["rounds"])
        lam_mode, lam_max, lam_step = str(self.opt("lam_mode")), float(self.opt("lam")), float(self.opt("lam_step"))
        squared = str(self.opt("penalty")) == "sq"
        state = {"lam": 0.0}

        def low(n: str) -> torch.Tensor:
            return params[n].view(-1)[marks[n]]

        def penalty(_model: nn.Module) -> torch.Tensor:
            sq = sum(low(n).pow(2).sum() for n in marks)
            if lam_mode == "ramp":  # [AUTH]: lambda += step per local step, capped, reset every round
                state["lam"] = min(state["lam"] + lam_step, lam_max)
                lam = state["lam"]
            else:
                lam = lam_max
            return lam * (sq if squared else torch.sqrt(sq + 1e-12))

        eta_0, l1 = float(self.cfg.lr), str(self.opt("lr_norm")) == "l1"
        max_lr = self.opt("max_lr")

        def lr_fn(step: int, total: int) -> float:
            with torch.no_grad():
                norm = (sum(float(low(n).abs().sum()) for n in marks) if l1
                        else math.sqrt(sum(float(low(n).pow(2).sum()) for n in marks)))
            out = bae_lr(lr, eta_0, pos * total + step, window * total, norm)
            return min(out, float(max_lr)) if max_lr is not None else out

        return local_train(model, ins.masks, data.x, data.y, self.cfg, lr, generator,
                           keep_last_grads=keep_last_grads, extra_loss=penalty,
                           lr_fn=lr_fn if int(self.opt("bae_lr")) else None)
