"""Masked local training on a client: the device side of every sparse strategy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.fl.config import TrainConfig
from toolchain.fl.masks import Masks, apply_masks, mask_optimizer_state


@dataclass
class LocalResult:
    loss: float
    steps: int
    last_grads: dict[str, torch.Tensor] | None = None  # dense grads of the last mini-batch, if asked


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, amsgrad=True)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_train(model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, lr: float,
                generator: torch.Generator, keep_last_grads: bool = False,
                extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                lr_fn: Callable[[int, int], float] | None = None,
                grad_hook: Callable[[dict[str, torch.Tensor]], None] | None = None) -> LocalResult:
    """``cfg.local_epochs`` epochs of masked mini-batch training.

    After every step pruned weights are re-zeroed and their optimizer state reset, so a pruned
    weight can never come back through momentum or weight decay. ``lr_fn(step, total_steps)``
    overrides the learning rate per step (used by budget-aware schedules). ``grad_hook(grads)`` sees the
    dense gradients of the masked tensors after every backward, before they are masked (used by methods
    that accumulate gradient statistics, e.g. PruneFL's squared gradients).
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
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            if keep_last_grads and step == total - 1:
                last_grads = {k: params[k].grad.detach().clone() for k in masks}
            if grad_hook is not None:
                grad_hook({k: params[k].grad.detach() for k in masks})
            for k, m in masks.items():
                params[k].grad.mul_(m)
            opt.step()
            apply_masks(model, masks)
            mask_optimizer_state(opt, model, masks)
            loss_sum += float(loss.detach())
            step += 1
    return LocalResult(loss_sum / max(step, 1), step, last_grads)


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
