"""The Flower-independent half of the adapter: the run spec, the server's round loop, the client step.

Nothing here imports ``flwr``. The server runs the in-process engine's own preamble and round
(:func:`toolchain.learning.fl.simulator.start_run`, :func:`~toolchain.learning.fl.simulator.play_round`) with a
:class:`NodeExchange` as the transport; :mod:`toolchain.learning.flower.apps` sends its messages over Flower.
There is no second copy of the round loop, so the engines can only differ in transport.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from toolchain.contracts.errors import ToolchainError
from toolchain.data.datasets import Dataset, load_dataset
from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.fl.exchange import SETUP, TRAIN, Dispatch, Exchange, Reply
from toolchain.learning.fl.simulator import (
    Federation,
    RoundRecord,
    client_seed,
    play_round,
    seed_everything,
    simulate,
    start_run,
    to_tensors,
)
from toolchain.learning.fl.strategy import ClientData, Strategy
from toolchain.learning.flower.nodedata import read_shard
from toolchain.learning.options import FederatedOptions
from toolchain.learning.pruning import make_strategy
from toolchain.learning.setup import set_up
from toolchain.models.zoo import build_model

__all__ = ["SETUP", "TRAIN", "client_seed"]  # re-exported: the Flower apps and tests use them from here


@dataclass
class RunSpec:
    """Everything a ServerApp or ClientApp needs to rebuild a run; travels as JSON (run config / closure).

    ``options`` is ``dataclasses.asdict`` of the run's :class:`~toolchain.learning.options.FederatedOptions` plus
    what the run records with it (``engine``, ``out``). ``train_limit``/``test_limit`` keep the first N
    samples of each split (toy-scale tests and benchmarks). ``out`` is written by the ServerApp.
    """

    options: dict[str, Any]
    out: str
    train_limit: int | None = None
    test_limit: int | None = None
    node_timeout: float = 300.0  # seconds the server waits for all SuperNodes to connect
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls(**json.loads(text))

    def federated(self) -> FederatedOptions:
        """The run's options (the recorded extras, such as the engine and the output folder, left out)."""
        names = {f.name for f in dataclasses.fields(FederatedOptions)}
        return FederatedOptions(**{k: v for k, v in self.options.items() if k in names})

    def config(self) -> TrainConfig:
        return self.federated().train_config()

    def dataset(self, data_dir: str | None = None) -> Dataset:
        """The run's dataset; ``data_dir`` (a SuperNode's ``data-dir`` node config) overrides ``--data``."""
        data = load_dataset(self.options["dataset"], data_dir if data_dir is not None else self.options["data"])
        if self.train_limit or self.test_limit:
            n, m = self.train_limit or len(data.y_train), self.test_limit or len(data.y_test)
            data = dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n],
                                       x_test=data.x_test[:m], y_test=data.y_test[:m])
        return data


# ---- payload classes travel by name -----------------------------------------------------------------
def type_name(obj: object) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def resolve_type(name: str) -> type:
    """Import a message class named by the peer: only classes from ``toolchain``/``models`` with a
    ``from_bytes``, so a message cannot make the receiver import arbitrary modules."""
    module, _, qual = name.partition(":")
    if module.split(".")[0] not in ("toolchain", "models") or not qual:
        raise ToolchainError(f"refusing message class '{name}'; only toolchain classes may travel")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and callable(getattr(obj, "from_bytes", None))):
        raise ToolchainError(f"message class '{name}' has no from_bytes")
    return obj


@dataclass
class Outgoing:
    """One instruction for one client as a node sees it: encoded payload, its class, its seed."""

    cid: int
    kind: str  # TRAIN or SETUP
    rnd: int
    step: int
    payload: bytes
    ins_type: str
    seed: int
    mask_travels: bool
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # the sender's masks (to lay out KNOWN_MASK)


@dataclass
class Incoming:
    cid: int
    payload: bytes
    res_type: str
    need_masks: bool = False  # the node had lost the masks this instruction assumed (restarted)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # what the node encoded its result with


