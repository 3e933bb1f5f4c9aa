"""A round's clients trained together: one batched step (``torch.func.vmap``) for all sampled clients.

Why: on a GPU, clients that train one after another on 20-sample batches of a 78k-parameter network leave
the device idle; kernel launches, not arithmetic, bound the time. Stacking the round's clients along a new
leading dimension makes every launch do the work of all of them (``bench/fl_grid.py --device cuda``).

How, without a second copy of every strategy's client code: each client's ``client_train`` runs unchanged
in its own thread, one thread at a time, in sampled order. When it calls ``local_train`` the call is handed
over (``local.ROUTE.trainer``) and the thread waits. Once every client has handed over a call or finished,
:func:`train_together` runs the handed-over calls in lockstep and each thread resumes with its own
``LocalResult``. A client that calls ``local_train`` twice meets the others twice; one that never calls it
just finishes.

What equals the sequential engine (``local_train``): each client's generator draws the same batch orders
and augmentations in the same order; SGD (momentum, weight decay) and Adam (amsgrad) follow torch.optim's
updates; BatchNorm running statistics are per client; every step re-zeroes pruned weights and their
optimizer state; the hooks (``lr_fn``, ``extra_loss``, ``grad_hook``, ``mask_update``, ``keep_last_grads``)
are called at the same steps with the client's own values, on the CPU, and the client's model holds its
current weights whenever a hook may read them. What differs: float rounding of the batched kernels
(tests/test_fl_vectorised.py bounds it). Clients with fewer samples stop early (their rows are frozen) and
an epoch's shorter last batch runs as its own group, so unequal data sizes need no padding.
Layers with their own autograd functions batch too: NSConv's standardisation has a vmap rule and its mask is
a per-client buffer; SAP layers switch to a vmappable formulation with the same gradients (``sap_batched``,
toolchain/learning/fl/sap.py). A new custom autograd function must do the same, or vmap would change its
gradients; tests/test_fl_vectorised.py checks FedMef's model.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from toolchain.learning.fl.exchange import SETUP, Dispatch, InProcessExchange, Reply
from toolchain.learning.fl.local import ROUTE, LocalJob, LocalResult, augment_apply, augment_draws
from toolchain.learning.fl.masks import Masks

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which make_optimizer uses


class DeviceData:
    """Client tensors copied to the training device once per run (keyed by the CPU tensor's storage)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._copies: dict[tuple, torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in self._copies:
            self._copies[key] = t.to(self.device)
        return self._copies[key]


@dataclass
class _Lane:
    """One client's row in the batch: its job, step counts, current masks and results."""

    job: LocalJob
    x: torch.Tensor  # on the device
    y: torch.Tensor
    batch: int
    per_epoch: int
    total: int
    masks: Masks
    order: torch.Tensor | None = None
    last_grads: dict[str, torch.Tensor] | None = None
    synced_at: int = -1  # the step at which the client's own model last received the batch's weights
    params: dict[str, nn.Parameter] = field(default_factory=dict)


class _Layout:
    """Where each parameter lives in one flat (clients, numel) tensor: the optimizer then updates every
    parameter of every client in a handful of kernels, not a handful per parameter (launches bound a GPU here)."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes = {n: p.shape for n, p in model.named_parameters()}
        self.slices: dict[str, slice] = {}
        offset = 0
        for n, shape in self.shapes.items():
            self.slices[n] = slice(offset, offset + shape.numel())
            offset += shape.numel()
        self.numel = offset

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views (clients, *shape) of ``flat`` (clients, numel)."""
        return {n: flat[:, sl].view(flat.shape[0], *self.shapes[n]) for n, sl in self.slices.items()}

    def row(self, flat_row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views of one client's row."""
        return {n: flat_row[sl].view(self.shapes[n]) for n, sl in self.slices.items()}

    def stack(self, per_client: list[dict[str, torch.Tensor]], dtype: torch.dtype, fill: float = 0.0) -> torch.Tensor:
        """(clients, numel) of ``dtype`` from per-client tensors by name; names a client lacks get ``fill``."""
        rows = [torch.cat([t[n].detach().reshape(-1).to(dtype) if n in t else
                           torch.full((sl.stop - sl.start,), fill, dtype=dtype) for n, sl in self.slices.items()])
                for t in per_client]
        return torch.stack(rows)


def train_together(jobs: Sequence[LocalJob], device: torch.device, data: DeviceData) -> list[LocalResult]:
    """Run ``local_train`` for every job in lockstep, batched over clients; results in job order.

    The jobs must come from one strategy (one ``TrainConfig``, one architecture, the same masked tensors)."""
    cfg, k_all = jobs[0].cfg, len(jobs)
    template = copy.deepcopy(jobs[0].model).to("meta").train()  # the structure only; tensors come stacked
    for m in template.modules():
        if hasattr(m, "sap_batched"):
            m.sap_batched = True
    lanes: list[_Lane] = []
    for j in jobs:
        n = len(j.y)
        bs = min(cfg.batch_size, n)
        per_epoch = (n + bs - 1) // bs
        lanes.append(_Lane(j, data(j.x), data(j.y), bs, per_epoch, per_epoch * cfg.local_epochs, dict(j.masks),
                           params=dict(j.model.named_parameters())))
    layout = _Layout(jobs[0].model)
    masked = list(jobs[0].masks)
    dtype = next(jobs[0].model.parameters()).dtype
    W = layout.stack([ln.params for ln in lanes], dtype).to(device).requires_grad_(True)  # every client's weights
    M = layout.stack([ln.masks for ln in lanes], dtype, fill=1.0).to(device)  # 1 where a weight may be nonzero
    buffers = [dict(ln.job.model.named_buffers()) for ln in lanes]
    B = {n: torch.stack([b[n].detach() for b in buffers]).to(device) for n in buffers[0]}  # BN stats, NSConv masks
    state: dict[str, torch.Tensor] = {}  # optimizer state, flat like W
    loss_sum = torch.zeros(k_all, dtype=torch.float64, device=device)  # local_train sums Python floats

    def client_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(template, (p, b), (x,)), y)

    batched_loss = vmap(client_loss)

    def sync(k: int, step: int) -> None:
        """Give client ``k``'s own model the batch's current weights (a hook may read them)."""
        lane = lanes[k]
        if lane.synced_at != step:
            with torch.no_grad():
                for n, v in layout.row(W[k].detach().cpu()).items():
                    lane.params[n].copy_(v)
            lane.synced_at = step

    for step in range(max(ln.total for ln in lanes)):
        active = [k for k, ln in enumerate(lanes) if step < ln.total]
        lr = torch.zeros(k_all, dtype=torch.float64)
        batches: dict[int, tuple[torch.Tensor, Any]] = {}
        for k in active:
            lane, job = lanes[k], lanes[k].job
            if job.lr_fn is not None:
                sync(k, step)
                lr[k] = job.lr_fn(step, lane.total)
            else:
                lr[k] = job.lr
            b = step % lane.per_epoch
            if b == 0:
                lane.order = torch.randperm(len(job.y), generator=job.generator)
            assert lane.order is not None
            idx = lane.order[b * lane.batch:(b + 1) * lane.batch]
            draws = augment_draws(len(idx), cfg.augment, job.generator) if cfg.augment != "none" else None
            batches[k] = (idx, draws)  # on the CPU: each group sends its batches in one copy
        W.grad = None
        P = layout.views(W)  # fresh views each step: the optimizer updates W in place
        total = torch.zeros((), device=device)
        for group in _groups(active, batches):
            total = total + _group_loss(group, k_all, batches, lanes, P, B, cfg.augment, batched_loss, loss_sum)
        extra: dict[int, dict[str, torch.Tensor]] = {}
        for k in active:
            if lanes[k].job.extra_loss is not None:
                extra[k] = _extra_loss_grads(lanes[k], k, step, sync, loss_sum)
        total.backward()
        assert W.grad is not None
        grad = W.grad
        for k, g in extra.items():
            grad[k] += layout.stack([g], dtype)[0].to(device)
        for k in active:
            _client_hooks(lanes[k], k, step, layout, grad, masked, W, M, B, state, sync)
        with torch.no_grad():
            act = torch.zeros(k_all, dtype=torch.bool)
            act[active] = True
            _optimizer_step(cfg, W, grad, M, state, lr.to(device, dtype)[:, None], act.to(device)[:, None], step + 1)
    with torch.no_grad():
        weights = W.detach().cpu()
        for k, lane in enumerate(lanes):
            for n, v in layout.row(weights[k]).items():
                lane.params[n].copy_(v)
            for n, b in lane.job.model.named_buffers():
                b.copy_(B[n][k])
    losses = loss_sum.tolist()
    return [LocalResult(losses[k] / max(ln.total, 1), ln.total, ln.last_grads, ln.masks) for k, ln in enumerate(lanes)]


def _groups(active: list[int], batches: dict[int, tuple[torch.Tensor, Any]]) -> list[list[int]]:
    """Active clients grouped by batch size (vmap needs equal shapes), in client order."""
    by_size: dict[int, list[int]] = {}
    for k in active:
        by_size.setdefault(len(batches[k][0]), []).append(k)
    return list(by_size.values())


def _group_loss(group: list[int], k_all: int, batches: dict[int, tuple[torch.Tensor, Any]], lanes: list[_Lane],
                P: dict[str, torch.Tensor], B: dict[str, torch.Tensor], augment: str,
                batched_loss: Callable, loss_sum: torch.Tensor) -> torch.Tensor:
    """Forward one group of equal-size batches; BN statistics of the group's rows are updated in ``B``."""
    device = loss_sum.device
    idx = torch.stack([batches[k][0] for k in group]).to(device)
    x = torch.stack([lanes[k].x[i] for k, i in zip(group, idx, strict=True)])
    y = torch.stack([lanes[k].y[i] for k, i in zip(group, idx, strict=True)])
    rows = torch.tensor(group, device=device)
    if augment != "none":
        flips = torch.stack([batches[k][1][0] for k in group])
        offsets = batches[group[0]][1][1]
        offsets = torch.stack([batches[k][1][1] for k in group]) if offsets is not None else None
        x = augment_apply(x, flips, offsets)
    if len(group) == k_all:  # every client: the stacked tensors themselves (BN statistics update in place)
        losses = batched_loss(P, B, x, y)
    else:
        p = {n: v.index_select(0, rows) for n, v in P.items()}  # differentiable: grads land in W's rows
        b = {n: v.index_select(0, rows) for n, v in B.items()}
        losses = batched_loss(p, b, x, y)
        for n, v in b.items():
            B[n].index_copy_(0, rows, v)
    with torch.no_grad():
        loss_sum.index_add_(0, rows, losses.detach().to(loss_sum.dtype))
    return losses.sum()


def _extra_loss_grads(lane: _Lane, k: int, step: int, sync: Callable[[int, int], None],
                      loss_sum: torch.Tensor) -> dict[str, torch.Tensor]:
    """A client's regulariser (``extra_loss(model)``) on its own CPU model holding the batch's weights: its
    gradients, to add to the client's row, and its value, added to the client's loss as ``local_train`` does."""
    sync(k, step)
    for p in lane.params.values():
        p.grad = None
    assert lane.job.extra_loss is not None
    value = lane.job.extra_loss(lane.job.model)
    value.backward()
    with torch.no_grad():
        loss_sum[k] += value.detach().to(loss_sum.device, loss_sum.dtype)
    return {n: p.grad for n, p in lane.params.items() if p.grad is not None}


def _client_hooks(lane: _Lane, k: int, step: int, layout: _Layout, grad: torch.Tensor, masked: list[str],
                  W: torch.Tensor, M: torch.Tensor, B: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                  sync: Callable[[int, int], None]) -> None:
    """``local_train``'s per-step calls for one client, with its dense gradients (on the CPU)."""
    job = lane.job
    last = step == lane.total - 1
    if not (job.grad_hook or job.mask_update or (job.keep_last_grads and last)):
        return
    row = layout.row(grad[k].detach().cpu())
    mine = {n: row[n] for n in masked}
    if job.keep_last_grads and last:
        lane.last_grads = {n: g.clone() for n, g in mine.items()}
    if job.grad_hook is not None:
        job.grad_hook(mine)
    if job.mask_update is not None:
        sync(k, step)
        new = job.mask_update(step, lane.total, mine)
        if new is not None:
            lane.masks = new
            with torch.no_grad():
                for n in masked:
                    sl = layout.slices[n]
                    M[k, sl] = new[n].reshape(-1).to(M.device, M.dtype)
                    layer_mask = n.rpartition(".")[0] + ".mask"  # a layer that reads its mask (NSConv: set_mask)
                    if layer_mask in B:
                        B[layer_mask][k] = new[n].to(B[layer_mask].device).reshape(B[layer_mask][k].shape)
                W[k].mul_(M[k])  # local_train's apply_masks and mask_optimizer_state after a mask update
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][k].mul_(M[k])


