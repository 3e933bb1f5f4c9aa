"""``--algo ntk-zo``: foresight-pruned (NTK) federated zeroth-order training with the random-seed trick.

Round 1 first runs the federated NTK pruning (``toolchain.learning.pruning.ntk``) as T setup exchanges (mask kinds
``ntk`` / ``ntk-datafree``; ``random``, ``snip`` and ``dense`` masks are made on the server at setup). Then
every round follows docs/zo.md §6 with the shared maths of ``toolchain.contracts.zo``:

1. server -> client: round seed S_t, K, mu, estimator, batch, the update records the client has not seen
   (``S``, ``lr``, K aggregated scalars each) and, at first contact only, the sparse model + mask;
2. client: replays the records on its own copy of the active weights, then K scalars on a mini-batch
   (``estimate_torch``), and replies ``round | n | loss | g_1..g_K`` = 4K + 12 bytes;
3. server: n-weighted aggregate, lr from the schedule, ``apply_update_torch`` on its model, logs the record.

No weights travel after a client's first contact. Options (``--algo-opt KEY=VALUE``): ``mask`` (ntk |
ntk-datafree | random | snip | dense), ``K``, ``mu``, ``lr``, ``estimator`` (forward | central | one-point),
``lr_schedule`` (constant | cosine | exponential), ``lr_gamma``, ``lr_final``, ``batch``, ``clip`` (0 = off),
``T``, ``eps``, ``ntk_samples``, ``ntk_batch``, ``ntk_min_layer``, ``ntk_objective`` (trace | frobenius), ``init``
(sparse-kaiming | model), ``stream``. Defaults and their sources: docs/ntk-zo.md.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.zo import (
    ActiveWeights,
    ClientReply,
    aggregate,
    apply_update,
    apply_update_torch,
    derive,
    estimate_torch,
    learning_rate,
)
from toolchain.learning.fl import codec
from toolchain.learning.fl.masks import Masks, apply_masks, dense_masks, prunable_names
from toolchain.learning.fl.memory import MemoryReport, forward_only_memory
from toolchain.learning.fl.strategy import ClientData, ServerContext, Strategy, float_state
from toolchain.learning.pruning import ntk
from toolchain.learning.pruning.scores import random_masks, snip_masks
from toolchain.models.fold_bn import fold_batchnorm

MASK_KINDS = ("ntk", "ntk-datafree", "random", "snip", "dense")
ESTIMATOR_CODES = {"forward": 0, "central": 1, "one_point": 2}  # the device's ``probe(mode=...)``
SCHEDULES = ("constant", "cosine", "exponential")

DEFAULTS: dict[str, Any] = {
    "mask": "ntk", "K": 20, "mu": 1e-3, "lr": 0.01, "estimator": "forward", "lr_schedule": "constant",
    "lr_gamma": 0.999, "lr_final": 0.0, "batch": None, "clip": 2.0, "T": 10, "eps": ntk.EPS_DEFAULT,
    "ntk_samples": 1, "ntk_batch": 64, "ntk_min_layer": 0.01, "ntk_objective": "trace", "init": "sparse-kaiming",
    "stream": True,
}


def forward_passes(estimator: str, k: int) -> int:
    """Forward passes per client and round (docs/zo.md §5)."""
    return {"forward": k + 1, "central": 2 * k, "one_point": k}[estimator]


def sparse_forward_macs(model: nn.Module, masks: Masks, in_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one sample's forward through a sparse engine: each conv/linear layer costs
    (kept weights) x (output positions); elementwise ops, pooling and BN (folded on devices) are not counted."""
    params = dict(model.named_parameters())
    names = {id(m): n for n, m in model.named_modules()}
    total = 0

    def hook(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        name = f"{names[id(module)]}.weight" if names[id(module)] else "weight"
        kept = int(masks[name].sum()) if name in masks else params[name].numel()
        positions = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
        total += kept * positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    h, w, c = in_shape
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, h, w))
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return total


def device_graph(model: nn.Module) -> nn.Module:
    """The inference graph a device runs for its forward passes: BN folded into the convolutions (the
    exporter's ``fold_batchnorm``) and ReLU in place (TFLite/int8 kernels fuse it into the conv)."""

    graph = fold_batchnorm(copy.deepcopy(model).eval())
    for module in graph.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    return graph


