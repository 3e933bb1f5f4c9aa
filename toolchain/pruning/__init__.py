"""Pruning algorithms as federated strategies, by CLI name.

Each entry maps an ``--algo`` name to a :class:`toolchain.fl.Strategy` subclass; adding a method is
adding a module and one line here.
"""

from __future__ import annotations

from toolchain.errors import ToolchainError
from toolchain.fl.config import TrainConfig
from toolchain.fl.strategy import Strategy
from toolchain.pruning.baselines import SNIP, FedDST, Magnitude, PruneFL, RandomERK, SynFlow
from toolchain.pruning.fedmef import FedMef
from toolchain.pruning.fedtiny import FedTiny
from toolchain.pruning.gmp import GradualMagnitude
from toolchain.pruning.zo_fl import NTKZeroOrder

ALGORITHMS: dict[str, type[Strategy]] = {
    "fedavg": Strategy,
    "gmp": GradualMagnitude,
    "ntk-zo": NTKZeroOrder,
    "fedmef": FedMef,
    "fedtiny": FedTiny,
    "random": RandomERK,
    "magnitude": Magnitude,
    "snip": SNIP,
    "synflow": SynFlow,
    "prunefl": PruneFL,
    "feddst": FedDST,
}


def make_strategy(name: str, cfg: TrainConfig) -> Strategy:
    if name not in ALGORITHMS:
        raise ToolchainError(f"unknown algorithm '{name}'; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](cfg)
