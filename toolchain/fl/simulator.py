"""In-process federated simulation: sample clients, move encoded messages, aggregate, evaluate, account."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.datasets import Dataset
from toolchain.fl.config import TrainConfig
from toolchain.fl.masks import density
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
    device_memory: dict[str, int]  # at the training batch (docs/memory.md)
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    device_memory_batch1: dict[str, int] = field(default_factory=dict)  # the same, training on one sample

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


def fewshot_set(fed: Federation, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small labelled server-side set: ``per_class`` samples of every class from the pooled client data.

    Drawn with its own seeded generator so it does not change client sampling. (FedTiny's [AUTH] code
    draws its 5-shot set from the test split; we draw from training data so the test set stays unseen.)
    """
    y = np.concatenate([c.y.numpy() for c in fed.clients])  # labels only: images are not copied
    owner = np.concatenate([np.full(len(c.y), i) for i, c in enumerate(fed.clients)])
    local = np.concatenate([np.arange(len(c.y)) for c in fed.clients])
    rng = np.random.default_rng(seed + 7919)
    sel = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]))
    xs = torch.stack([fed.clients[owner[i]].x[local[i]] for i in sel])
    return xs, torch.from_numpy(y[sel].astype(np.int64))


def close_round(strategy: Strategy, fed: Federation, cfg: TrainConfig, rnd: int, sampled: list[int],
                results: list[TrainRes], setup_metrics: dict, up: int, down: int, t0: float,
                probe_model: nn.Module) -> RoundRecord:
    """Server side of a round once every result is in: aggregate, measure device memory on one batch,
    evaluate, and make the round's record (shared by this simulator and the Flower driver)."""
    metrics = strategy.aggregate_train(rnd, results)
    metrics.update(setup_metrics)
    probe = fed.clients[sampled[0]]
    bs = min(cfg.batch_size, len(probe.y))
    probe_model.load_state_dict(strategy.model.state_dict())
    mem = strategy.device_memory(rnd, probe_model, probe.x[:bs], probe.y[:bs])
    mem1 = strategy.device_memory(rnd, probe_model, probe.x[:1], probe.y[:1])  # how the papers count
    if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
        ev = strategy.evaluate(fed.eval_x, fed.eval_y)
    else:
        ev = {"accuracy": float("nan"), "loss": float("nan")}
    train_loss = metrics.pop("train_loss", float("nan"))
    return RoundRecord(rnd, ev["accuracy"], ev["loss"], train_loss, density(strategy.masks), sampled, up, down,
                       up / len(sampled), down / len(sampled), mem.as_dict(), time.perf_counter() - t0, metrics,
                       mem1.as_dict())


@dataclass
class _RunState:
    """Everything a run carries from one round to the next: what a checkpoint holds.

    The strategy (model, masks, method state) and the server RNG are pickled in one object so the
    strategy's reference to the RNG (``ctx.rng``) still points at the same generator after a resume.
    """

    strategy: Strategy
    rng: np.random.Generator
    client_masks: dict[int, dict[str, torch.Tensor]]
    history: list[RoundRecord]
    torch_rng: torch.Tensor
    np_rng: tuple


def _save_checkpoint(path: Path, state: _RunState) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a run killed mid-write keeps the previous checkpoint


def _load_checkpoint(path: Path, cfg: TrainConfig) -> _RunState | None:
    if not path.is_file():
        return None
    state: _RunState = torch.load(path, weights_only=False)  # our own file, written by _save_checkpoint
    if state.strategy.cfg.as_dict() != cfg.as_dict():
        raise ValueError(f"checkpoint {path} was written for another configuration; delete it to start over")
    return state


