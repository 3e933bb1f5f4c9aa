"""FedTiny (Huang et al., ICDCS 2023, arXiv 2212.01977): adaptive BN selection + progressive pruning.

Follows ``/work/shared/docs/algorithms.md`` §1 (mechanics from the authors' code [AUTH]); the full
description, every flag and the authors' preset are in ``docs/fedtiny.md``.

Stage 1, adaptive batch-normalisation selection (ABNS), runs in **round 1** before training, with
the clients sampled for round 1, as two setup exchanges (``Strategy.setup_steps``), both byte-accounted
in round 1's traffic:

- step 0: server -> device: dense theta0 and, per candidate, its per-layer kept counts (a candidate
  mask is layer-wise magnitude of theta0, so the counts determine it exactly on both sides);
  device: for each candidate, ``bn_passes`` forward passes (BN in train mode, no gradients) over its
  local validation split V_k (random ``val_ratio`` of its data) -> upload BN running mean/var;
- server: |V_k|-weighted average of the statistics per candidate;
- step 1: server -> device: aggregated statistics; device: summed cross-entropy of every candidate
  on V_k (eval mode, aggregated statistics) -> upload; server: c* = argmin_c sum_k l_kc / sum_k |V_k|
  (minimum average *loss*), model <- theta0 * m^{c*} with the aggregated BN statistics of c*.

Stage 2, progressive block-wise pruning: :class:`~toolchain.learning.pruning.dynamic.DynamicPruning` restricted
to one block per adjustment round, block b_j = B-1-(j mod B) for the j-th adjustment (j = t/delta - 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.fl.masks import Masks, apply_masks, dense_masks, prunable_names
from toolchain.learning.fl.memory import MemoryReport, measure_forward_peak_bytes
from toolchain.learning.fl.messages import TrainIns, TrainRes
from toolchain.learning.fl.sparse_init import rescale_kept
from toolchain.learning.fl.strategy import ClientData, ServerContext, float_state
from toolchain.learning.pruning.baselines import server_pretrain
from toolchain.learning.pruning.blocks import block_for_adjustment, model_blocks
from toolchain.learning.pruning.dynamic import F32, DynamicPruning
from toolchain.learning.pruning.scores import equal_counts, erk_probabilities, keep_count, layer_topk

# Authors' code ([AUTH] fedlottery ``main_fedavg.py``) defaults that are algorithm options. Run-level
# settings of that code (Adam amsgrad lr 1e-3 wd 1e-4, 5 local epochs, batch 64, Dirichlet 0.5) are
# train flags: see docs/fedtiny.md.
AUTHORS_PRESET: dict[str, Any] = {
    "num_candidates": 1, "pretrain": 1, "pretrain_epochs": 3, "n_shots": 5, "weighted_grads": 0,
    "exact_count": 0, "delta": 10, "t_end": 100, "alpha": 0.1, "granularity": "block",
    "dense_first_conv": 1, "candidate_base": "uniform", "sparse_init": "none",
}


def candidate_mask(theta0: dict[str, torch.Tensor], counts: dict[str, int], names: list[str]) -> Masks:
    """Layer-wise magnitude mask of ``theta0``: layer l keeps its ``counts[l]`` largest |theta0|; layers
    without a count stay dense. Deterministic (stable ties), so server and device derive the same mask."""
    out: Masks = {}
    for n in names:
        w = theta0[n]
        out[n] = layer_topk(w.abs(), counts[n]) if n in counts else torch.ones_like(w, dtype=torch.bool)
    return out


def bn_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class FedTiny(DynamicPruning):
    name = "fedtiny"
    default_options: dict[str, Any] = {
        **DynamicPruning.default_options,
        "num_candidates": 5, "val_ratio": 0.1, "bn_passes": 10, "density_tol": 0.02, "max_draws": 10000,
        # Defaults chosen for tiny models (docs/fedtiny.md "Defaults"): the first conv is pruned like the rest
        # (dense, its 432 weights took 56 % of ResNet-8's budget at 1 %), and candidates centre on ERK layer
        # densities (uniform densities left LeNet-5's classifier 42 weights at 5 %: 90.6 % vs 94.4 % for ERK).
        "dense_first_conv": 0, "exact_count": 1, "pretrain": 0, "pretrain_epochs": 3, "pretrain_lr": 1e-3,
        "n_shots": 5, "granularity": "block", "candidate_base": "erk",
    }

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        opts = dict(cfg.algo_options)
        if opts.pop("preset", None) == "authors":
            self.opts = {**self.default_options, **AUTHORS_PRESET, **opts}
        # device-side memory between the two ABNS steps: (theta0, candidate masks) per device
        self._device_store: dict[int, tuple[dict[str, torch.Tensor], list[Masks]]] = {}
        self.abns_done = False
        self.abns_result: dict[str, Any] = {}

    # ---- server: theta0 and the candidate pool -----------------------------------------------------
    def initial_masks(self, model: nn.Module, ctx: ServerContext) -> Masks:
        if int(self.opt("pretrain")):
            # [AUTH] server pre-training: Adam, ``pretrain_epochs`` over the few-shot server set
            server_pretrain(model, *ctx.extra["fewshot"], int(self.opt("pretrain_epochs")),
                            float(self.opt("pretrain_lr")), self.cfg.batch_size, self.cfg.seed)
        names = prunable_names(model)
        first = names[0]
        first_is_conv = isinstance(model.get_submodule(first.rsplit(".", 1)[0]), nn.Conv2d)
        self.fixed_dense = [first] if int(self.opt("dense_first_conv")) and first_is_conv else []
        self.adjustable = [n for n in names if n not in self.fixed_dense]
        self.blocks = [b for b in ([n for n in blk if n in self.adjustable] for blk in model_blocks(model)) if b]
        self.theta0 = float_state(model)
        self.candidates = self._draw_candidates(model)
        return dense_masks(model)  # until ABNS has picked a candidate in round 1

    def _draw_candidates(self, model: nn.Module) -> list[dict[str, int]]:
        """Per candidate, per adjustable layer, kept counts floor(rho_l * n_l), rho_l = rho'(1 + (u - 0.5)).

        rho' is the density the adjustable layers need so that, with the dense first conv counted, the
        global density is rho. Redraw the whole vector until |rho_act - rho| / rho < density_tol. With
        ``exact_count`` the accepted counts are then nudged by +-1 per layer to hit keep_count(N, rho)
        exactly (so every method is compared at the same nnz).
        """
        params = dict(model.named_parameters())
        sizes = {n: params[n].numel() for n in self.adjustable}
        fixed = sum(params[n].numel() for n in self.fixed_dense)
        total = fixed + sum(sizes.values())
        rho = self.cfg.density
        target = keep_count(total, rho)
        rho_adj = (target - fixed) / sum(sizes.values())
        if rho_adj <= 0:
            raise ToolchainError(f"density {rho} keeps {target} weights, fewer than the dense first conv ({fixed}); "
                                 "raise --density or pass --algo-opt dense_first_conv=0")
        base_name = str(self.opt("candidate_base"))
        if base_name == "uniform":  # [AUTH] noise-uniform-magnitude: every layer around rho'
            base = {n: rho_adj for n in sizes}
        elif base_name == "erk":  # [LIB]-style ERK layer densities as the centre of the noise
            base = erk_probabilities({n: params[n].shape for n in sizes}, rho_adj)
        elif base_name == "equal":  # the same count in every layer (scores.layer_counts' "equal" budget)
            base = {n: c / sizes[n] for n, c in equal_counts(sizes, target - fixed).items()}
        else:
            raise ToolchainError(f"candidate_base must be uniform, erk or equal, got {base_name!r}")
        rng = np.random.default_rng(self.cfg.seed + 104729)
        tol = float(self.opt("density_tol"))
        out = []
        for _ in range(int(self.opt("num_candidates"))):
            for _draw in range(int(self.opt("max_draws"))):
                u = rng.random(len(sizes))
                counts = {n: max(1, min(s, math.floor(base[n] * (1 + (ui - 0.5)) * s)))
                          for (n, s), ui in zip(sizes.items(), u, strict=True)}
                rho_act = (fixed + sum(counts.values())) / total
                if abs(rho_act - rho) / rho < tol:
                    break
            else:
                raise ToolchainError(f"no candidate density vector within {tol:.0%} of {rho} after "
                                     f"{self.opt('max_draws')} draws; raise --algo-opt density_tol")
            if int(self.opt("exact_count")):
                diff = target - fixed - sum(counts.values())
                order = list(rng.permutation(len(sizes)))
                names = list(sizes)
                while diff != 0:
                    for i in order:
                        n = names[i]
                        if diff > 0 and counts[n] < sizes[n]:
                            counts[n] += 1
                            diff -= 1
                        elif diff < 0 and counts[n] > 1:
                            counts[n] -= 1
                            diff += 1
                        if diff == 0:
                            break
            out.append(counts)
        return out

    def candidate_masks(self) -> list[Masks]:
        names = self.fixed_dense + self.adjustable
        return [candidate_mask(self.theta0, c, names) for c in self.candidates]

    # ---- ABNS exchanges (round 1) -------------------------------------------------------------------
    def setup_steps(self, rnd: int) -> int:
        return 2 if (rnd == 1 and not self.abns_done) else 0

    def configure_setup(self, rnd: int, step: int, client_ids: list[int]) -> dict[int, TrainIns]:
        if step == 0:
            config = {"abns": 0, "candidates": self.candidates, "dense": self.fixed_dense}
            payload = self.theta0
        else:
            config = {"abns": 1}
            payload = self._bn_agg_flat
        return {cid: TrainIns(rnd, payload, {}, config, mask_travels=False) for cid in client_ids}

    def _val_split(self, data: ClientData) -> tuple[torch.Tensor, torch.Tensor]:
        """V_k: a fixed random ``val_ratio`` of the device's data (at least one sample)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + data.cid)
        n = max(1, int(round(float(self.opt("val_ratio")) * len(data.y))))
        idx = torch.randperm(len(data.y), generator=gen)[:n]
        return data.x[idx], data.y[idx]

    def client_setup(self, ins: TrainIns, data: ClientData, model: nn.Module, generator: torch.Generator) -> TrainRes:
        vx, vy = self._val_split(data)
        bs = min(self.cfg.batch_size, len(vy))
        if ins.config["abns"] == 0:
            theta0 = ins.weights
            cand_counts: list[dict[str, int]] = ins.config["candidates"]
            names = list(ins.config["dense"]) + list(cand_counts[0])
            cands = [candidate_mask(theta0, c, names) for c in cand_counts]
            self._device_store[data.cid] = (theta0, cands)
            out: dict[str, torch.Tensor] = {}
            for c, mask in enumerate(cands):
                self._start_model(model, theta0, mask)
                model.train()  # BN refreshes its running statistics; momentum as configured (0.1)
                with torch.no_grad():
                    for _ in range(int(self.opt("bn_passes"))):
                        for i in range(0, len(vy), bs):
                            model(vx[i:i + bs])
                for bn_name, bn in bn_modules(model).items():
                    out[f"c{c}/{bn_name}.running_mean"] = bn.running_mean.detach().clone()
                    out[f"c{c}/{bn_name}.running_var"] = bn.running_var.detach().clone()
            return TrainRes(data.cid, out, len(vy), {})
        theta0, cands = self._device_store.pop(data.cid)
        metrics: dict[str, float] = {}
        for c, mask in enumerate(cands):
            self._start_model(model, theta0, mask)
            self._load_bn(model, ins.weights, c)
            model.eval()
            loss, correct = 0.0, 0
            with torch.no_grad():
                for i in range(0, len(vy), bs):
                    logits = model(vx[i:i + bs])
                    loss += float(F.cross_entropy(logits, vy[i:i + bs], reduction="sum"))
                    correct += int((logits.argmax(1) == vy[i:i + bs]).sum())
            metrics[f"loss_c{c}"] = loss
            metrics[f"correct_c{c}"] = correct
        return TrainRes(data.cid, {}, len(vy), metrics)

    def _start_model(self, model: nn.Module, theta0: dict[str, torch.Tensor], mask: Masks) -> None:
        """The model a candidate would start training from: theta0 * m, rescaled as the server will
        (``sparse_init``), so ABNS scores the same network the server then picks."""
        model.load_state_dict(theta0, strict=False)
        apply_masks(model, mask)
        init = str(self.opts.get("sparse_init", "rescale"))
        if init != "none":
            rescale_kept(model, mask, theta0, kaiming=init == "kaiming")

    @staticmethod
    def _load_bn(model: nn.Module, stats: dict[str, torch.Tensor], c: int) -> None:
        with torch.no_grad():
            for bn_name, bn in bn_modules(model).items():
                bn.running_mean.copy_(stats[f"c{c}/{bn_name}.running_mean"])
                bn.running_var.copy_(stats[f"c{c}/{bn_name}.running_var"])

    def aggregate_setup(self, rnd: int, step: int, results: list[TrainRes]) -> dict[str, float]:
        total = sum(r.num_examples for r in results)  # sum_k |V_k|
        if step == 0:
            agg: dict[str, torch.Tensor] = {}
            for r in results:
                for k, v in r.weights.items():
                    agg[k] = agg.get(k, torch.zeros_like(v)) + v * (r.num_examples / total)
            self._bn_agg_flat = agg
            return {}
        n_cand = len(self.candidates)
        avg_loss = [sum(r.metrics[f"loss_c{c}"] for r in results) / total for c in range(n_cand)]
        avg_acc = [sum(r.metrics[f"correct_c{c}"] for r in results) / total for c in range(n_cand)]
        best = int(np.argmin(avg_loss))  # minimum average loss, not accuracy
        self.model.load_state_dict(self.theta0, strict=False)
        self._load_bn(self.model, self._bn_agg_flat, best)
        self.set_masks(self.candidate_masks()[best])
        self.init_sparse_weights(self.theta0)  # theta0 * m, rescaled per unit (sparse_init)
        self.abns_done = True
        self.abns_result = {"selected": best, "avg_loss": avg_loss, "avg_accuracy": avg_acc}
        metrics = {"abns_selected": float(best), "abns_loss": avg_loss[best]}
        metrics.update({f"abns_loss_c{c}": v for c, v in enumerate(avg_loss)})
        return metrics

    def memory_phases(self, rnd: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[MemoryReport]:
        """Round 1 adds the ABNS phase (docs/memory.md): the device holds dense theta0 and a working copy
        (``client_setup`` loads theta0 into the model and masks it per candidate), the candidate masks as
        bitmaps, every candidate's BN statistics, and the activations of a forward pass (no gradients)."""
        phases = super().memory_phases(rnd, model, x, y)
        if rnd == 1 and self.abns_result:
            dense = sum(p.numel() for p in model.parameters()) * F32
            dense += sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())
            c = len(self.candidates)
            bitmaps = c * sum((m.numel() + 7) // 8 for m in self.masks.values())
            bn_stats = c * sum(2 * bn.num_features * F32 for bn in bn_modules(model).values())
            phases.append(MemoryReport(2 * dense, 0, 0, measure_forward_peak_bytes(model, x), bitmaps + bn_stats))
        return phases

    # ---- progressive pruning -----------------------------------------------------------------------
    def adjust_layers(self, rnd: int) -> list[str]:
        gran = str(self.opt("granularity"))
        if gran == "entire":
            return list(self.adjustable)
        units = self.blocks if gran == "block" else [[n] for n in self.adjustable]
        if gran not in ("block", "layer"):
            raise ToolchainError(f"granularity must be block, layer or entire, got {gran!r}")
        j = rnd // int(self.opt("delta")) - 1  # index of this adjustment (explicit counter, cf. [AUTH] bug)
        return units[block_for_adjustment(j, len(units))]
