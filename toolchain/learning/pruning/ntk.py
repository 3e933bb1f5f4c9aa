"""Federated NTK foresight pruning (NTK-SAP style saliency, federated sum; docs/ntk-zo.md, algorithms.md §3.2).

Saliency of one party on inputs X (NTK-SAP, Wang et al. 2023):

    R(m) = (1/|X|) sum_x || f(x; theta ⊙ m) - f(x; (theta + eps·Delta) ⊙ m) ||²,   S = | sum_r m ⊙ dR_r/dm |

with theta a *fresh* draw from the model's own initialisation and Delta ~ N(0, I), both seeded by the
server (every client uses the same theta and Delta, so their R's are terms of one global trace), summed
over ``samples`` re-draws r *before* the absolute value (NTK-SAP accumulates ``m.grad`` over its draws and
batches and takes ``abs`` once). E_Delta R ≈ eps² tr Θ(X): R is additive over inputs, hence so is dR/dm, but
not |dR/dm|. So a client uploads its *signed* local saliency m ⊙ dR_i/dm and the server takes the absolute
value of the n-weighted sum (the data-free mode uses Gaussian inputs of the real input shape and weights
clients equally): with every client scoring all its data this is exactly the pooled-data saliency. Pruning
is iterative: T steps with density rho_tau = rho^(tau/T), global top-k over the aggregated scores among the
still-kept weights; the last step keeps exactly ``round(rho·N)``.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from toolchain.contracts.zo import derive
from toolchain.learning.fl.masks import Masks, global_topk, prunable_names

EPS_DEFAULT = 0.01  # NTK-SAP ``ntksap_epsilon``
OBJECTIVES = ("trace", "frobenius")


def reinitialise_(model: nn.Module, seed: int) -> None:
    """Redraw the network as NTK-SAP does, seeded: conv/linear weights Kaiming-normal (fan-in, ReLU gain),
    biases 0, norm layers weight 1 / bias 0. (PyTorch's default init shrinks the signal ~2.4x per ReLU layer,
    which starves the deep layers' saliency and collapsed LeNet-5's classifier.) The global RNG is forked."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def ntk_signed_saliency(model: nn.Module, masks: Masks, x: torch.Tensor, seed: int, eps: float = EPS_DEFAULT,
                        samples: int = 1, objective: str = "trace") -> dict[str, torch.Tensor]:
    """Signed NTK-SAP saliency sum_r m ⊙ dR_r/dm of the prunable weights on inputs ``x`` (NCHW).

    Draw r uses theta and Delta from ``derive(seed, r)``, so every party with the same ``seed`` scores the
    same random network. BN runs in train mode (batch statistics) on a scratch copy: a freshly drawn
    network's running statistics are meaningless (NTK-SAP re-estimates them per draw). ``model`` is untouched.
    Signed, so that parties' values add up to the saliency of the union of their inputs (``aggregate_scores``).

    ``objective``: ``trace`` (NTK-SAP) or ``frobenius`` (``_frobenius_r``: the squared Frobenius norm of the
    party's kernel, a spectrum-type objective that is *not* additive over parties).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    net = copy.deepcopy(model)
    net.train()
    names = [n for n in prunable_names(net) if n in masks]
    scores = {n: torch.zeros_like(masks[n], dtype=torch.float32) for n in names}
    for r in range(samples):
        draw = derive(seed, r)
        reinitialise_(net, draw)
        params = {n: p.detach() for n, p in net.named_parameters()}
        gen = torch.Generator().manual_seed(draw)
        # Delta perturbs the prunable weights only (as NTK-SAP): the kernel of the maskable parameters
        # (drawn for the Frobenius objective too, which does not use it: its v then comes after it in ``gen``)
        delta = {n: torch.randn(params[n].shape, generator=gen) for n in names}
        m = {n: masks[n].to(torch.float32).requires_grad_(True) for n in names}
        buffers = {n: b.clone() for n, b in net.named_buffers()}

        def f(theta: dict[str, torch.Tensor], m: dict[str, torch.Tensor] = m,
              buffers: dict[str, torch.Tensor] = buffers) -> torch.Tensor:
            masked = {n: t * m[n] if n in m else t for n, t in theta.items()}
            return functional_call(net, (masked, buffers), (x,))

        if objective == "frobenius":
            rr = _frobenius_r(f, params, names, x, eps, gen)
        else:
            perturbed = {n: p + eps * delta[n] if n in delta else p for n, p in params.items()}
            rr = (f(params) - f(perturbed)).pow(2).sum() / len(x)
        grads = torch.autograd.grad(rr, [m[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            scores[n] += m[n].detach() * g
    return scores


def _frobenius_r(f: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: dict[str, torch.Tensor],
                 names: Sequence[str], x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """R_F = ||Θ(X) v||² / |X|², v Rademacher over (input, output): E_v R_F = ||Θ(X)||_F² / |X|² = Σλ²/|X|².

    Θ v = J Jᵀ v with Jᵀ v one backward pass (kept differentiable in m) and J(Jᵀ v) a forward finite difference
    with a step h scaled so the perturbation's RMS is ``eps`` (as NTK-SAP's εΔ). Unlike the trace, the square
    couples every pair of inputs: the pooled R_F holds the cross-party blocks of Θ, and the parties' sum holds
    only their diagonal blocks (the "local NTK" approximation, algorithms.md §3.2 b).
    """
    theta = {n: p.requires_grad_(True) if n in names else p for n, p in params.items()}
    out = f(theta)
    v = torch.randint(0, 2, out.shape, generator=gen).to(out.dtype) * 2 - 1
    u = torch.autograd.grad((out * v).sum(), [theta[n] for n in names], create_graph=True)
    rms = torch.sqrt(sum(t.detach().pow(2).sum() for t in u) / sum(t.numel() for t in u))
    h = eps / float(rms.clamp_min(1e-30))  # a constant: the step only sets the finite-difference scale
    shifted = dict(theta)
    for n, t in zip(names, u, strict=True):
        shifted[n] = theta[n] + h * t
    return ((f(shifted) - out) / h).pow(2).sum() / len(x) ** 2


def ntk_saliency(model: nn.Module, masks: Masks, x: torch.Tensor, seed: int, eps: float = EPS_DEFAULT,
                 samples: int = 1, objective: str = "trace") -> dict[str, torch.Tensor]:
    """NTK-SAP saliency |sum_r m ⊙ dR_r/dm| of the prunable weights on inputs ``x`` (``ntk_signed_saliency``)."""
    return {n: s.abs() for n, s in ntk_signed_saliency(model, masks, x, seed, eps, samples, objective).items()}


def jaccard(a: Masks, b: Masks) -> float:
    """|a ∩ b| / |a ∪ b| over all prunable entries."""
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / max(union, 1)


# ---- wire format of the pruning phase (one exchange per pruning step tau) ------------------------------------
@dataclass
class PruneIns:
    """Server -> client, pruning step ``tau``: ``b"TNK1" | u32 seed | u16 tau | u16 samples | u16 batch |
    f32 eps | u8 flags | bitmap of the current mask (all prunable tensors in order, LSB first)``; flags bit 0 =
    data-free, bit 1 = Frobenius objective (0: trace), other bits 0.

    The receiver knows the architecture, so the bitmap's length is implied; no weights travel (theta is
    redrawn from ``seed``)."""

    seed: int
    tau: int
    samples: int
    batch: int
    eps: float
    datafree: bool
    bits: np.ndarray  # uint8 0/1, concatenated masks
    objective: str = "trace"

    MAGIC = b"TNK1"

    def to_bytes(self) -> bytes:
        head = struct.pack("<4sIHHHfB", self.MAGIC, self.seed, self.tau, self.samples, self.batch, self.eps,
                           int(self.datafree) | (2 if self.objective == "frobenius" else 0))
        return head + np.packbits(self.bits.astype(np.uint8), bitorder="little").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, known_masks: dict | None = None) -> PruneIns:
        magic, seed, tau, samples, batch, eps, flags = struct.unpack_from("<4sIHHHfB", data)
        if magic != cls.MAGIC:
            raise ValueError("not an NTK pruning instruction")
        if flags & ~3:
            raise ValueError(f"unknown NTK pruning flags 0x{flags:02x}")
        bits = np.unpackbits(np.frombuffer(data, np.uint8, offset=struct.calcsize("<4sIHHHfB")), bitorder="little")
        return cls(seed, tau, samples, batch, eps, bool(flags & 1), bits, "frobenius" if flags & 2 else "trace")

    @property
    def masks(self) -> dict:
        return {}  # the simulator records what a client holds; the pruning mask lives in ``bits``


@dataclass
class PruneRes:
    """Client -> server: ``b"TNR1" | u32 client | u32 n | f32 signed saliency m ⊙ dR_i/dm of each currently
    kept weight`` (signed: the server takes |.| of the sum, see ``aggregate_scores``)."""

    client_id: int
    n: int
    scores: np.ndarray  # float32, kept positions in canonical order

    MAGIC = b"TNR1"

    def to_bytes(self, masks: dict | None = None) -> bytes:
        return struct.pack("<4sII", self.MAGIC, self.client_id, self.n) + self.scores.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, masks: dict | None = None) -> PruneRes:
        magic, cid, n = struct.unpack_from("<4sII", data)
        if magic != cls.MAGIC:
            raise ValueError("not an NTK saliency reply")
        return cls(cid, n, np.frombuffer(data, "<f4", offset=12).astype(np.float32))


def masks_to_bits(masks: Masks, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([masks[n].reshape(-1).numpy().astype(np.uint8) for n in names])


def bits_to_masks(bits: np.ndarray, shapes: dict[str, torch.Size]) -> Masks:
    out: Masks = {}
    pos = 0
    for n, s in shapes.items():
        k = int(np.prod(s))
        out[n] = torch.from_numpy(bits[pos:pos + k].astype(bool).copy()).view(s)
        pos += k
    return out


def schedule(rho: float, steps: int) -> list[float]:
    """Exponential density schedule rho_tau = rho^(tau/T), tau = 1..T (the last is exactly rho)."""
    return [rho ** (tau / steps) for tau in range(1, steps + 1)]


def client_inputs(ins: PruneIns, x: torch.Tensor | None, in_shape: tuple[int, ...], cid: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The inputs a client scores on: up to ``batch`` of its samples, or (data-free) Gaussian N(0, I) inputs of
    the real input shape from a client-specific seed, never touching its data."""
    if ins.datafree:
        g = torch.Generator().manual_seed(derive(derive(ins.seed, 1_000_000 + ins.tau), cid))
        return torch.randn((ins.batch, *in_shape), generator=g)
    assert x is not None
    take = torch.randperm(len(x), generator=generator)[:ins.batch]
    return x[take]


