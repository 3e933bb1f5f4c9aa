"""``toolchain train``: one federated pruning run in simulation, with its metrics, model and plot.

Writes ``metrics.jsonl`` (one JSON object per round), ``summary.json``, ``model.pt`` (arch, weights,
masks) and ``accuracy.png`` into ``--out`` (assembled in a temporary folder, renamed at the end).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.datasets import load_dataset
from models.zoo import build_model
from toolchain.errors import ToolchainError
from toolchain.fl import Federation, RoundRecord, TrainConfig, simulate
from toolchain.fl.quality import chance_accuracy, chance_message
from toolchain.fl.simulator import seed_everything
from toolchain.outdir import check_out, replace_dir, staging_dir
from toolchain.pruning import ALGORITHMS, make_strategy


@dataclass
class TrainOptions:
    algo: str
    out: str
    model: str = "lenet5"
    dataset: str = "mnist"
    data: str | None = None
    density: float = 0.1
    clients: int = 10
    per_round: int | None = None
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01  # the CLI's defaults (docs/training.md "Defaults")
    optimizer: str = "adam"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    quiet: bool = False
    eval_samples: int | None = None
    threads: int = 1
    algo_options: dict[str, Any] = field(default_factory=dict)
    engine: str = "inprocess"  # "inprocess", "flower-sim" or "flower" (docs/flower.md)
    superlink: str | None = None  # --engine flower: the SuperLink's HOST:PORT
    superlink_ca: str | None = None  # --engine flower: the SuperLink's CA certificate (TLS)
    insecure: bool = False  # --engine flower: plaintext to the SuperLink, only when asked for
    force: bool = False  # replace a non-empty --out that is not an earlier training run

    def config(self) -> TrainConfig:
        return TrainConfig(rounds=self.rounds, clients=self.clients, per_round=self.per_round or self.clients,
                           local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                           optimizer=self.optimizer, partition=self.partition, alpha=self.alpha,
                           density=self.density, seed=self.seed, eval_samples=self.eval_samples, threads=self.threads,
                           algo_options=dict(self.algo_options))


def _validate(opts: TrainOptions) -> None:
    if opts.algo not in ALGORITHMS:
        raise ToolchainError(f"unknown algorithm '{opts.algo}'; choose one of: {', '.join(ALGORITHMS)}")
    if not 0.0 < opts.density <= 1.0:
        raise ToolchainError(f"--density must be in (0, 1], got {opts.density}")
    if opts.rounds < 1 or opts.clients < 1:
        raise ToolchainError("--rounds and --clients must be at least 1")
    if opts.per_round is not None and not 1 <= opts.per_round <= opts.clients:
        raise ToolchainError(f"--per-round must be between 1 and --clients ({opts.clients}), got {opts.per_round}")
    if opts.engine not in ("inprocess", "flower-sim", "flower"):
        raise ToolchainError(f"unknown engine '{opts.engine}'; choose inprocess, flower-sim or flower")
    # before any training: never replace a folder train did not write, and fail now on an unwritable path
    check_out(Path(opts.out), "train", opts.force, [Path(opts.data)] if opts.data else [])


def summarize(history: list[RoundRecord], strategy) -> dict[str, Any]:
    last = history[-1]
    evaluated = [r for r in history if r.accuracy == r.accuracy]  # skip NaN (not evaluated)
    peak = max(history, key=lambda r: r.device_memory["total"]).device_memory
    return {
        "algorithm": strategy.name,
        "accuracy": last.accuracy,
        "best_accuracy": max(r.accuracy for r in evaluated),
        "loss": last.loss,
        "density": last.density,
        "rounds": len(history),
        "bytes_up_per_round": sum(r.bytes_up for r in history) / len(history),
        "bytes_down_per_round": sum(r.bytes_down for r in history) / len(history),
        "bytes_up_per_client_round": sum(r.bytes_up_per_client for r in history) / len(history),
        "bytes_down_per_client_round": sum(r.bytes_down_per_client for r in history) / len(history),
        "device_memory_bytes": peak,
        "seconds": sum(r.seconds for r in history),
    }


def quality(accuracy: float, labels, num_classes: int) -> dict[str, Any]:
    """The chance-level verdict of a run (toolchain/fl/quality.py) for summary.json."""
    chance = chance_accuracy(labels, num_classes)
    message = chance_message(accuracy, chance)
    return {"chance_accuracy": chance, "at_chance": message is not None, "message": message}


def plot_accuracy(history: list[RoundRecord], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pts = [(r.round, r.accuracy * 100) for r in history if r.accuracy == r.accuracy]
    rounds = [r.round for r in history]
    fig, (ax, dx, mx) = plt.subplots(1, 3, figsize=(12, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    dx.plot(rounds, [100 * r.density for r in history], marker="o", ms=3, color="tab:green")
    dx.set_ylabel("density (% of prunable weights kept)")
    dx.set_title("density")
    for key, label in (("total", "total"), ("activations", "activations")):
        mx.plot(rounds, [r.device_memory[key] / 1024 for r in history], marker="o", ms=3, label=label)
    mx.plot(rounds, [(r.device_memory["total"] - r.device_memory["activations"]) / 1024 for r in history],
            marker="o", ms=3, label="weights + grads + optimizer + buffers")
    mx.set_ylabel("device memory (KiB, docs/memory.md)")
    mx.set_title("training memory per device")
    mx.legend(fontsize=7)
    for a in (ax, dx, mx):
        a.set_xlabel("round")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(opts: TrainOptions) -> dict[str, Any]:
    _validate(opts)
    if opts.engine != "inprocess":  # same strategy objects and outputs, Flower as the transport
        from toolchain.flower import train_flower

        return train_flower(opts)
    data = load_dataset(opts.dataset, opts.data)
    cfg = opts.config()
    seed_everything(opts.seed)  # the initial weights are part of the run
    model = build_model(opts.model, data.input_shape, data.num_classes)
    fed = Federation.from_dataset(data, cfg)
    strategy = make_strategy(opts.algo, cfg)
    out = Path(opts.out)
    staging = staging_dir(out)
    try:
        with (staging / "metrics.jsonl").open("w") as f:
            history = simulate(strategy, model, fed, cfg, progress=not opts.quiet,
                               on_round=lambda r: (f.write(json.dumps(r.as_dict()) + "\n"), f.flush()))
        summary = summarize(history, strategy)
        summary["quality"] = quality(summary["accuracy"], fed.eval_y.numpy(), data.num_classes)
        summary["config"] = {**asdict(opts), "train": cfg.as_dict()}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save({"arch": strategy.model.arch, "state_dict": strategy.model.state_dict(), "masks": strategy.masks,
                    "algorithm": opts.algo, "config": asdict(opts)}, staging / "model.pt")
        plot_accuracy(history, staging / "accuracy.png", f"{opts.algo} / {opts.model} / {opts.dataset}")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
