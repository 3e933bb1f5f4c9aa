"""The options of one federated run: declared once, validated once, shared by build, train, Flower and the CLI.

:class:`FederatedOptions` is what a user chooses about a federated pruning run (algorithm, model, data, density,
clients, rounds, local optimiser, partition, seed). ``toolchain build`` (:class:`toolchain.pipelines.build.BuildOptions`)
and ``toolchain train`` (:class:`toolchain.pipelines.train.TrainOptions`) extend it with their own options and
their own defaults (:data:`BUILD_DEFAULTS`, :data:`TRAIN_DEFAULTS`); the Flower apps rebuild it from a run config;
the CLI declares its flags from :data:`FLAGS` with :func:`add_arguments` and reads them back with :func:`from_args`.
The engine's own configuration (:class:`~toolchain.learning.fl.config.TrainConfig`) is derived, never typed twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.pruning import ALGORITHMS, BUDGET_OPTION
from toolchain.learning.pruning.scores import BUDGETS
from toolchain.models.zoo import MODELS

OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("iid", "dirichlet", "shards")


@dataclass(kw_only=True)
class FederatedOptions:
    algo: str = "gmp"
    model: str | None = None  # None: build picks the largest that fits the board
    dataset: str = "mnist"
    data: str | None = None  # a folder with the dataset files; None: the embedded MNIST
    density: float = 0.1
    clients: int = 10
    per_round: int | None = None  # None: all clients
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.08
    optimizer: str = "sgd"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    threads: int = 1
    eval_samples: int | None = None  # test samples for per-round evaluation; None: all
    # Per-layer budget of the methods in BUDGET_OPTION. "equal", not the papers' "erk": on the acceptance protocol
    # (LeNet-5, MNIST, 5 rounds, 3 seeds) every such method gained 15-21 points at 1 % and ~1 at 5 % (docs/training.md).
    budget: str = "equal"
    quiet: bool = False
    algo_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`ToolchainError` (one line: what is wrong, how to fix it) for a bad option."""
        if self.algo not in ALGORITHMS:
            raise ToolchainError(f"unknown algorithm '{self.algo}'; choose one of: {', '.join(ALGORITHMS)}")
        if not 0.0 < self.density <= 1.0:
            raise ToolchainError(f"--density must be in (0, 1], got {self.density}; e.g. --density 0.1 keeps 10 % "
                                 "of weights")
        for name, value in (("--clients", self.clients), ("--rounds", self.rounds),
                            ("--local-epochs", self.local_epochs), ("--batch-size", self.batch_size),
                            ("--threads", self.threads)):
            if value < 1:
                raise ToolchainError(f"{name} must be at least 1, got {value}")
        if self.per_round is not None and not 1 <= self.per_round <= self.clients:
            raise ToolchainError(f"--per-round must be between 1 and --clients ({self.clients}), got {self.per_round}")
        if not self.lr >= 0:  # 0 is allowed: a run that does not learn (the chance-level checks use it)
            raise ToolchainError(f"--lr must be at least 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ToolchainError(f"unknown optimizer '{self.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
        if self.partition not in PARTITIONS:
            raise ToolchainError(f"unknown partition '{self.partition}'; choose one of: {', '.join(PARTITIONS)}")
        if not self.alpha > 0:
            raise ToolchainError(f"--alpha must be positive, got {self.alpha}")
        if self.model is not None and self.model not in MODELS:
            raise ToolchainError(f"unknown model '{self.model}'; choose one of: {', '.join(MODELS)}")
        if self.budget not in BUDGETS:
            raise ToolchainError(f"unknown budget '{self.budget}'; choose one of: {', '.join(BUDGETS)}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ToolchainError(f"--eval-samples must be at least 1, got {self.eval_samples}")

    def train_config(self) -> TrainConfig:
        """The engine's configuration for these options."""
        return TrainConfig(rounds=self.rounds, clients=self.clients, per_round=self.per_round or self.clients,
                           local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                           optimizer=self.optimizer, partition=self.partition, alpha=self.alpha,
                           density=self.density, seed=self.seed, eval_samples=self.eval_samples,
                           threads=self.threads, algo_options=self.method_options())

    def method_options(self) -> dict[str, Any]:
        """``algo_options`` with ``budget`` passed to the method's own option (an explicit ``--algo-opt`` wins);
        the papers' ``erk`` is every method's own default, so it adds nothing."""
        opts = dict(self.algo_options)
        key = BUDGET_OPTION.get(self.algo)
        if key is not None and self.budget != "erk":
            opts.setdefault(key, self.budget)
        return opts


# Each command's defaults where they differ from the field defaults above. build: gmp with SGD 0.08, batch 64,
# 5 rounds (a 96 % MNIST model in about a minute at density 0.1). train: Adam (AMSGrad) 0.01, batch 32, 20 rounds,
# LeNet-5: with them every method leaves chance at 1-5 % density (docs/training.md "Defaults").
BUILD_DEFAULTS: dict[str, Any] = {"eval_samples": 2000}
TRAIN_DEFAULTS: dict[str, Any] = {"model": "lenet5", "rounds": 20, "batch_size": 32, "lr": 0.01, "optimizer": "adam"}


@dataclass(frozen=True)
class Flag:
    flag: str
    help: str
    type: Any = None
    choices: tuple[str, ...] | None = None


def fraction(text: str) -> float:
    """A float option whose bad value gets argparse's one-line error (every command's float options)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


# FederatedOptions field -> its command-line flag ("algo" is added by each command: required for train)
FLAGS: dict[str, Flag] = {
    "dataset": Flag("--dataset", "mnist (embedded), fashion-mnist, cifar10"),
    "data": Flag("--data", "folder with the dataset files (default: the embedded MNIST)"),
    "density": Flag("--density", "fraction of prunable weights kept, in (0, 1]", fraction),
    "clients": Flag("--clients", "number of simulated clients", int),
    "per_round": Flag("--per-round", "clients sampled per round (default: all)", int),
    "rounds": Flag("--rounds", "federated rounds", int),
    "local_epochs": Flag("--local-epochs", "local epochs per client per round", int),
    "batch_size": Flag("--batch-size", "local mini-batch size", int),
    "lr": Flag("--lr", "local learning rate", fraction),
    "optimizer": Flag("--optimizer", "local optimizer", None, OPTIMIZERS),
    "partition": Flag("--partition", "client data split (default: iid, or dirichlet when --alpha is given)", None,
                      PARTITIONS),
    "alpha": Flag("--alpha", "Dirichlet concentration (smaller = more skewed)", fraction),
    "seed": Flag("--seed", "seed of the data split, initial weights and sampling", int),
    "threads": Flag("--threads", "torch intra-op threads", int),
    "model": Flag("--model", "zoo model"),
    "eval_samples": Flag("--eval-samples", "test samples for per-round evaluation (all when unset)", int),
    "budget": Flag("--budget", "kept weights per layer for " + ", ".join(BUDGET_OPTION) + ": equal (the same count "
                   "in every layer) or erk (the papers' setting); docs/training.md", None, BUDGETS),
}
_DEFAULT_FROM_OTHERS = ("partition", "alpha")  # resolved together in from_args: --alpha alone means dirichlet


def add_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any], model_help: str,
                  skip: tuple[str, ...] = ()) -> None:
    """Declare the federated options on ``parser`` with a command's ``defaults`` (see :data:`BUILD_DEFAULTS`)."""
    base = {f.name: f.default for f in dataclasses.fields(FederatedOptions) if f.default is not dataclasses.MISSING}
    base.update(defaults)
    for name, spec in FLAGS.items():
        if name in skip:
            continue
        default = None if name in _DEFAULT_FROM_OTHERS else base.get(name)
        kwargs: dict[str, Any] = {"default": default, "help": model_help if name == "model" else spec.help}
        if spec.type is not None:
            kwargs["type"] = spec.type
        if spec.choices is not None:
            kwargs["choices"] = spec.choices
        if name == "data":
            kwargs["metavar"] = "DIR"
        parser.add_argument(spec.flag, **kwargs)
    parser.add_argument("--algo-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="algorithm option, repeatable (e.g. prune_end=4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def algo_options(pairs: list[str]) -> dict[str, Any]:
    """``--algo-opt KEY=VALUE`` pairs; values are JSON where they parse (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ToolchainError(f"--algo-opt expects KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`FederatedOptions` fields given on a command line declared by :func:`add_arguments`."""
    kw = {name: getattr(args, name) for name in FLAGS if hasattr(args, name) and name not in _DEFAULT_FROM_OTHERS}
    kw["partition"] = args.partition or ("dirichlet" if args.alpha is not None else "iid")
    kw["alpha"] = args.alpha if args.alpha is not None else 0.5
    kw["algo"] = args.algo
    kw["quiet"] = args.quiet
    kw["algo_options"] = algo_options(args.algo_opt)
    return kw
