"""Gradual global magnitude pruning on the server during FedAvg (the build's default algorithm).

After aggregation in round t the server keeps the globally largest |theta| so that density follows
the cubic schedule of Zhu & Gupta (2017):

    d_t = rho + (1 - rho) * (1 - p_t)^3,  p_t = clip((t - t_start) / (t_end - t_start), 0, 1)

The mask reaches the target density ``rho`` exactly at ``t_end`` and stays fixed afterwards, so the
last rounds fine-tune the final sparse model. Options (``algo_options``): ``prune_start`` (round,
default 1), ``prune_end`` (round, default ceil(0.6 * rounds)).
"""

from __future__ import annotations

import math

from toolchain.learning.fl.masks import global_topk
from toolchain.learning.fl.messages import TrainRes
from toolchain.learning.fl.strategy import Strategy


class GradualMagnitude(Strategy):
    name = "gmp"

    def schedule(self, rnd: int) -> float:
        opts = self.cfg.algo_options
        start = int(opts.get("prune_start", 1))
        end = int(opts.get("prune_end", max(start, math.ceil(0.6 * self.cfg.rounds))))
        p = 1.0 if end <= start else min(max((rnd - start) / (end - start), 0.0), 1.0)
        rho = self.cfg.density
        return rho + (1.0 - rho) * (1.0 - p) ** 3

    def after_aggregate(self, rnd: int, results: list[TrainRes]) -> dict[str, float]:
        target = self.schedule(rnd)
        params = dict(self.model.named_parameters())
        current = sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())
        if target < current - 1e-12:
            self.set_masks(global_topk({k: params[k].detach().abs() for k in self.masks}, target))
        return {"target_density": target}