class NodeExchange:
    """``simulator.Exchange`` for clients that live elsewhere (Flower nodes): turns each ``Dispatch`` into
    an ``Outgoing``, sends them all at once (``send``), resends with masks to nodes that lost theirs."""

    def __init__(self, send: Callable[[list[Outgoing]], dict[int, Incoming]]) -> None:
        self.send = send

    def __call__(self, dispatches: list[Dispatch]) -> dict[int, Reply]:
        out = [Outgoing(d.cid, d.kind, d.rnd, d.step, d.blob, type_name(d.ins), d.seed,
                        d.kind == TRAIN and bool(getattr(d.ins, "mask_travels", True)),
                        dict(getattr(d.ins, "masks", None) or {})) for d in dispatches]
        got = self.send(out)
        retry = [o for o in out if got[o.cid].need_masks]
        resent: dict[int, int] = {}
        if retry:
            by_cid = {d.cid: d for d in dispatches}
            again = []
            for o in retry:  # a SuperNode that lost its state (restart) asks again; it gets the masks this time
                blob = dataclasses.replace(by_cid[o.cid].ins, mask_travels=True).to_bytes()
                again.append(dataclasses.replace(o, payload=blob, mask_travels=True))
                resent[o.cid] = len(blob)
            got.update(self.send(again))
        return {d.cid: Reply(got[d.cid].payload, resolve_type(got[d.cid].res_type), resent.get(d.cid, 0))
                for d in dispatches}


def build_server(spec: RunSpec) -> tuple[Strategy, nn.Module, Federation, TrainConfig]:
    """Data, initial model and strategy exactly as ``toolchain train`` builds them (:func:`set_up`)."""
    run = set_up(spec.federated(), spec.dataset())
    return run.strategy, run.model, run.fed, run.cfg


