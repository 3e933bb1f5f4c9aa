"""Re-state a grid's memory figures under memory rule 2 (docs/memory.md), once.

Rule 1 counted as activations what a training forward saves of the model's own buffers (BN running statistics,
NSConv masks), which the weights term already holds, and an NSConv effective weight at its dense size, where a
device holds only its kept entries. Both are fixed for a run: the buffers do not change, and every method of the
grids keeps each layer's number of kept weights (prune k, grow k). So the over-count of a training phase is one
number per run and batch size: ``buffers + weight_copies - weight_copies_device`` of ``measure_saved_tensors`` on
the run's model under its masks. This script measures it and subtracts it from the activations (and total) of
every training phase; forward-only phases (no gradients, no optimizer state: FedTiny's round-1 selection) are
measured by another function, which rule 2 does not change.

Finished runs (``bench/results/fl_grid_<grid>/*.json`` without ``memory_rule``) are rebuilt to their round-1
state (``start_run``); checkpoints (``checkpoints/*.pt`` whose ``memory_rule`` is 1) carry their model. Both are
marked rule 2, so a second pass changes nothing. Stop the grid's workers first: a worker started before rule 2
would write rule-1 rounds into a checkpoint marked rule 2.

Usage: ``python bench/fl_grid_memory_rule.py --grid cifar10 --data ../shared/data/cifar10``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from common import RESULTS
from fl_grid import GRIDS
from torch import nn

from toolchain.data.datasets import load_dataset
from toolchain.learning.fl import Federation, TrainConfig
from toolchain.learning.fl.memory import MEMORY_RULE, measure_saved_tensors
from toolchain.learning.fl.simulator import read_checkpoint, seed_everything, start_run
from toolchain.learning.pruning import make_strategy
from toolchain.models.zoo import build_model


def over_count(model: nn.Module, batch: int) -> int:
    """Bytes rule 1 counted beyond rule 2 in a training phase of ``model`` at ``batch`` samples."""
    shape = tuple(model.arch["in_shape"])
    x = torch.randn(batch, shape[2], shape[0], shape[1])
    saved = measure_saved_tensors(model, x, torch.zeros(batch, dtype=torch.long))
    return saved.buffers + saved.weight_copies - saved.weight_copies_device


def restate(record: dict[str, int], delta: int) -> None:
    if record.get("gradients", 0) or record.get("optimizer", 0):  # a training phase
        record["activations"] -= delta
        record["total"] -= delta


def finished_run(run: dict[str, Any], grid: dict[str, Any], data) -> dict[str, int]:
    cfg = TrainConfig(**run["config"])
    fed = Federation.from_dataset(data, cfg)
    seed_everything(cfg.seed)
    strategy = make_strategy(run["method"], cfg)
    start_run(strategy, build_model(grid["model"], data.input_shape, data.num_classes), fed, cfg)
    deltas = {"train_batch": over_count(strategy.model, cfg.batch_size), "batch1": over_count(strategy.model, 1)}
    mem = run["memory"]
    restate(mem["peak_breakdown"], deltas["train_batch"])
    restate(mem["peak_breakdown_batch1"], deltas["batch1"])
    mem["total_at_train_batch"] = mem["peak_breakdown"]["total"]
    mem["total_at_batch1"] = mem["peak_breakdown_batch1"]["total"]
    run["memory_rule"] = MEMORY_RULE
    run["memory_restated_bytes"] = deltas
    return deltas


def checkpoint(path: Path) -> dict[str, int] | None:
    state = read_checkpoint(path)
    if getattr(state, "memory_rule", 1) >= MEMORY_RULE:
        return None
    model = state.strategy.model
    deltas = {"train_batch": over_count(model, state.strategy.cfg.batch_size), "batch1": over_count(model, 1)}
    for rec in state.history:
        restate(rec.device_memory, deltas["train_batch"])
        restate(rec.device_memory_batch1, deltas["batch1"])
    state.memory_rule = MEMORY_RULE
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return deltas


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=list(GRIDS), required=True)
    p.add_argument("--data", default=None, help="dataset folder, as for bench/fl_grid.py")
    args = p.parse_args()
    torch.set_num_threads(1)
    grid, out = GRIDS[args.grid], RESULTS / f"fl_grid_{args.grid}"
    data = None
    for path in sorted(out.glob("*.json")):
        run = json.loads(path.read_text())
        if run.get("memory_rule", 1) >= MEMORY_RULE:
            continue
        data = data or load_dataset(grid["dataset"], args.data)
        print(f"{path.name}: over-count {finished_run(run, grid, data)} B restated", flush=True)
        path.write_text(json.dumps(run, indent=1) + "\n")
    for path in sorted((out / "checkpoints").glob("*.pt")):
        deltas = checkpoint(path)
        print(f"{path.name}: " + ("already rule 2" if deltas is None else f"over-count {deltas} B restated"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
