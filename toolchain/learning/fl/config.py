"""Run configuration shared by the simulator and every strategy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    rounds: int = 10
    clients: int = 10
    per_round: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" or "adam"
    augment: str = "none"  # "none", "flip" or "flip-crop" (random horizontal flip, + 4-pixel padded random crop)
    lr_decay: float = 1.0  # lr at round t = lr * lr_decay ** (t - 1)
    partition: str = "iid"  # "iid", "dirichlet", "shards"
    alpha: float = 0.5
    shards_per_client: int = 2
    density: float = 0.1
    seed: int = 0
    eval_every: int = 1
    eval_samples: int | None = None  # test samples used for per-round evaluation (None: all)
    # Intra-op threads for torch. One by default: with tiny models the gain of more threads is small,
    # and when other processes share the cores OpenMP spinning made training 10-20x slower (measured).
    threads: int = 1
    algo_options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lr_at(self, rnd: int) -> float:
        return self.lr * self.lr_decay ** (rnd - 1)