def _optimizer_step(cfg: Any, W: torch.Tensor, grad: torch.Tensor, M: torch.Tensor, state: dict[str, torch.Tensor],
                    lr: torch.Tensor, active: torch.Tensor, t: int) -> None:
    """One optimizer step on the active rows (``make_optimizer``'s optimizer, update for update), then the
    masking ``local_train`` does after every step: gradients of pruned entries, the weights, their state."""
    g = grad * M
    if cfg.weight_decay:
        g = g + cfg.weight_decay * W
    if cfg.optimizer == "adam":
        b1, b2 = ADAM_BETAS
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(W))
        m = torch.where(active, state["exp_avg"].lerp(g, 1 - b1), state["exp_avg"])
        v = torch.where(active, state["exp_avg_sq"] * b2 + (1 - b2) * g * g, state["exp_avg_sq"])
        vmax = torch.where(active, torch.maximum(state["max_exp_avg_sq"], v), state["max_exp_avg_sq"])
        denom = vmax.sqrt() / (1 - b2 ** t) ** 0.5 + ADAM_EPS
        new = W - (lr / (1 - b1 ** t)) * m / denom
        state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] = m, v, vmax
    elif cfg.momentum:
        buf = state.get("momentum_buffer", torch.zeros_like(W))  # zeros: the first step's buffer is then g
        buf = torch.where(active, buf * cfg.momentum + g, buf)
        state["momentum_buffer"] = buf
        new = W - lr * buf
    else:
        new = W - lr * g
    W.copy_(torch.where(active, new, W) * M)
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].mul_(M)