def sparse_kaiming_(model: nn.Module, masks: Masks, seed: int) -> None:
    """Re-draw the kept weights with Kaiming-normal variance over each unit's *kept* fan-in, 2 / fan_in_kept
    (Evci et al. 2022: a sparse net initialised at dense scale starts with a vanishing signal); biases 0.

    Measured here: with PyTorch's default init no 10 %-dense LeNet-5 learned at all under ZO (loss stuck at
    2.30 for 200 steps, diverging at larger lr), while the dense one did. Dense masks give plain Kaiming-normal.
    """
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in prunable_names(model):
            w, m = params[name], masks[name].to(torch.float32)
            fan = m.reshape(m.shape[0], -1).sum(1).clamp(min=1.0)
            std = torch.sqrt(2.0 / fan).view(-1, *([1] * (w.dim() - 1)))
            w.copy_(torch.randn(w.shape, generator=gen) * std * m)
            owner = model.get_submodule(name.rpartition(".")[0])
            if getattr(owner, "bias", None) is not None:
                owner.bias.zero_()


# ---- wire format of a ZO round --------------------------------------------------------------------------
@dataclass
class UpdateRecord:
    """One round's update (docs/zo.md §6 step 4): ``S (u32) | lr (f32) | g_1..g_K (f32)`` = 4K + 8 bytes."""

    seed: int
    lr: float
    scalars: np.ndarray


@dataclass
class ZOTrainIns:
    """Server -> client. ``b"TZO1" | u32 round | u32 S_t | u16 K | f32 mu | u8 estimator | u16 batch |
    u16 n_records | u32 model_len | model (TCW1 sparse weights + mask, first contact only) | records``."""

    round: int
    seed: int
    k: int
    mu: float
    estimator: str
    batch: int
    records: list[UpdateRecord] = field(default_factory=list)
    weights: dict[str, torch.Tensor] | None = None  # first contact only
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_travels: bool = False

    MAGIC = b"TZO1"
    HEAD = "<4sIIHfBHHI"

    def to_bytes(self) -> bytes:
        model = codec.encode(self.weights, self.masks, True) if self.weights is not None else b""
        head = struct.pack(self.HEAD, self.MAGIC, self.round, self.seed, self.k, self.mu,
                           ESTIMATOR_CODES[self.estimator], self.batch, len(self.records), len(model))
        recs = b"".join(struct.pack("<If", r.seed, r.lr) + np.asarray(r.scalars, "<f4").tobytes() for r in self.records)
        return head + model + recs

    @classmethod
    def from_bytes(cls, data: bytes, known_masks: dict[str, torch.Tensor]) -> ZOTrainIns:
        magic, rnd, seed, k, mu, est, batch, nrec, mlen = struct.unpack_from(cls.HEAD, data)
        if magic != cls.MAGIC:
            raise ValueError("not a ZO round instruction")
        pos = struct.calcsize(cls.HEAD)
        weights, masks = None, dict(known_masks)
        if mlen:
            weights, travelled = codec.decode(data[pos:pos + mlen], known_masks)
            masks.update(travelled)
            pos += mlen
        records = []
        for _ in range(nrec):
            s, lr = struct.unpack_from("<If", data, pos)
            records.append(UpdateRecord(s, lr, np.frombuffer(data, "<f4", k, pos + 8).astype(np.float32)))
            pos += 8 + 4 * k
        estimator = {v: n for n, v in ESTIMATOR_CODES.items()}[est]
        return cls(rnd, seed, k, mu, estimator, batch, records, weights, masks, bool(mlen))


