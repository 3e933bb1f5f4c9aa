"""In-process federated simulation: sample clients, move encoded messages, aggregate, evaluate, account."""

from __future__ import annotations

import copy
import pickle
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.data.datasets import Dataset
from toolchain.data.partition import partition
from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.fl.exchange import SETUP, TRAIN, Dispatch, Exchange, InProcessExchange
from toolchain.learning.fl.masks import density
from toolchain.learning.fl.memory import MEMORY_RULE
from toolchain.learning.fl.messages import TrainRes
from toolchain.learning.fl.strategy import ClientData, ServerContext, Strategy
from toolchain.learning.fl.vectorised import VectorisedExchange


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
    # How this round's clients were trained (engine_name). "" in records written before this field existed
    # (their class default on unpickling): those rounds ran one by one on the CPU.
    engine: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def engine_name(clients_device: str | None) -> str:
    """How a round's clients were trained: one by one (``local_train``) or together on a device (vectorised.py)."""
    return "one-by-one cpu" if clients_device is None else f"vectorised {clients_device}"


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
                probe_model: nn.Module, eval_device: str | None = None) -> RoundRecord:
    """Server side of a round once every result is in: aggregate, measure device memory on one batch,
    evaluate, and make the round's record (shared by this simulator and the Flower driver)."""
    metrics = strategy.aggregate_train(rnd, results)
    metrics.update(setup_metrics)
    probe = fed.clients[sampled[0]]
    bs = min(cfg.batch_size, len(probe.y))
    probe_model.load_state_dict(strategy.model.state_dict())
    mem = strategy.device_memory(rnd, probe_model, probe.x[:bs], probe.y[:bs])
    mem1 = strategy.device_memory(rnd, probe_model, probe.x[:1], probe.y[:1])  # the smallest batch a device trains with
    if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
        ev = strategy.evaluate(fed.eval_x, fed.eval_y, eval_device)
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
    # the memory-accounting rule its round records follow (docs/memory.md); a factory, not a class default, so a
    # checkpoint pickled before the field existed reads as rule 1 (``getattr(state, "memory_rule", 1)``)
    memory_rule: int = field(default_factory=lambda: MEMORY_RULE)


def _share_equal_masks(client_masks: dict[int, dict[str, torch.Tensor]]) -> None:
    """Make clients that hold equal masks hold the same object, so a checkpoint pickles each distinct mask set
    once (100 clients under one static mask: one copy, not 100). Masks are never modified in place."""
    distinct: list[dict[str, torch.Tensor]] = []
    for cid, masks in client_masks.items():
        for seen in distinct:
            if seen is masks or (seen.keys() == masks.keys() and all(torch.equal(seen[k], masks[k]) for k in masks)):
                client_masks[cid] = seen
                break
        else:
            distinct.append(masks)