def server_loop(strategy: Strategy, model: nn.Module, fed: Federation, cfg: TrainConfig, exchange: Exchange,
                on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
    """``simulate``'s rounds (the same ``start_run`` and ``play_round``) over another transport."""
    rng = start_run(strategy, model, fed, cfg)
    probe_model = copy.deepcopy(strategy.model)  # the server's copy for device-memory accounting only
    history: list[RoundRecord] = []
    for rnd in range(1, cfg.rounds + 1):
        rec = play_round(strategy, fed, cfg, rnd, rng, exchange, probe_model)
        history.append(rec)
        if on_round:
            on_round(rec)
    return history


# ---- client side ----------------------------------------------------------------------------------
class NeedMasks(Exception):
    """The instruction assumes masks this client does not hold (its state was lost)."""


@dataclass
class ClientRuntime:
    """What one client process keeps between messages: its data shard and the post-setup strategy + model.

    The client replays the server's preamble (same seeds and ``strategy.setup``) so that its strategy
    object and model have exactly the structure the in-process engine's clients get (a strategy's
    ``setup`` may change the model, e.g. FedMef's NSConv/SAP layers), without anything pickled travelling.
    """

    spec: RunSpec
    data: ClientData
    cfg: TrainConfig
    model: nn.Module  # the post-setup model; every message trains a fresh copy
    pristine: bytes  # the post-setup client strategy, pickled: the state of a node that has none yet
    pristine_attrs: dict[str, bytes] = field(default_factory=dict)  # fingerprints of its attributes


@dataclass
class _Replayed:
    """One process's replay of a run's preamble, shared by every partition it serves (a simulation worker
    serves many virtual SuperNodes: the dataset is loaded, cut and set up once, not per message)."""

    shards: list[ClientData]
    model: nn.Module
    pristine: bytes
    attrs: dict[str, bytes]


_REPLAYS: dict[tuple[str, str | None, str | None], _Replayed] = {}
_RUNTIMES: dict[tuple[str, int, str | None, str | None], ClientRuntime] = {}


def _replay(spec: RunSpec, strategy: Strategy, model: nn.Module, fed: Federation, cfg: TrainConfig,
            shards: list[ClientData]) -> _Replayed:
    start_run(strategy, model, fed, cfg)
    pristine = pickle.dumps(strategy)
    # fingerprints of what a node starts from: an unpickled copy (the live object can differ in ways
    # pickling drops, e.g. autograd state)
    return _Replayed(shards, copy.deepcopy(model), pristine,
                     {k: _fingerprint(v) for k, v in pickle.loads(pristine).__dict__.items()})


def _tensor_content(*args: object) -> None:  # a marker in fingerprints; never called
    raise NotImplementedError


class _CanonicalPickler(pickle.Pickler):
    """Pickles tensors by content: torch's own pickling differs between equal tensors (storage ids)."""

    def reducer_override(self, obj: object) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            return _tensor_content, (type(obj).__name__, str(t.dtype), tuple(t.shape), obj.requires_grad,
                                     t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return NotImplemented


def _fingerprint(value: object) -> bytes:
    buf = io.BytesIO()
    _CanonicalPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return hashlib.sha256(buf.getvalue()).digest()


def client_runtime(spec_json: str, partition_id: int, num_partitions: int, data_dir: str | None,
                   local_data: str | None = None) -> ClientRuntime:
    """This node's shard and post-setup strategy, built once per process per run (Ray actors and
    SuperNode app processes live across messages).

    ``data_dir`` (node config ``data-dir``): the node's copy of the whole dataset, cut like the server.
    ``local_data`` (node config ``local-data``): a folder with this node's shard only
    (toolchain/learning/flower/nodedata.py); the preamble is then replayed with that shard standing in for every
    client: the server's initial masks and weights reach the node in its first instruction anyway, and a
    strategy's client side keeps only structure (layers, options) from its ``setup``.
    """
    key = (spec_json, partition_id, data_dir, local_data)
    if key in _RUNTIMES:
        return _RUNTIMES[key]
    spec = RunSpec.from_json(spec_json)
    cfg = spec.config()
    if num_partitions != cfg.clients:
        raise ToolchainError(f"this SuperNode has num-partitions={num_partitions} but the run has --clients "
                             f"{cfg.clients}; start the SuperNodes with num-partitions={cfg.clients}")
    if not 0 <= partition_id < cfg.clients:
        raise ToolchainError(f"partition-id={partition_id} is outside 0..{cfg.clients - 1}")
    rkey = (spec_json, data_dir, local_data if local_data is None else f"{local_data}#{partition_id}")
    if rkey not in _REPLAYS:
        _REPLAYS.clear()  # one run per process at a time
        _RUNTIMES.clear()
        if local_data is not None:
            data = read_shard(local_data, spec.options["dataset"])
            x, y = to_tensors(data.x_train, data.y_train, data)
            mine = ClientData(partition_id, x, y)
            seed_everything(spec.options["seed"])  # the initial weights, as build_server makes them
            model = build_model(spec.options["model"], data.input_shape, data.num_classes)
            fed = Federation([mine] * cfg.clients, x[:0], y[:0], x[:0], y[:0])
            shards = [mine] * cfg.clients
        else:
            if data_dir is not None:
                spec = dataclasses.replace(spec, options={**spec.options, "data": data_dir})
            strategy, model, fed, cfg = build_server(spec)
            shards = fed.clients
        _REPLAYS[rkey] = _replay(spec, make_strategy(spec.options["algo"], cfg), model, fed, cfg, shards)
    r = _REPLAYS[rkey]
    _RUNTIMES[key] = ClientRuntime(spec, r.shards[partition_id], cfg, r.model, r.pristine, r.attrs)
    return _RUNTIMES[key]


def client_step(rt: ClientRuntime, o: Outgoing, known_masks: dict[str, torch.Tensor] | None,
                state: bytes | None) -> tuple[Incoming, dict[str, torch.Tensor] | None, bytes]:
    """Decode one instruction, run the strategy's client side, encode the result.

    ``state`` is what this node's client-side strategy object changed since the post-setup replay, as left
    by its previous message (pickled attributes; it never leaves the node: Flower keeps it in the node's
    ``context.state``), or None for a new node; it holds per-device state such as FedTiny's candidate
    masks between its two setup messages. Returns the reply, the masks the node holds afterwards, and
    the new state. Only changed attributes are kept, so an idle node's state is a few bytes.
    """
    torch.set_num_threads(max(1, rt.cfg.threads))
    strategy: Strategy = pickle.loads(rt.pristine)
    if state:
        strategy.__dict__.update(pickle.loads(state))
    model = copy.deepcopy(rt.model)
    gen = torch.Generator().manual_seed(o.seed)
    ins_cls = resolve_type(o.ins_type)
    if o.kind == SETUP:
        ins = ins_cls.from_bytes(o.payload, {})
        res = strategy.client_setup(ins, rt.data, model, gen)
        return Incoming(o.cid, res.to_bytes({}), type_name(res)), known_masks, _changed(rt, strategy)
    if not o.mask_travels and known_masks is None:
        raise NeedMasks()
    ins = ins_cls.from_bytes(o.payload, known_masks or {})
    res = strategy.client_train(ins, rt.data, model, gen)
    return (Incoming(o.cid, res.to_bytes(ins.masks), type_name(res), masks=dict(ins.masks)), ins.masks,
            _changed(rt, strategy))


def _changed(rt: ClientRuntime, strategy: Strategy) -> bytes:
    """The strategy's attributes that differ from the post-setup replay, pickled together (so objects
    they share stay shared)."""
    diff = {}
    for k, v in strategy.__dict__.items():
        if k not in rt.pristine_attrs or _fingerprint(v) != rt.pristine_attrs[k]:
            diff[k] = v
    return pickle.dumps(diff)


def run_inprocess(spec: RunSpec) -> tuple[list[RoundRecord], Strategy]:
    """The same run on the in-process engine (``simulate``), for comparisons and benchmarks."""

    strategy, model, fed, cfg = build_server(spec)
    return simulate(strategy, model, fed, cfg, progress=False), strategy
