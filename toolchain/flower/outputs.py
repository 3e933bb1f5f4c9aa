"""Write a Flower run's results in the same layout as ``toolchain train`` (docs/training.md).

``metrics.jsonl``, ``summary.json``, ``model.pt``, ``accuracy.png``, assembled in a temporary folder
beside ``out`` and renamed into place only when the whole run succeeded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolchain.fl.config import TrainConfig
from toolchain.fl.simulator import RoundRecord
from toolchain.fl.strategy import Strategy
from toolchain.flower.driver import RunSpec

Runner = Callable[[Callable[[RoundRecord], None]], list[RoundRecord]]


def write_run(spec: RunSpec, strategy: Strategy, cfg: TrainConfig, run: Runner) -> dict[str, Any]:
    from toolchain.train import plot_accuracy, summarize

    opts = spec.options
    out = Path(spec.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with (staging / "metrics.jsonl").open("w") as f:
            history = run(lambda r: (f.write(json.dumps(r.as_dict()) + "\n"), f.flush()))
        summary = summarize(history, strategy)
        summary["config"] = {**opts, "train": cfg.as_dict(), "train_limit": spec.train_limit,
                             "test_limit": spec.test_limit}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save({"arch": strategy.model.arch, "state_dict": strategy.model.state_dict(), "masks": strategy.masks,
                    "algorithm": opts["algo"], "config": opts}, staging / "model.pt")
        plot_accuracy(history, staging / "accuracy.png", f"{opts['algo']} / {opts['model']} / {opts['dataset']} "
                      f"({opts.get('engine', 'flower')})")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