class _ClientThread(threading.Thread):
    """One client's strategy code, run as a coroutine: it runs only between ``resume`` and its next
    ``submit`` (or its end), so exactly one client thread or the main thread runs at any time."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.job: LocalJob | None = None
        self.result: LocalResult | BaseException | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)

    def run(self) -> None:
        ROUTE.trainer = self
        self._go.acquire()
        try:
            self.value = self.work()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self.error = e
        finally:
            self.done = True
            self._paused.release()

    def submit(self, job: LocalJob) -> LocalResult:  # in this thread, from local_train
        self.job = job
        self._paused.release()
        self._go.acquire()
        result, self.result = self.result, None
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        return result

    def resume(self) -> None:  # in the main thread: let the client run until it submits or ends
        self._go.release()
        self._paused.acquire()


def run_together(work: list[Callable[[], Any]], train: Callable[[list[LocalJob]], list[LocalResult]]) -> list[Any]:
    """Run every client's ``work`` (code that calls ``local_train``), meeting in ``train`` at each call."""
    threads = [_ClientThread(w) for w in work]
    for t in threads:
        t.start()
        t.resume()
    while True:
        waiting = [t for t in threads if not t.done and t.job is not None]
        if not waiting:
            break
        jobs = [t.job for t in waiting]
        try:
            results: list[LocalResult | BaseException] = list(train(jobs))  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - every waiting client gets the error and ends
            results = [e] * len(waiting)
        for t, r in zip(waiting, results, strict=True):
            t.job, t.result = None, r
            t.resume()
    for t in threads:
        t.join()
        if t.error is not None:
            raise t.error
    return [t.value for t in threads]