def server_data(fed: Federation, cfg: TrainConfig, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The server's own samples, drawn from the training data: a batch of up to 256 from client 0 (``rng``'s first
    draw) and the few-shot set. A function of the data and the seed only, so checkpoints leave it out."""
    server_sel = torch.from_numpy(rng.permutation(len(fed.clients[0].y))[: min(256, len(fed.clients[0].y))])
    fewshot = fewshot_set(fed, int(cfg.algo_options.get("n_shots", 5)), cfg.seed)
    return fed.clients[0].x[server_sel], fed.clients[0].y[server_sel], fewshot


def _save_checkpoint(path: Path, state: _RunState) -> None:
    _share_equal_masks(state.client_masks)
    tmp = path.with_name(path.name + ".tmp")
    # The server's samples (3.8 of a CIFAR-10 checkpoint's 4.3 MB) are re-drawn on resume (server_data); the labels
    # stay, to check that the resumed run's data is the same.
    ctx = state.strategy.ctx
    kept = ctx.server_x, ctx.extra.get("fewshot")
    ctx.server_x = None  # type: ignore[assignment]
    ctx.extra.pop("fewshot", None)
    try:
        torch.save(state, tmp)
    finally:
        ctx.server_x = kept[0]
        if kept[1] is not None:
            ctx.extra["fewshot"] = kept[1]
    tmp.replace(path)  # atomic: a run killed mid-write keeps the previous checkpoint


def _restore_server_data(state: _RunState, fed: Federation, cfg: TrainConfig, path: Path) -> None:
    """Put back what _save_checkpoint left out (checkpoints written before that still hold it)."""
    ctx = state.strategy.ctx
    if ctx.server_x is not None:
        return
    x, y, fewshot = server_data(fed, cfg, np.random.default_rng(cfg.seed))
    if not torch.equal(y, ctx.server_y):
        raise ValueError(f"checkpoint {path} was written for other training data; delete it to start over")
    ctx.server_x = x
    if "fewshot" not in ctx.extra:
        ctx.extra["fewshot"] = fewshot


# Modules that moved since checkpoints were first written (the layered package of issue 18): a checkpoint
# pickles the run's objects by module path, and a resumable run must survive an upgrade of the toolchain.
MOVED_MODULES = {"toolchain.fl": "toolchain.learning.fl", "toolchain.pruning": "toolchain.learning.pruning",
                 "models": "toolchain.models"}


class _CheckpointUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        for old, new in MOVED_MODULES.items():
            if module == old or module.startswith(old + "."):
                module = new + module[len(old):]
                break
        return super().find_class(module, name)


_checkpoint_pickle = types.SimpleNamespace(Unpickler=_CheckpointUnpickler, load=pickle.load, __name__="pickle")


def read_checkpoint(path: Path) -> _RunState:
    """A checkpoint written by :func:`simulate` (ours: it is unpickled whole, so never load one from a
    stranger), also one written before a module moved."""
    # map_location: a run checkpointed by the vectorised engine on a GPU resumes on a machine without one
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_checkpoint_pickle)


def _load_checkpoint(path: Path, cfg: TrainConfig) -> _RunState | None:
    if not path.is_file():
        return None
    state = read_checkpoint(path)
    if state.strategy.cfg.as_dict() != cfg.as_dict():
        raise ValueError(f"checkpoint {path} was written for another configuration; delete it to start over")
    return state




def client_seed(cfg: TrainConfig, rnd: int, cid: int, setup_step: int | None = None) -> int:
    """The per-client torch generator seed of round ``rnd`` (setup steps get their own)."""
    base = cfg.seed * 1_000_003 + rnd * 1009 + cid
    return base if setup_step is None else base + 7 * (setup_step + 1)


def start_run(strategy: Strategy, model: nn.Module, fed: Federation, cfg: TrainConfig) -> np.random.Generator:
    """The server's preamble: seeds, the server context, ``strategy.setup``; returns the sampling RNG.

    Flower nodes replay it too (toolchain/learning/flower/driver.py) so their strategy objects match the server's."""
    torch.set_num_threads(max(1, cfg.threads))
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    server_x, server_y, fewshot = server_data(fed, cfg, rng)
    ctx = ServerContext(cfg, [len(c.y) for c in fed.clients], rng, server_x, server_y)
    ctx.extra["fewshot"] = fewshot
    strategy.setup(model, ctx)
    return rng


