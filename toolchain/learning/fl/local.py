"""Masked local training on a client: the device side of every sparse strategy."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.fl.masks import Masks, apply_masks, mask_optimizer_state


@dataclass
class LocalResult:
    loss: float
    steps: int
    last_grads: dict[str, torch.Tensor] | None = None  # dense grads of the last mini-batch, if asked
    masks: Masks | None = None  # the masks in force after the last step (changed by ``mask_update``)


@dataclass
class LocalJob:
    """One client's ``local_train`` call, as handed to a trainer that runs several clients together
    (toolchain/learning/fl/vectorised.py). Fields are ``local_train``'s arguments."""

    model: nn.Module
    masks: Masks
    x: torch.Tensor
    y: torch.Tensor
    cfg: TrainConfig
    lr: float
    generator: torch.Generator
    keep_last_grads: bool = False
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
    lr_fn: Callable[[int, int], float] | None = None
    grad_hook: Callable[[dict[str, torch.Tensor]], None] | None = None
    mask_update: Callable[[int, int, dict[str, torch.Tensor]], Masks | None] | None = None


# Where this thread's ``local_train`` calls go: ``ROUTE.trainer`` (an object with ``submit(LocalJob) ->
# LocalResult``) when a vectorised exchange runs this client's strategy code in a thread, else nowhere (train here).
ROUTE = threading.local()


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, amsgrad=True)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_train(model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, lr: float,
                generator: torch.Generator, keep_last_grads: bool = False,
                extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                lr_fn: Callable[[int, int], float] | None = None,
                grad_hook: Callable[[dict[str, torch.Tensor]], None] | None = None,
                mask_update: Callable[[int, int, dict[str, torch.Tensor]], Masks | None] | None = None) -> LocalResult:
    """``cfg.local_epochs`` epochs of masked mini-batch training.

    After every step pruned weights are re-zeroed and their optimizer state reset, so a pruned
    weight can never come back through momentum or weight decay. ``lr_fn(step, total_steps)``
    overrides the learning rate per step (used by budget-aware schedules). ``grad_hook(grads)`` sees the
    dense gradients of the masked tensors after every backward, before they are masked (used by methods
    that accumulate gradient statistics, e.g. PruneFL's squared gradients). ``mask_update(step, total_steps,
    grads)`` may return new masks after a backward (the dense gradients of that mini-batch); the step's update
    and all later ones use them (FedDST's on-device readjustment within local training). ``masks`` is not
    modified; ``LocalResult.masks`` holds the masks in force at the end.

    Inside a vectorised round (``ROUTE.trainer`` set) the call is handed to that trainer, which trains this
    client in one batch with the round's other clients (toolchain/learning/fl/vectorised.py).
    """
    trainer = getattr(ROUTE, "trainer", None)
    if trainer is not None:
        return trainer.submit(LocalJob(model, masks, x, y, cfg, lr, generator, keep_last_grads, extra_loss, lr_fn,
                                       grad_hook, mask_update))
    model.train()
    opt = make_optimizer(model, cfg, lr)
    params = dict(model.named_parameters())
    n = len(y)
    bs = min(cfg.batch_size, n)
    batches_per_epoch = (n + bs - 1) // bs
    total = batches_per_epoch * cfg.local_epochs
    loss_sum, step = 0.0, 0
    last_grads = None
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=generator)
        for b in range(batches_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            if lr_fn is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_fn(step, total)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(augment_batch(x[idx], cfg.augment, generator)), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            if keep_last_grads and step == total - 1:
                last_grads = {k: params[k].grad.detach().clone() for k in masks}
            if grad_hook is not None:
                grad_hook({k: params[k].grad.detach() for k in masks})
            if mask_update is not None:
                new = mask_update(step, total, {k: params[k].grad.detach() for k in masks})
                if new is not None:
                    masks = new
                    apply_masks(model, masks)
                    mask_optimizer_state(opt, model, masks)
            for k, m in masks.items():
                params[k].grad.mul_(m)
            opt.step()
            apply_masks(model, masks)
            mask_optimizer_state(opt, model, masks)
            loss_sum += float(loss.detach())
            step += 1
    return LocalResult(loss_sum / max(step, 1), step, last_grads, masks)


AUGMENTS = ("none", "flip", "flip-crop")


CROP_PAD = 4


@torch.no_grad()
def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The standard CIFAR augmentation on a NCHW batch: a random horizontal flip per image and, for
    ``flip-crop``, a random ``CROP_PAD``-pixel shifted crop (zero padding, i.e. the normalised mean colour
    is not restored: the same as torchvision's RandomCrop(padding=4) on normalised tensors). Draws come
    from the client's generator, so runs stay reproducible."""
    if kind == "none":
        return x
    flip, offsets = augment_draws(len(x), kind, generator)
    return augment_apply(x, flip, offsets)


def augment_draws(n: int, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random draws of ``augment_batch`` for ``n`` images, in its order: per-image flips, then crop offsets
    (``None`` without cropping). Always on the CPU generator, so every device draws the same numbers."""
    if kind not in AUGMENTS or kind == "none":
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {kind!r}")
    flip = torch.rand(n, generator=generator) < 0.5
    off = torch.randint(0, 2 * CROP_PAD + 1, (n, 2), generator=generator) if kind == "flip-crop" else None
    return flip, off


@torch.no_grad()
def augment_apply(x: torch.Tensor, flip: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """Apply drawn flips and crop offsets to ``x`` of shape (..., N, C, H, W), the draws shaped (..., N) and
    (..., N, 2) (leading dimensions: several clients' batches at once). One gather for all the crops."""
    x = torch.where(flip.to(x.device)[..., None, None, None], x.flip(-1), x)
    if offsets is None:
        return x
    lead, (h, w), p = x.shape[:-2], x.shape[-2:], CROP_PAD
    offsets = offsets.to(x.device)
    rows = offsets[..., 0, None] + torch.arange(h, device=x.device)  # (..., N, H): source row of each output row
    cols = offsets[..., 1, None] + torch.arange(w, device=x.device)
    padded = F.pad(x, (p, p, p, p)).gather(-2, rows[..., None, :, None].expand(*lead, h, w + 2 * p))
    return padded.gather(-1, cols[..., None, None, :].expand(*lead, h, w))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None,
             device: str | torch.device | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode; on ``device`` (a copy of the model) if given."""
    model.eval()
    if device is not None and torch.device(device) != next(model.parameters()).device:
        model = copy.deepcopy(model).to(device)
    dev = next(model.parameters()).device
    # On a CPU, small batches: ResNet-8 took 1.0-1.6 s per 1000 CIFAR images at batch 1000 and 0.26 s at batch 100
    # (one thread; at 1000, each layer's 64 MB of activations leaves the caches). A GPU wants the large batch.
    batch_size = batch_size or (1000 if dev.type == "cuda" else 100)
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        out = model(xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return correct / len(y), loss / len(y)