@dataclass
class ZOTrainRes:
    """Client -> server, exactly docs/zo.md §6 step 2: ``round u32 | n u32 | loss f32 | g_1..g_K f32``
    (4K + 12 bytes; the sender is known to the transport, so no client id travels)."""

    client_id: int
    round: int
    num_examples: int
    loss: float
    scalars: np.ndarray

    def to_bytes(self, masks: dict | None = None) -> bytes:
        return struct.pack("<IIf", self.round, self.num_examples, self.loss) + np.asarray(self.scalars, "<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, masks: dict | None = None) -> ZOTrainRes:
        rnd, n, loss = struct.unpack_from("<IIf", data)
        return cls(-1, rnd, n, loss, np.frombuffer(data, "<f4", offset=12).astype(np.float32))


@dataclass
class _Device:
    """What one client holds between rounds: the model it received once, its active weights, its mask."""

    state: dict[str, torch.Tensor]
    masks: Masks
    w: np.ndarray


def active_view(model: nn.Module, masks: Masks) -> ActiveWeights:
    """Canonical active weights: ``model.parameters()`` order, prunable weights under their mask, others whole."""
    named = list(model.named_parameters())
    return ActiveWeights([p.data for _, p in named], [masks.get(n) for n, _ in named])


def _options(cfg_opts: dict[str, Any]) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    unknown = set(cfg_opts) - set(DEFAULTS) - {"n_shots"}
    if unknown:
        raise ToolchainError(f"unknown ntk-zo option(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(DEFAULTS)}")
    opts.update(cfg_opts)
    opts["estimator"] = str(opts["estimator"]).replace("-", "_")
    if opts["mask"] not in MASK_KINDS:
        raise ToolchainError(f"mask={opts['mask']} is not one of {', '.join(MASK_KINDS)}")
    if opts["estimator"] not in ESTIMATOR_CODES:
        raise ToolchainError(f"estimator={opts['estimator']} is not one of forward, central, one-point")
    if opts["lr_schedule"] not in SCHEDULES:
        raise ToolchainError(f"lr_schedule={opts['lr_schedule']} is not one of {', '.join(SCHEDULES)}")
    for key in ("K", "T", "ntk_samples", "ntk_batch"):
        opts[key] = int(opts[key])
        if not 1 <= opts[key] < 65536:
            raise ToolchainError(f"{key} must be in [1, 65535], got {opts[key]}")
    for key in ("mu", "lr", "lr_gamma", "lr_final", "clip", "eps", "ntk_min_layer"):
        opts[key] = float(opts[key])
    if not opts["mu"] > 0:
        raise ToolchainError("mu must be positive")
    if opts["ntk_objective"] not in ntk.OBJECTIVES:
        raise ToolchainError(f"ntk_objective={opts['ntk_objective']} is not one of {', '.join(ntk.OBJECTIVES)}")
    if opts["init"] not in ("sparse-kaiming", "model"):
        raise ToolchainError(f"init={opts['init']} is not one of sparse-kaiming, model")
    opts["stream"] = opts["stream"] not in (False, 0, "0", "false", "False")
    return opts


class NTKZeroOrder(Strategy):
    """Federated NTK foresight pruning, then federated forward-only training of the kept weights."""

    name = "ntk-zo"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts = _options(cfg.algo_options)
        self.batch = int(self.opts["batch"] or cfg.batch_size)
        self.master_seed = derive(cfg.seed & 0xFFFFFFFF, 0x5A0)  # round seeds S_t = derive(master, t)
        self._log: list[UpdateRecord] = []
        self._synced: dict[int, int] = {}  # server: records each client already holds
        self._round_seed: dict[int, int] = {}
        self._devices: dict[int, _Device] = {}  # client side: each simulated device's own state
        self._active: ActiveWeights | None = None
        self.macs_per_sample = 0
        self.prune_log: list[dict[str, float]] = []

    # ---- server: masks ---------------------------------------------------------------------------------
    @property
    def ntk_mask(self) -> bool:
        return self.opts["mask"] in ("ntk", "ntk-datafree")

    def initial_masks(self, model: nn.Module, ctx: ServerContext) -> Masks:
        self.in_shape = tuple(model.arch["in_shape"]) if hasattr(model, "arch") else tuple(ctx.server_x.shape[1:])
        kind, rho = self.opts["mask"], self.cfg.density
        if kind == "random":
            return random_masks(model, rho, torch.Generator().manual_seed(self.cfg.seed))
        if kind == "snip":
            # SNIP on the server's small labelled set (the engine's few-shot set, else its server batch)
            x, y = ctx.extra.get("fewshot", (ctx.server_x, ctx.server_y))
            return snip_masks(model, x, y, rho)
        return dense_masks(model)  # dense, or NTK masks pruned during round 1's setup exchanges

    def setup_steps(self, rnd: int) -> int:
        return self.opts["T"] if rnd == 1 and self.ntk_mask else 0

    def configure_setup(self, rnd: int, step: int, client_ids: list[int]) -> dict[int, ntk.PruneIns]:
        bits = ntk.masks_to_bits(self.masks, prunable_names(self.model))
        ins = ntk.PruneIns(derive(self.master_seed, 0x4E544B), step + 1, self.opts["ntk_samples"],
                           self.opts["ntk_batch"], self.opts["eps"], self.opts["mask"] == "ntk-datafree", bits,
                           self.opts["ntk_objective"])
        return {cid: ins for cid in client_ids}

    def client_setup(self, ins: ntk.PruneIns, data: ClientData, model: nn.Module,
                     generator: torch.Generator) -> ntk.PruneRes:
        shape = tuple(data.x.shape[1:])
        # data-free: the client's data is never read (not even its size); weights are then uniform
        res = ntk.client_prune_step(ins, model, lambda: ntk.client_inputs(
            ins, None if ins.datafree else data.x, shape, data.cid, generator), data.cid)
        res.n = 1 if ins.datafree else len(data.y)
        return res

    def aggregate_setup(self, rnd: int, step: int, results: list[ntk.PruneRes]) -> dict[str, float]:
        names = prunable_names(self.model)
        scores = ntk.aggregate_scores(results, [r.n for r in results], self.masks, names)
        target = ntk.schedule(self.cfg.density, self.opts["T"])[step]
        self.set_masks(ntk.prune_step(self.masks, scores, target, self.opts["ntk_min_layer"]))
        self._active = None
        kept = sum(int(m.sum()) for m in self.masks.values())
        self.prune_log.append({"tau": step + 1, "target": target, "kept": kept})
        return {"prune_steps": step + 1, "prune_target_density": target}

    # ---- server: ZO rounds -------------------------------------------------------------------------------
    def _server_active(self) -> ActiveWeights:
        if self._active is None:
            if self.opts["init"] == "sparse-kaiming" and not self._synced:  # before any client holds the model
                sparse_kaiming_(self.model, self.masks, derive(self.master_seed, 0x1A17))
                apply_masks(self.model, self.masks)
            self._active = active_view(self.model, self.masks)
            self.macs_per_sample = sparse_forward_macs(self.model, self.masks, self.in_shape)
        return self._active

    def configure_train(self, rnd: int, client_ids: list[int]) -> dict[int, ZOTrainIns]:
        self._server_active()
        seed = derive(self.master_seed, rnd)
        self._round_seed[rnd] = seed
        o = self.opts
        out = {}
        for cid in client_ids:
            first = cid not in self._synced
            records = [] if first else self._log[self._synced[cid]:]
            self._synced[cid] = len(self._log)  # the model sent at first contact already holds every update
            out[cid] = ZOTrainIns(rnd, seed, o["K"], o["mu"], o["estimator"], self.batch, records,
                                  float_state(self.model) if first else None, self.masks, first)
        return out

    def aggregate_train(self, rnd: int, results: list[ZOTrainRes]) -> dict[str, float]:
        agg = aggregate([ClientReply(r.scalars, float(r.loss), r.num_examples) for r in results])
        g = agg.scalars
        if self.opts["clip"] > 0:
            # stateless server-side clipping: the clipped scalars are what is broadcast, so all parties agree
            g = np.clip(g, -self.opts["clip"], self.opts["clip"]).astype(np.float32)
        lr = learning_rate(rnd - 1, self.opts["lr"], self.opts["lr_schedule"], total=self.cfg.rounds,
                           gamma=self.opts["lr_gamma"], final=self.opts["lr_final"])
        seed = self._round_seed.pop(rnd)
        apply_update_torch(self._server_active(), seed, lr, g)
        self._log.append(UpdateRecord(seed, lr, g.copy()))
        passes = forward_passes(self.opts["estimator"], self.opts["K"])
        samples = sum(r.num_examples for r in results)
        return {"train_loss": agg.loss, "zo_lr": lr, "forward_passes": passes * len(results),
                "sample_forwards": passes * samples, "flops": 2 * self.macs_per_sample * passes * samples,
                "active_weights": self._active.size if self._active else 0}

    def device_memory(self, rnd: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> MemoryReport:
        # A forward-only client can stream its mini-batch one sample at a time (the loss is a sum), so its
        # activation peak is that of one sample unless ``stream=0``.
        xb = x[:1] if self.opts["stream"] else x
        return forward_only_memory(model, self.masks, xb, 4 * self.opts["K"], device_graph(model))

    def update_log(self) -> list[UpdateRecord]:
        """Every round's broadcast update so far (what a late client replays)."""
        return list(self._log)

    # ---- client side ------------------------------------------------------------------------------------
    def client_apply(self, ins: ZOTrainIns, cid: int, model: nn.Module) -> _Device:
        """Take the model (first contact) and replay the update records, all on the device's own copy."""
        dev = self._devices.get(cid)
        if ins.weights is not None:
            model.load_state_dict(ins.weights, strict=False)
            dev = _Device({k: v.clone() for k, v in ins.weights.items()}, dict(ins.masks),
                          active_view(model, ins.masks).gather())
            self._devices[cid] = dev
        if dev is None:
            raise RuntimeError(f"client {cid} has no model: it must receive one at first contact")
        for rec in ins.records:
            apply_update(dev.w, rec.seed, rec.lr, rec.scalars)
        return dev

    def client_weights(self, cid: int) -> np.ndarray:
        """The device's current active weights (a copy), e.g. to check it matches the server."""
        return self._devices[cid].w.copy()

    def client_train(self, ins: ZOTrainIns, data: ClientData, model: nn.Module,
                     generator: torch.Generator) -> ZOTrainRes:
        dev = self.client_apply(ins, data.cid, model)
        model.load_state_dict(dev.state, strict=False)
        active = active_view(model, dev.masks)
        active.scatter(dev.w)
        model.eval()  # BN as a fixed affine map, as on a device running the folded int8/float graph
        take = torch.randperm(len(data.y), generator=generator)[:ins.batch]
        xb, yb = data.x[take], data.y[take]

        def loss() -> float:
            with torch.no_grad():
                return float(F.cross_entropy(model(xb), yb))

        reply = estimate_torch(loss, active, ins.seed, ins.k, ins.mu, ins.estimator, n=len(take))
        return ZOTrainRes(data.cid, ins.round, reply.n, reply.loss, reply.scalars)