def play_round(strategy: Strategy, fed: Federation, cfg: TrainConfig, rnd: int, rng: np.random.Generator,
               exchange: Exchange, probe_model: nn.Module, eval_device: str | None = None) -> RoundRecord:
    """One round on the server: sample, setup exchanges, train exchange, aggregate (``close_round``).

    The one round loop of every engine: ``simulate`` passes an in-process exchange, the Flower driver one
    that sends Flower messages, so the engines can only differ in transport. Byte counts are the lengths
    of the encoded payloads; results are decoded with the server's masks, in sampled order.
    """
    t0 = time.perf_counter()
    sampled = sorted(int(c) for c in rng.choice(cfg.clients, min(cfg.per_round, cfg.clients), replace=False))
    down = up = 0
    setup_metrics: dict[str, float] = {}
    for step in range(strategy.setup_steps(rnd)):
        # setup payloads carry no masks (receivers keep what they hold); bytes count in this round
        setup_ins = strategy.configure_setup(rnd, step, sampled)
        out = [Dispatch(cid, SETUP, rnd, step, setup_ins[cid], setup_ins[cid].to_bytes(),
                        client_seed(cfg, rnd, cid, step)) for cid in sampled]
        down += sum(len(d.blob) for d in out)
        replies = exchange(out)
        setup_res = []
        for cid in sampled:
            up += len(replies[cid].blob)
            down += replies[cid].resent_bytes
            setup_res.append(replies[cid].cls.from_bytes(replies[cid].blob, {}))
        setup_metrics.update(strategy.aggregate_setup(rnd, step, setup_res) or {})
    instructions = strategy.configure_train(rnd, sampled)
    out = [Dispatch(cid, TRAIN, rnd, 0, instructions[cid], instructions[cid].to_bytes(), client_seed(cfg, rnd, cid))
           for cid in sampled]
    down += sum(len(d.blob) for d in out)
    replies = exchange(out)
    results: list[TrainRes] = []
    for cid in sampled:
        up += len(replies[cid].blob)
        down += replies[cid].resent_bytes
        results.append(replies[cid].cls.from_bytes(replies[cid].blob, strategy.masks))
    return close_round(strategy, fed, cfg, rnd, sampled, results, setup_metrics, up, down, t0, probe_model,
                       eval_device)


def simulate(strategy: Strategy, model: nn.Module, fed: Federation, cfg: TrainConfig,
             on_round: Callable[[RoundRecord], None] | None = None, progress: bool = True,
             checkpoint: Path | None = None, clients_device: str | None = None) -> list[RoundRecord]:
    """Run ``cfg.rounds`` rounds of ``strategy`` over ``fed``; returns one record per round.

    With ``checkpoint``, the run state is saved there (atomically) after every round, and a run that
    finds a checkpoint resumes after its last round: the result is bit-identical to an uninterrupted
    run (tests/test_fl_engine.py). ``on_round`` is called only for rounds run in this call.

    With ``clients_device`` ("cpu", "cuda", ...), each round's clients train together on that device, batched
    (toolchain/learning/fl/vectorised.py; equal to the one-by-one engine up to float rounding), and
    evaluation runs there too; the server's state stays on the CPU, so a checkpoint resumes on either engine.
    """
    from tqdm import tqdm

    torch.set_num_threads(max(1, cfg.threads))
    state = _load_checkpoint(checkpoint, cfg) if checkpoint is not None else None
    if state is None:
        rng = start_run(strategy, model, fed, cfg)
        client_masks: dict[int, dict[str, torch.Tensor]] = {}  # what each client last received
        history: list[RoundRecord] = []
    else:
        # the caller's strategy object becomes the resumed one (callers read strategy.model / .masks after)
        _restore_server_data(state, fed, cfg, checkpoint)  # type: ignore[arg-type]
        strategy.__dict__.update(state.strategy.__dict__)
        rng, client_masks, history = state.rng, state.client_masks, state.history
        torch.set_rng_state(state.torch_rng)
        np.random.set_state(state.np_rng)
    client_model = copy.deepcopy(strategy.model)
    if clients_device is None:
        exchange: Exchange = InProcessExchange(strategy, fed.clients, client_model, client_masks)
    else:
        exchange = VectorisedExchange(strategy, fed.clients, client_model, client_masks, device=clients_device)
    bar = tqdm(range(len(history) + 1, cfg.rounds + 1), desc=f"{strategy.name} rounds", unit="round",
               disable=not progress, leave=False, dynamic_ncols=True)
    for rnd in bar:
        rec = play_round(strategy, fed, cfg, rnd, rng, exchange, client_model, eval_device=clients_device)
        rec.engine = engine_name(clients_device)
        history.append(rec)
        bar.set_postfix(acc=f"{rec.accuracy:.4f}", density=f"{rec.density:.3f}")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, _RunState(strategy, rng, client_masks, history, torch.get_rng_state(),
                                                   np.random.get_state()))
        if on_round:
            on_round(rec)
    return history