def simulate(strategy: Strategy, model: nn.Module, fed: Federation, cfg: TrainConfig,
             on_round: Callable[[RoundRecord], None] | None = None, progress: bool = True,
             checkpoint: Path | None = None) -> list[RoundRecord]:
    """Run ``cfg.rounds`` rounds of ``strategy`` over ``fed``; returns one record per round.

    With ``checkpoint``, the run state is saved there (atomically) after every round, and a run that
    finds a checkpoint resumes after its last round: the result is bit-identical to an uninterrupted
    run (tests/test_fl_engine.py). ``on_round`` is called only for rounds run in this call.
    """
    from tqdm import tqdm

    torch.set_num_threads(max(1, cfg.threads))
    state = _load_checkpoint(checkpoint, cfg) if checkpoint is not None else None
    if state is None:
        seed_everything(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        server_sel = rng.permutation(len(fed.clients[0].y))[: min(256, len(fed.clients[0].y))]
        ctx = ServerContext(cfg, [len(c.y) for c in fed.clients], rng, fed.clients[0].x[torch.from_numpy(server_sel)],
                            fed.clients[0].y[torch.from_numpy(server_sel)])
        ctx.extra["fewshot"] = fewshot_set(fed, int(cfg.algo_options.get("n_shots", 5)), cfg.seed)
        strategy.setup(model, ctx)
        client_masks: dict[int, dict[str, torch.Tensor]] = {}  # what each client last received
        history: list[RoundRecord] = []
    else:
        # the caller's strategy object becomes the resumed one (callers read strategy.model / .masks after)
        strategy.__dict__.update(state.strategy.__dict__)
        rng, client_masks, history = state.rng, state.client_masks, state.history
        torch.set_rng_state(state.torch_rng)
        np.random.set_state(state.np_rng)
    client_model = copy.deepcopy(strategy.model)
    per_round = min(cfg.per_round, cfg.clients)
    bar = tqdm(range(len(history) + 1, cfg.rounds + 1), desc=f"{strategy.name} rounds", unit="round",
               disable=not progress, leave=False, dynamic_ncols=True)
    for rnd in bar:
        t0 = time.perf_counter()
        sampled = sorted(int(c) for c in rng.choice(cfg.clients, per_round, replace=False))
        down = up = 0
        setup_metrics: dict[str, float] = {}
        for step in range(strategy.setup_steps(rnd)):
            # setup payloads carry no masks (receivers keep what they hold); bytes count in this round
            setup_ins = strategy.configure_setup(rnd, step, sampled)
            setup_res: list[TrainRes] = []
            for cid in sampled:
                blob = setup_ins[cid].to_bytes()
                down += len(blob)
                ins = type(setup_ins[cid]).from_bytes(blob, {})
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd * 1009 + cid + 7 * (step + 1))
                res = strategy.client_setup(ins, fed.clients[cid], client_model, gen)
                blob = res.to_bytes({})
                up += len(blob)
                setup_res.append(type(res).from_bytes(blob, {}))
            setup_metrics.update(strategy.aggregate_setup(rnd, step, setup_res) or {})
        instructions = strategy.configure_train(rnd, sampled)
        results: list[TrainRes] = []
        for cid in sampled:
            # A strategy may use its own message kinds (e.g. ZO rounds): decode with the sender's class.
            ins_type: type[TrainIns] = type(instructions[cid])
            blob = instructions[cid].to_bytes()
            down += len(blob)
            ins = ins_type.from_bytes(blob, client_masks.get(cid, {}))
            client_masks[cid] = ins.masks
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd * 1009 + cid)
            res = strategy.client_train(ins, fed.clients[cid], client_model, gen)
            blob = res.to_bytes(ins.masks)
            up += len(blob)
            results.append(type(res).from_bytes(blob, strategy.masks))
        rec = close_round(strategy, fed, cfg, rnd, sampled, results, setup_metrics, up, down, t0, client_model)
        history.append(rec)
        bar.set_postfix(acc=f"{rec.accuracy:.4f}", density=f"{rec.density:.3f}")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, _RunState(strategy, rng, client_masks, history, torch.get_rng_state(),
                                                   np.random.get_state()))
        if on_round:
            on_round(rec)
    return history
