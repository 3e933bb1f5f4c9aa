"""Run our federated strategies on Flower (optional extra: ``pip install .[flower]``).

``import toolchain`` never imports ``flwr``; this package imports it only when a Flower engine runs.
Engines: ``flower-sim`` (Flower's simulation engine, Ray) and ``flower`` (the deployment engine: a
SuperLink plus one SuperNode per data partition). See docs/flower.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolchain.errors import ToolchainError

if TYPE_CHECKING:
    from toolchain.flower.driver import RunSpec
    from toolchain.train import TrainOptions

ENGINES = ("inprocess", "flower-sim", "flower")


def require_flwr() -> None:
    if importlib.util.find_spec("flwr") is None:
        raise ToolchainError("the Flower engines need the optional extra; install it with "
                             "`pip install -c requirements.lock -e '.[flower]'`")


def make_spec(opts: TrainOptions, train_limit: int | None = None, test_limit: int | None = None,
              node_timeout: float = 300.0) -> RunSpec:
    from toolchain.flower.driver import RunSpec

    options = dataclasses.asdict(opts)
    options["per_round"] = opts.per_round or opts.clients
    return RunSpec(options, str(Path(opts.out).resolve()), train_limit, test_limit, node_timeout)


def train_flower(opts: TrainOptions, train_limit: int | None = None, test_limit: int | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """``toolchain train`` on a Flower engine (``opts.engine``); writes ``opts.out``, returns the summary."""
    require_flwr()
    from toolchain.flower import launch

    spec = make_spec(opts, train_limit, test_limit)
    if opts.engine == "flower-sim":
        return launch.run_simulation(spec, stream=not opts.quiet, timeout=timeout)
    if opts.engine == "flower":
        if not opts.superlink:
            raise ToolchainError("--engine flower needs --superlink HOST:PORT (the SuperLink's address)")
        # TLS unless asked otherwise: without --superlink-ca, run_deployment refuses unless --insecure was given
        ca, insecure = opts.superlink_ca, opts.insecure
        if ca is not None and not Path(ca).is_file():
            raise ToolchainError(f"--superlink-ca {ca}: no such file; pass the SuperLink's CA certificate (PEM)")
        return launch.run_deployment(spec, opts.superlink, timeout=timeout, stream=not opts.quiet,
                                     root_certificates=ca, insecure=insecure)
    raise ToolchainError(f"unknown engine '{opts.engine}'; choose one of: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "make_spec", "require_flwr", "train_flower"]