def client_prune_step(ins: PruneIns, model: nn.Module, x_fn: Callable[[], torch.Tensor], cid: int) -> PruneRes:
    """Client side of one pruning step: decode the mask, score on ``x_fn()``, reply with the kept entries' signed
    saliencies."""
    names = prunable_names(model)
    params = dict(model.named_parameters())
    masks = bits_to_masks(ins.bits, {n: params[n].shape for n in names})
    x = x_fn()
    sal = ntk_signed_saliency(model, masks, x, derive(ins.seed, ins.tau), ins.eps, ins.samples, ins.objective)
    kept = np.concatenate([sal[n].reshape(-1)[masks[n].reshape(-1)].numpy() for n in names])
    return PruneRes(cid, len(x), kept.astype(np.float32))


def aggregate_scores(results: Sequence[PruneRes], weights: Sequence[float], masks: Masks,
                     names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Server: |weighted sum| (float64, in list order) of the clients' signed kept-entry saliencies, as full
    tensors with pruned entries at -1 (below any saliency, so they can never be re-selected).

    The absolute value is taken after the sum: R is additive over inputs, so sum_i p_i m ⊙ dR_i/dm is the
    gradient of the n-weighted union's R, while sum_i p_i |m ⊙ dR_i/dm| (its upper bound) is not a saliency
    of any input set (in a probe, step 1 of LeNet-5 with 10 Dirichlet-0.1 clients, the clients' signs disagreed
    on 10-40 % of a layer's weights)."""
    total = float(sum(weights))
    acc = np.zeros(results[0].scores.size, np.float64)
    for r, w in zip(results, weights, strict=True):
        acc += (w / total) * r.scores.astype(np.float64)
    acc = np.abs(acc)
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for n in names:
        m = masks[n].reshape(-1)
        full = torch.full((m.numel(),), -1.0, dtype=torch.float64)
        k = int(m.sum())
        full[m] = torch.from_numpy(acc[pos:pos + k])
        pos += k
        out[n] = full.view(masks[n].shape)
    return out


def layer_floors(masks: Masks, min_layer: float) -> dict[str, int]:
    """Per-layer minimum kept count: ``min(n_l, max(out_l, round(min_layer * n_l)))`` (0 when ``min_layer`` is 0).

    A guard against layer collapse (a fully pruned layer disconnects the network: chance accuracy and a zero
    ZO gradient); NTK-SAP itself has none. On LeNet-5 at density 0.1 plain NTK-SAP kept 0-0.4 % of fc2.
    """
    if min_layer <= 0:
        return {n: 0 for n in masks}
    return {n: min(m.numel(), max(m.shape[0], round(min_layer * m.numel()))) for n, m in masks.items()}


def prune_step(masks: Masks, scores: dict[str, torch.Tensor], target: float, min_layer: float = 0.0) -> Masks:
    """Global top-k of ``scores`` at density ``target`` (pruned entries carry -1 and stay pruned), after first
    reserving each layer's best ``layer_floors`` entries among its kept ones. Keeps exactly ``round(target·N)``."""
    total = sum(m.numel() for m in masks.values())
    keep = max(1, int(round(target * total)))
    floors = layer_floors(masks, min_layer)
    # reserved entries get +inf so the global ranking takes them first; the count stays exact
    boosted = {}
    for n, s in scores.items():
        k = min(floors[n], int(masks[n].sum()))
        flat = s.detach().flatten().double().clone()
        if k > 0:
            flat[torch.argsort(flat, descending=True, stable=True)[:k]] = float("inf")
        boosted[n] = flat.view(s.shape)
    return global_topk(boosted, keep / total)


def centralised_ntk_masks(model: nn.Module, x_fn: Callable[[int], torch.Tensor], density: float, steps: int,
                          seed: int, eps: float = EPS_DEFAULT, samples: int = 1, min_layer: float = 0.0,
                          objective: str = "trace") -> Masks:
    """Single-party iterative NTK-SAP (e.g. on pooled data, the reference the federated masks approximate).

    ``x_fn(tau)`` gives the inputs of step tau. Uses the same seeds as the federated protocol.
    """
    names = prunable_names(model)
    params = dict(model.named_parameters())
    masks: Masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    for tau, target in enumerate(schedule(density, steps), start=1):
        sal = ntk_saliency(model, masks, x_fn(tau), derive(seed, tau), eps, samples, objective)
        scores = {n: torch.where(masks[n], sal[n].double(), torch.full_like(sal[n], -1.0, dtype=torch.float64))
                  for n in names}
        masks = prune_step(masks, scores, target, min_layer)
    return masks
