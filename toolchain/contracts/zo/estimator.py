"""ZO estimators, server aggregation and the seed-trick update over the active weights (docs/zo.md).

Everything works on a flat ``float32`` vector of the active (kept) trainable weights in canonical
order; :class:`ActiveWeights` maps a list of torch tensors + masks to and from that vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from toolchain.contracts.zo.prng import derive, signs

EstimatorKind = Literal["forward", "central", "one_point"]
ScheduleKind = Literal["constant", "cosine", "exponential"]
ESTIMATORS: tuple[str, ...] = ("forward", "central", "one_point")


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float."""
    return float(np.float32(x))


@dataclass(frozen=True)
class ClientReply:
    """What a client uploads in one round: K float32 scalars, its round loss and its sample count."""

    scalars: np.ndarray
    loss: float
    n: int


def _check_vector(w: np.ndarray) -> None:
    if not (isinstance(w, np.ndarray) and w.dtype == np.float32 and w.ndim == 1):
        raise TypeError("active weights must be a 1-D numpy float32 array")


def perturb_(w: np.ndarray, key: int, scale: float, offset: int = 0) -> None:
    """In place ``w += f32(scale) * z`` (z = signs of ``key`` from canonical position ``offset``)."""
    _check_vector(w)
    w += np.float32(scale) * signs(key, w.size, offset)


def estimate(
    loss_fn: Callable[[np.ndarray], float],
    w: np.ndarray,
    seed: int,
    k: int,
    mu: float,
    estimator: EstimatorKind = "forward",
    n: int = 1,
) -> ClientReply:
    """A client's K ZO scalars for round ``seed`` (``w`` itself is never modified).

    ``loss_fn`` gets a perturbed float32 copy, ``w + f32(mu) z_k`` (central: also
    ``(w + f32(mu) z_k) - 2 f32(mu) z_k``), and returns the loss. Scalars:
    forward ``(L(w+mu z) - L(w)) / mu``, central ``(L(w+mu z) - c) / mu`` with the midpoint
    ``c = (L(w+mu z) + L(w-mu z)) / 2`` (= the usual ``(L+ - L-) / 2mu``), one-point
    ``L(w+mu z) / mu``; computed in float64, sent as float32. The reply's loss is ``L(w)`` for
    forward and the mean of the perturbed losses otherwise (monitoring only).
    """
    _check_vector(w)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
    if k < 1 or not mu > 0:
        raise ValueError("need k >= 1 and mu > 0")
    m = f32(mu)
    out = np.empty(k, dtype=np.float32)
    l0 = float(loss_fn(w.copy())) if estimator == "forward" else 0.0
    total = 0.0
    for j in range(k):
        step = np.float32(m) * signs(derive(seed, j), w.size)
        wp = w + step
        lp = float(loss_fn(wp))
        if estimator == "central":
            # L- at (w + mu z) - 2 mu z, and the midpoint form, exactly as devices do it in place
            c = (lp + float(loss_fn(wp - np.float32(2) * step))) / 2
            out[j] = (lp - c) / m
            total += c
        else:
            out[j] = (lp - l0) / m if estimator == "forward" else lp / m
            total += lp
    return ClientReply(out, l0 if estimator == "forward" else total / k, int(n))


def aggregate(replies: Sequence[ClientReply]) -> ClientReply:
    """Server: n-weighted mean of the clients' scalars and losses (float64 in list order, then float32)."""
    if not replies:
        raise ValueError("no client replies to aggregate")
    k = replies[0].scalars.size
    if any(r.scalars.size != k for r in replies):
        raise ValueError("clients returned different numbers of scalars")
    n = sum(r.n for r in replies)
    if n <= 0:
        raise ValueError("total sample count must be positive")
    acc = np.zeros(k, dtype=np.float64)
    loss = 0.0
    for r in replies:
        acc += r.n * r.scalars.astype(np.float64)
        loss += r.n * r.loss
    return ClientReply((acc / n).astype(np.float32), loss / n, n)


def coefficients(lr: float, scalars: np.ndarray) -> np.ndarray:
    """Per-direction update coefficients ``a_k = f32(f32(f32(lr) * f32(g_k)) / f32(K))``."""
    g = np.asarray(scalars, dtype=np.float32)
    return (np.float32(lr) * g) / np.float32(g.size)


