"""Run our federated strategies on Flower (optional extra: ``pip install .[flower]``).

``import toolchain`` never imports ``flwr``: only :mod:`toolchain.learning.flower.apps` (the ServerApp and
ClientApp, run by Flower's processes) does; :mod:`~toolchain.learning.flower.launch` starts those processes.
Engines: ``flower-sim`` (Flower's simulation engine, Ray) and ``flower`` (the deployment engine: a
SuperLink plus one SuperNode per data partition). See docs/flower.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.flower.driver import RunSpec
from toolchain.learning.options import FederatedOptions

ENGINES = ("inprocess", "flower-sim", "flower")


def require_flwr() -> None:
    if importlib.util.find_spec("flwr") is None:
        raise ToolchainError("the Flower engines need the optional extra; install it with "
                             "`pip install -c requirements.lock -e '.[flower]'`")


def make_spec(opts: FederatedOptions, train_limit: int | None = None, test_limit: int | None = None,
              node_timeout: float = 300.0, *, out: str | None = None, **recorded: Any) -> RunSpec:
    """The run spec of ``opts`` writing ``out`` (default: ``opts.out``, as :class:`TrainOptions` has it);
    ``recorded``: more options to record with the run (the engine)."""
    opts.validate()
    out = out if out is not None else getattr(opts, "out", None)
    if out is None:
        raise ToolchainError("a Flower run needs an output folder (out)")
    options = {**dataclasses.asdict(opts), **recorded, "out": out}
    options["per_round"] = opts.per_round or opts.clients
    return RunSpec(options, str(Path(out).resolve()), train_limit, test_limit, node_timeout)


__all__ = ["ENGINES", "make_spec", "require_flwr"]