class VectorisedExchange(InProcessExchange):
    """The in-process transport, with a round's clients trained together on ``device`` (``train_together``).

    Setup exchanges (e.g. FedTiny's candidate selection) run one by one, as in ``InProcessExchange``."""

    def __init__(self, *args: Any, device: str | torch.device = "cpu", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = torch.device(device)
        if self.device.type == "cuda":  # fp32 as on the CPU: cuDNN would otherwise run convolutions in TF32
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.data = DeviceData(self.device)
        self.models: list[nn.Module] = []

    def __call__(self, out: list[Dispatch]) -> dict[int, Reply]:
        if any(d.kind == SETUP for d in out):
            return super().__call__(out)
        while len(self.models) < len(out):
            self.models.append(copy.deepcopy(self.client_model))
        work = []
        for d, model in zip(out, self.models[:len(out)], strict=True):
            ins, data, gen = self.decode(d)
            work.append(lambda ins=ins, data=data, model=model, gen=gen: (ins, self.strategy.client_train(
                ins, data, model, gen)))
        done = run_together(work, self._train)
        return {d.cid: Reply(res.to_bytes(ins.masks), type(res)) for d, (ins, res) in zip(out, done, strict=True)}

    def _train(self, jobs: list[LocalJob]) -> list[LocalResult]:
        return train_together(jobs, self.device, self.data)
