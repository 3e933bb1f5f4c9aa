"""``toolchain train``: one federated pruning run in simulation, with its metrics, model and plot.

Writes ``metrics.jsonl`` (one JSON object per round), ``summary.json``, ``model.pt`` (arch, weights,
masks) and ``accuracy.png`` into ``--out`` (:mod:`toolchain.learning.run_output`: assembled in a staging
folder, renamed at the end). The engine is ours in process, or Flower's simulation or deployment engine
(docs/flower.md) with the same strategy objects and the same outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.staging import check_out
from toolchain.data.datasets import load_dataset
from toolchain.learning.fl import simulate
from toolchain.learning.flower import ENGINES, launch, make_spec, require_flwr
from toolchain.learning.options import TRAIN_DEFAULTS, FederatedOptions
from toolchain.learning.run_output import quality, write_run
from toolchain.learning.setup import set_up


@dataclass(kw_only=True)
class TrainOptions(FederatedOptions):
    algo: str
    out: str
    model: str | None = TRAIN_DEFAULTS["model"]
    rounds: int = TRAIN_DEFAULTS["rounds"]
    batch_size: int = TRAIN_DEFAULTS["batch_size"]
    lr: float = TRAIN_DEFAULTS["lr"]
    optimizer: str = TRAIN_DEFAULTS["optimizer"]
    engine: str = "inprocess"  # "inprocess", "flower-sim" or "flower" (docs/flower.md)
    superlink: str | None = None  # --engine flower: the SuperLink's HOST:PORT
    superlink_ca: str | None = None  # --engine flower: the SuperLink's CA certificate (TLS)
    insecure: bool = False  # --engine flower: plaintext to the SuperLink, only when asked for
    force: bool = False  # replace a non-empty --out that is not an earlier training run
    # in-process engine: train each round's clients together on this device (cuda, cpu; None: one by one on the
    # CPU). Equal up to float rounding (docs/training.md, "Clients trained together").
    device: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.model is None:
            raise ToolchainError("give --model (`toolchain train` trains one zoo model)")
        if self.engine not in ENGINES:
            raise ToolchainError(f"unknown engine '{self.engine}'; choose one of: {', '.join(ENGINES)}")
        if self.device is not None:
            check_device(self.device, self.engine)
        # before any training: never replace a folder train did not write, and fail now on an unwritable path
        check_out(Path(self.out), "train", self.force, [Path(self.data)] if self.data else [])


def check_device(device: str, engine: str) -> None:
    """``--device``: a torch device this machine has, for the in-process engine."""
    import torch

    if engine != "inprocess":
        raise ToolchainError(f"--device trains clients together in the in-process engine; drop it for --engine {engine}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ToolchainError(f"--device must be a torch device such as cuda, cuda:1 or cpu, got '{device}'") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ToolchainError(f"--device {device}: this machine has no such CUDA device (torch sees "
                             f"{torch.cuda.device_count()}); drop --device to train on the CPU")
    if dev.type not in ("cpu", "cuda"):
        raise ToolchainError(f"--device {device}: only cpu and cuda are supported")


def train(opts: TrainOptions) -> dict[str, Any]:
    opts.validate()
    if opts.engine != "inprocess":  # same strategy objects and outputs, Flower as the transport
        return train_flower(opts)
    data = load_dataset(opts.dataset, opts.data)
    run = set_up(opts, data)
    labels = run.fed.eval_y.numpy()
    return write_run(Path(opts.out), asdict(opts), run.strategy, run.cfg,
                     lambda on_round: simulate(run.strategy, run.model, run.fed, run.cfg, progress=not opts.quiet,
                                               on_round=on_round, clients_device=opts.device),
                     f"{opts.algo} / {opts.model} / {opts.dataset}",
                     verdict=lambda accuracy: quality(accuracy, labels, data.num_classes))


def train_flower(opts: TrainOptions, train_limit: int | None = None, test_limit: int | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """``toolchain train`` on a Flower engine (``opts.engine``); writes ``opts.out``, returns the summary."""
    require_flwr()
    spec = make_spec(opts, train_limit, test_limit)
    if opts.engine == "flower-sim":
        return launch.run_simulation(spec, stream=not opts.quiet, timeout=timeout)
    if opts.engine == "flower":
        if not opts.superlink:
            raise ToolchainError("--engine flower needs --superlink HOST:PORT (the SuperLink's address)")
        # TLS unless asked otherwise: without --superlink-ca, run_deployment refuses unless --insecure was given
        ca = opts.superlink_ca
        if ca is not None and not Path(ca).is_file():
            raise ToolchainError(f"--superlink-ca {ca}: no such file; pass the SuperLink's CA certificate (PEM)")
        return launch.run_deployment(spec, opts.superlink, timeout=timeout, stream=not opts.quiet,
                                     root_certificates=ca, insecure=opts.insecure)
    raise ToolchainError(f"unknown engine '{opts.engine}'; choose one of: {', '.join(ENGINES)}")
