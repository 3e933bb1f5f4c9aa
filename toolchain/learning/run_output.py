"""A federated run's outputs, in one layout for every engine (docs/training.md).

``metrics.jsonl`` (one JSON object per round, written as rounds finish), ``summary.json``, ``model.pt``
(arch, weights, masks) and ``accuracy.png``, assembled in a staging folder beside ``out`` and renamed into
place only when the whole run succeeded (:func:`toolchain.contracts.staging.staged`). Used by
``toolchain train`` in process and by the Flower ServerApp.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolchain.contracts.staging import staged
from toolchain.learning.fl.config import TrainConfig
from toolchain.learning.fl.quality import chance_accuracy, chance_message
from toolchain.learning.fl.simulator import RoundRecord
from toolchain.learning.fl.strategy import Strategy

# run(on_round) plays every round, calling on_round after each, and returns the history
Runner = Callable[[Callable[[RoundRecord], None]], list[RoundRecord]]


def summarize(history: list[RoundRecord], strategy: Strategy) -> dict[str, Any]:
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
    """The chance-level verdict of a run (toolchain/learning/fl/quality.py) for summary.json."""
    chance = chance_accuracy(labels, num_classes)
    message = chance_message(accuracy, chance)
    return {"chance_accuracy": chance, "at_chance": message is not None, "message": message}


def plot_accuracy(history: list[RoundRecord], path: Path, title: str) -> None:
    import matplotlib  # lazy: plotting is the last step, and matplotlib costs a second at import

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


def write_run(out: Path, options: dict[str, Any], strategy: Strategy, cfg: TrainConfig, run: Runner,
              title: str, config_extra: dict[str, Any] | None = None,
              verdict: Callable[[float], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Play ``run`` and write its outputs into ``out``; returns the summary.

    ``options``: the run's options as a dict (recorded in ``summary.json`` and ``model.pt``);
    ``verdict(accuracy)``: the chance-level verdict (:func:`quality`), when the caller has the test labels.
    """
    with staged(Path(out)) as staging:
        with (staging / "metrics.jsonl").open("w") as f:
            history = run(lambda r: (f.write(json.dumps(r.as_dict()) + "\n"), f.flush()))
        summary = summarize(history, strategy)
        if verdict is not None:
            summary["quality"] = verdict(summary["accuracy"])
        summary["config"] = {**options, "train": cfg.as_dict(), **(config_extra or {})}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save({"arch": strategy.model.arch, "state_dict": strategy.model.state_dict(), "masks": strategy.masks,
                    "algorithm": options["algo"], "config": options}, staging / "model.pt")
        plot_accuracy(history, staging / "accuracy.png", title)
    return summary
