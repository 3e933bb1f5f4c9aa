"""Pruning algorithms as federated strategies, by CLI name.

Each entry maps an ``--algo`` name to a :class:`toolchain.learning.fl.Strategy` subclass; adding a method is
adding a module and one line here.
"""

from __future__ import annotations

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.fl.strategy import Strategy
from toolchain.learning.pruning.baselines import SNIP, FedDST, Magnitude, PruneFL, RandomERK, SynFlow
from toolchain.learning.pruning.fedmef import FedMef
from toolchain.learning.pruning.fedtiny import FedTiny
from toolchain.learning.pruning.gmp import GradualMagnitude
from toolchain.learning.pruning.zo_fl import NTKZeroOrder

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


# The option through which each method that allocates a per-layer budget takes it (values: scores.BUDGETS; every
# method's own default is "erk", its paper's). ``--budget`` sets it for whichever method runs (learning/options.py).
BUDGET_OPTION: dict[str, str] = {"random": "budget", "feddst": "budget", "fedmef": "budget", "magnitude": "scope",
                                 "prunefl": "initial_scope", "fedtiny": "candidate_base"}


def make_strategy(name: str, cfg: TrainConfig) -> Strategy:
    if name not in ALGORITHMS:
        raise ToolchainError(f"unknown algorithm '{name}'; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](cfg)
