"""Masked local training on a client: the device side of every sparse strategy."""

from __future__ import annotations

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
    """
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


@torch.no_grad()
def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on a NCHW batch: a random horizontal flip per image and, for
    ``flip-crop``, a random ``pad``-pixel shifted crop (zero padding, i.e. the normalised mean colour is
    not restored: the same as torchvision's RandomCrop(padding=4) on normalised tensors). Draws come from
    the client's generator, so runs stay reproducible."""
    if kind == "none":
        return x
    if kind not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {kind!r}")
    n, _c, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if kind == "flip-crop":
        padded = F.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
        x = torch.stack([padded[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w] for i in range(n)])
    return x


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(y), loss / len(y)
