"""Split a training set over N simulated clients: IID, Dirichlet(alpha) label skew, or k shards each."""

from __future__ import annotations

import numpy as np

from toolchain.contracts.errors import ToolchainError


def iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    idx = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(idx, n_clients)]


def dirichlet(labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator,
              min_size: int = 10, max_tries: int = 100) -> list[np.ndarray]:
    """Per class, split its samples over clients with proportions ~ Dir(alpha) (the FedML ``hetero``
    split); redraw until every client holds at least ``min_size`` samples."""
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ToolchainError(f"Dirichlet split with alpha={alpha} left a client with fewer than {min_size} samples "
                         f"after {max_tries} draws; use fewer clients or a larger --alpha")


def shards(labels: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into ``n_clients * k`` shards, deal ``k`` random shards to each client."""
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_clients * k)
    deal = rng.permutation(len(pieces))
    return [np.sort(np.concatenate([pieces[j] for j in deal[i * k:(i + 1) * k]])) for i in range(n_clients)]


def partition(labels: np.ndarray, n_clients: int, scheme: str, seed: int, alpha: float = 0.5,
              shards_per_client: int = 2) -> list[np.ndarray]:
    """Dispatch on ``scheme`` in {"iid", "dirichlet", "shards"}; deterministic for ``seed``."""
    if n_clients < 1 or n_clients > len(labels):
        raise ToolchainError(f"--clients must be between 1 and {len(labels)}, got {n_clients}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return iid(labels, n_clients, rng)
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ToolchainError(f"--alpha must be > 0, got {alpha}")
        return dirichlet(labels, n_clients, alpha, rng)
    if scheme == "shards":
        return shards(labels, n_clients, shards_per_client, rng)
    raise ToolchainError(f"unknown partition '{scheme}'; choose iid, dirichlet or shards")