def apply_update(w: np.ndarray, seed: int, lr: float, scalars: np.ndarray, offset: int = 0) -> None:
    """In place ``w <- w - lr/K sum_k g_k z_k``: for k = 0..K-1 in order, ``w = f32(w - a_k z_k)``.

    Every party that runs this in float32 (or in double rounding to float32 after each step)
    gets bit-identical weights. ``offset`` is the canonical position of ``w[0]`` (a slice of the
    full vector, e.g. one layer).
    """
    _check_vector(w)
    for j, a in enumerate(coefficients(lr, scalars)):
        w -= a * signs(derive(seed, j), w.size, offset)


def learning_rate(
    t: int,
    base: float,
    schedule: ScheduleKind = "constant",
    total: int = 1,
    gamma: float = 0.99,
    final: float = 0.0,
) -> float:
    """Learning rate of round ``t`` (0-based), rounded to float32 (the server broadcasts it).

    constant: ``base``; cosine: ``final + (base-final)(1+cos(pi min(t,total)/total))/2``;
    exponential: ``base * gamma**t``.
    """
    if schedule == "constant":
        lr = base
    elif schedule == "cosine":
        if total < 1:
            raise ValueError("cosine schedule needs total >= 1")
        lr = final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(t, total) / total))
    elif schedule == "exponential":
        lr = base * gamma**t
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use constant, cosine or exponential")
    return f32(lr)


class ActiveWeights:
    """Canonical flat view of the active entries of torch tensors.

    Canonical order: the tensors in the given order, each flattened row-major, keeping only the
    positions where its mask is non-zero (``None`` = all positions, e.g. biases). Writes touch only
    active positions, so masked weights never change.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> None:
        if len(tensors) != len(masks):
            raise ValueError("need one mask (or None) per tensor")
        self.tensors = list(tensors)
        self.index: list[torch.Tensor] = []
        for t, m in zip(self.tensors, masks, strict=True):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError("trainable tensors must be contiguous float32")
            if m is None:
                idx = torch.arange(t.numel())
            else:
                if m.shape != t.shape:
                    raise ValueError(f"mask shape {tuple(m.shape)} != tensor shape {tuple(t.shape)}")
                idx = torch.nonzero(m.reshape(-1) != 0).reshape(-1)
            self.index.append(idx)
        self.size = int(sum(i.numel() for i in self.index))

    def gather(self) -> np.ndarray:
        """A float32 copy of the active weights in canonical order."""
        with torch.no_grad():
            parts = [t.detach().reshape(-1)[i] for t, i in zip(self.tensors, self.index, strict=True)]
            return torch.cat(parts).cpu().numpy().astype(np.float32, copy=True) if parts else np.zeros(0, np.float32)

    def scatter(self, flat: np.ndarray) -> None:
        """Write a canonical float32 vector back into the active positions, in place."""
        if flat.shape != (self.size,):
            raise ValueError(f"expected {self.size} active weights, got shape {flat.shape}")
        src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        pos = 0
        with torch.no_grad():
            for t, i in zip(self.tensors, self.index, strict=True):
                t.view(-1)[i.to(t.device)] = src[pos : pos + i.numel()].to(t.device)
                pos += i.numel()


def estimate_torch(
    loss_fn: Callable[[], float],
    active: ActiveWeights,
    seed: int,
    k: int,
    mu: float,
    estimator: EstimatorKind = "forward",
    n: int = 1,
) -> ClientReply:
    """:func:`estimate` on torch tensors: ``loss_fn()`` evaluates the model as it currently is.

    The tensors are perturbed in place and restored exactly (from a saved copy) afterwards.
    """
    w0 = active.gather()

    def flat_loss(v: np.ndarray) -> float:
        active.scatter(v)
        return float(loss_fn())

    try:
        return estimate(flat_loss, w0, seed, k, mu, estimator, n)
    finally:
        active.scatter(w0)


def apply_update_torch(active: ActiveWeights, seed: int, lr: float, scalars: np.ndarray) -> None:
    """:func:`apply_update` on torch tensors (bit-identical to the numpy path)."""
    w = active.gather()
    apply_update(w, seed, lr, scalars)
    active.scatter(w)
