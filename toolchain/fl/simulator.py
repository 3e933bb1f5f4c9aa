"""In-process federated simulation: sample clients, move encoded messages, aggregate, evaluate, account."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from models.datasets import Dataset
from toolchain.fl.config import TrainConfig
from toolchain.fl.masks import density
from toolchain.fl.memory import training_memory
from toolchain.fl.messages import TrainIns, TrainRes
from toolchain.fl.partition import partition
from toolchain.fl.strategy import ClientData, ServerContext, Strategy


@dataclass
class RoundRecord:
    round: int
    accuracy: float
    loss: float
    train_loss: float
    density: float
    clients: list[int]
    bytes_up: int  # all sampled clients together
    bytes_down: int
    bytes_up_per_client: float
    bytes_down_per_client: float
    device_memory: dict[str, int]
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def to_tensors(images_u8: np.ndarray, labels: np.ndarray, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> preprocessed float NCHW tensor, labels -> int64 tensor."""
    x = torch.from_numpy(data.preprocessing.apply(images_u8)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.asarray(labels, np.int64))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class Federation:
    """The simulated population: client shards and the (sub)sampled test set."""

    clients: list[ClientData]
    test_x: torch.Tensor
    test_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor

    @classmethod
    def from_dataset(cls, data: Dataset, cfg: TrainConfig) -> Federation:
        x, y = to_tensors(data.x_train, data.y_train, data)
        parts = partition(data.y_train, cfg.clients, cfg.partition, cfg.seed, cfg.alpha, cfg.shards_per_client)
        clients = [ClientData(i, x[torch.from_numpy(p)], y[torch.from_numpy(p)]) for i, p in enumerate(parts)]
        tx, ty = to_tensors(data.x_test, data.y_test, data)
        if cfg.eval_samples and cfg.eval_samples < len(ty):
            sel = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(len(ty))[:cfg.eval_samples])
            ex, ey = tx[sel], ty[sel]
        else:
            ex, ey = tx, ty
        return cls(clients, tx, ty, ex, ey)


def simulate(strategy: Strategy, model: nn.Module, fed: Federation, cfg: TrainConfig,
             on_round: Callable[[RoundRecord], None] | None = None, progress: bool = True) -> list[RoundRecord]:
    """Run ``cfg.rounds`` rounds of ``strategy`` over ``fed``; returns one record per round."""
    from tqdm import tqdm

    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    rng = np.random.default_rng(cfg.seed)
    server_sel = rng.permutation(len(fed.clients[0].y))[: min(256, len(fed.clients[0].y))]
    ctx = ServerContext(cfg, [len(c.y) for c in fed.clients], rng,
                        fed.clients[0].x[torch.from_numpy(server_sel)], fed.clients[0].y[torch.from_numpy(server_sel)])
    strategy.setup(model, ctx)
    client_model = copy.deepcopy(model)
    client_masks: dict[int, dict[str, torch.Tensor]] = {}  # what each client last received
    history: list[RoundRecord] = []
    per_round = min(cfg.per_round, cfg.clients)
    bar = tqdm(range(1, cfg.rounds + 1), desc=f"{strategy.name} rounds", unit="round", disable=not progress,
               leave=False, dynamic_ncols=True)
    for rnd in bar:
        t0 = time.perf_counter()
        sampled = sorted(int(c) for c in rng.choice(cfg.clients, per_round, replace=False))
        instructions = strategy.configure_train(rnd, sampled)
        results: list[TrainRes] = []
        down = up = 0
        for cid in sampled:
            blob = instructions[cid].to_bytes()
            down += len(blob)
            ins = TrainIns.from_bytes(blob, client_masks.get(cid, {}))
            client_masks[cid] = ins.masks
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd * 1009 + cid)
            res = strategy.client_train(ins, fed.clients[cid], client_model, gen)
            blob = res.to_bytes(ins.masks)
            up += len(blob)
            results.append(TrainRes.from_bytes(blob, strategy.masks))
        metrics = strategy.aggregate_train(rnd, results)
        probe = fed.clients[sampled[0]]
        bs = min(cfg.batch_size, len(probe.y))
        client_model.load_state_dict(strategy.model.state_dict())
        mem = training_memory(client_model, strategy.masks, probe.x[:bs], probe.y[:bs], cfg.optimizer, cfg.momentum,
                              strategy.dense_gradients, strategy.extra_device_bytes(rnd))
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            ev = strategy.evaluate(fed.eval_x, fed.eval_y)
        else:
            ev = {"accuracy": float("nan"), "loss": float("nan")}
        train_loss = metrics.pop("train_loss", float("nan"))
        rec = RoundRecord(rnd, ev["accuracy"], ev["loss"], train_loss, density(strategy.masks), sampled, up, down,
                          up / len(sampled), down / len(sampled), mem.as_dict(), time.perf_counter() - t0, metrics)
        history.append(rec)
        bar.set_postfix(acc=f"{ev['accuracy']:.4f}", density=f"{rec.density:.3f}")
        if on_round:
            on_round(rec)
    return history
