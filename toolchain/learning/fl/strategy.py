"""The strategy interface, shaped like Flower's ``Strategy`` + ``ClientApp``.

One object holds the server's side (``configure_train`` / ``aggregate_train`` / ``evaluate``) and
the client's side (``client_train``), so the same strategy runs in the in-process simulator and,
through an adapter, on Flower. The base class is dense FedAvg with first-class masks: pruning
algorithms override ``initial_masks``, ``round_config``, ``client_train`` and ``after_aggregate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.fl.local import evaluate, local_train
from toolchain.learning.fl.masks import Masks, apply_masks, dense_masks, density
from toolchain.learning.fl.memory import MemoryReport, training_memory
from toolchain.learning.fl.messages import TrainIns, TrainRes
from toolchain.learning.fl.sparse_init import check_sparse_init, rescale_kept


@dataclass
class ClientData:
    cid: int
    x: torch.Tensor  # float NCHW, preprocessed
    y: torch.Tensor


@dataclass
class ServerContext:
    """What the server may use: the run config, every client's sample count, a seeded RNG, and a
    small server-side batch drawn from the training set (for methods that score at init)."""

    cfg: TrainConfig
    client_sizes: list[int]
    rng: np.random.Generator
    server_x: torch.Tensor
    server_y: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and float buffers (BN statistics) — what travels between server and clients."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


class Strategy:
    """Dense FedAvg with masks; subclasses add pruning."""

    name = "fedavg"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.mask_version = 0
        self._client_mask_version: dict[int, int] = {}

    # ---- server side -------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: ServerContext) -> None:
        self.model = model
        self.ctx = ctx
        opts = getattr(self, "opts", None) or self.cfg.algo_options  # a method's merged options (presets) win
        self.sparse_init = check_sparse_init(str(opts.get("sparse_init", "rescale")))
        self.masks = self.initial_masks(model, ctx)
        self.init_sparse_weights(float_state(model))

    def init_sparse_weights(self, reference: dict[str, torch.Tensor]) -> None:
        """Apply the first sparse mask to untrained weights ``reference`` (``toolchain/learning/fl/sparse_init.py``)."""
        apply_masks(self.model, self.masks)
        if self.sparse_init != "none":
            rescale_kept(self.model, self.masks, reference, kaiming=self.sparse_init == "kaiming")

    def initial_masks(self, model: nn.Module, ctx: ServerContext) -> Masks:
        return dense_masks(model)

    def set_masks(self, masks: Masks) -> None:
        self.masks = {k: v.clone() for k, v in masks.items()}
        self.mask_version += 1
        apply_masks(self.model, self.masks)

    def round_config(self, rnd: int) -> dict[str, Any]:
        return {"lr": self.cfg.lr_at(rnd)}

    def configure_train(self, rnd: int, client_ids: list[int]) -> dict[int, TrainIns]:
        weights = float_state(self.model)
        config = self.round_config(rnd)
        out = {}
        for cid in client_ids:
            travels = self._client_mask_version.get(cid) != self.mask_version
            self._client_mask_version[cid] = self.mask_version
            out[cid] = TrainIns(rnd, weights, self.masks, config, travels)
        return out

    def aggregate_train(self, rnd: int, results: list[TrainRes]) -> dict[str, float]:
        total = sum(r.num_examples for r in results)
        state = self.model.state_dict()
        for key in results[0].weights:
            acc = torch.zeros_like(state[key], dtype=torch.float32)
            for r in results:
                acc += r.weights[key] * (r.num_examples / total)
            state[key].copy_(acc.to(state[key].dtype))
        apply_masks(self.model, self.masks)
        metrics = {"train_loss": sum(r.metrics.get("loss", 0.0) * r.num_examples for r in results) / total}
        metrics.update(self.after_aggregate(rnd, results) or {})
        return metrics

    def after_aggregate(self, rnd: int, results: list[TrainRes]) -> dict[str, float] | None:
        """Hook for mask adjustments after FedAvg (server side)."""
        return None

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, device: str | None = None) -> dict[str, float]:
        acc, loss = evaluate(self.model, x, y, device=device)
        return {"accuracy": acc, "loss": loss, "density": density(self.masks)}

    # ---- optional setup exchanges (e.g. FedTiny's adaptive BN selection) ----------------------------
    def setup_steps(self, rnd: int) -> int:
        """Message exchanges with this round's sampled clients *before* ``configure_train`` (default 0).

        Each step is ``configure_setup`` -> ``client_setup`` on every sampled client -> ``aggregate_setup``;
        the simulator encodes the messages and adds their bytes to the round's traffic.
        """
        return 0

    def configure_setup(self, rnd: int, step: int, client_ids: list[int]) -> dict[int, TrainIns]:
        raise NotImplementedError

    def client_setup(self, ins: TrainIns, data: ClientData, model: nn.Module, generator: torch.Generator) -> TrainRes:
        raise NotImplementedError

    def aggregate_setup(self, rnd: int, step: int, results: list[TrainRes]) -> dict[str, float] | None:
        raise NotImplementedError

    def device_memory(self, rnd: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> MemoryReport:
        """Peak device memory of round ``rnd`` on batch ``(x, y)``: the largest of the round's phases
        (``memory_phases``; backprop training under the round's mask by default). docs/memory.md."""
        return max(self.memory_phases(rnd, model, x, y), key=lambda m: m.total)

    def memory_phases(self, rnd: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[MemoryReport]:
        """One report per phase a device goes through in round ``rnd`` (e.g. FedTiny's round-1 selection)."""
        return [training_memory(model, self.masks, x, y, self.cfg.optimizer, self.cfg.momentum,
                                self.dense_gradient_layers(rnd), extra_bytes=self.extra_device_bytes(rnd))]

    def dense_gradient_layers(self, rnd: int) -> list[str]:
        """Masked tensors whose *dense* gradient a device computes in round ``rnd`` (growth or importance
        scores); they are charged in full. Plain sparse training computes kept entries only."""
        return []

    def extra_device_bytes(self, rnd: int) -> int:
        """Device memory a method needs beyond weights/grads/optimizer/activations (e.g. top-K buffers)."""
        return 0

    # ---- client side -------------------------------------------------------------------------
    def client_train(self, ins: TrainIns, data: ClientData, model: nn.Module, generator: torch.Generator) -> TrainRes:
        model.load_state_dict(ins.weights, strict=False)
        res = local_train(model, ins.masks, data.x, data.y, self.cfg, ins.config["lr"], generator)
        return TrainRes(data.cid, float_state(model), len(data.y), {"loss": res.loss})
