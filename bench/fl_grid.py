"""Resumable benchmark grids for federated pruning: methods x densities x seeds, mean +- std.

Grids:

- ``cifar10``: the benchmark of issue 14 item 4. CIFAR-10 (the full 50k training set, the full 10k test
  set), ResNet-8, 100 clients, 10 per round, Dirichlet 0.5; FedAvg (dense) and FedTiny, FedDST, FedMef,
  PruneFL, SNIP, random ERK at 1 % and 5 %; seeds 0, 1, 2. SGD (momentum 0.9, weight decay 5e-4), lr 0.05
  decayed by 0.997 per round, batch 20, one local epoch, flip + crop augmentation, 300 rounds; dynamic
  methods adjust every 10 rounds until round 150.
- ``mnist``: the MNIST / LeNet-5 quick protocol of the issue's acceptance command: exactly
  ``toolchain train``'s defaults with ``--clients 10 --per-round 4 --rounds 5``, every method, 1 % and
  5 %, seeds 0, 1, 2. ``mnist-equal``: the same on the equal per-layer budget.
- ``cifar10-fedtiny-static`` and ``cifar10-fedtiny-alpha``: FedTiny ablations on the ``cifar10`` settings, with
  its mask adjustments off (``delta=0``) and at FedDST's adjustment rate (0.5), seeds 0 and 1 (docs/training.md).

Each run is saved to ``bench/results/fl_grid_<grid>/<method>_d<density>_s<seed>.json`` the moment it
finishes, and a re-run skips finished runs. A run in progress writes a checkpoint after every round to
``bench/results/fl_grid_<grid>/checkpoints/`` and resumes from it; commit that folder at the end of a
session and the next session (a fresh clone) continues the runs where they stopped. Several processes can
work on one grid at once (each claims a run with a lock file in ``.cache/fl_grid/``, outside git).
``--report`` renders ``bench/results/fl_grid_<grid>.{json,md,png}`` from whatever has finished, with the
runs still in progress listed, machine, wall time and seeds.

Run:  ``nice -n 10 .venv/bin/python bench/fl_grid.py --grid cifar10 --data /work/shared/data/cifar10``
      (start it twice to use two cores), then ``.venv/bin/python bench/fl_grid.py --grid cifar10 --report``.
With ``--device cuda`` each round's clients train together on the GPU (toolchain/learning/fl/vectorised.py;
``bench/gpu_grid.sh`` runs the grid on a lent GPU machine); each result records its engine, and the table names
every row that a non-default engine finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import REPO, RESULTS, machine

from toolchain.data.datasets import load_dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.memory import MEMORY_RULE
from toolchain.learning.fl.quality import chance_accuracy
from toolchain.learning.fl.simulator import engine_name, read_checkpoint, seed_everything
from toolchain.learning.options import TRAIN_DEFAULTS, FederatedOptions
from toolchain.learning.pruning import BUDGET_OPTION, make_strategy
from toolchain.models.zoo import build_model

CACHE = REPO / ".cache" / "fl_grid"


def _cli_defaults(**overrides: Any) -> dict[str, Any]:
    """The TrainConfig that ``toolchain train`` builds from its defaults (plus the issue's flags)."""
    # the options class the CLI's ``train`` subclasses, with train's own defaults; not toolchain.pipelines, which
    # imports the Flower adapter (and its TLS packages) that a bare GPU machine may lack (bench/gpu_grid.sh)
    opts = FederatedOptions(algo="fedavg", **{**TRAIN_DEFAULTS, **overrides})
    cfg = opts.train_config().as_dict()
    cfg.pop("density"), cfg.pop("seed"), cfg.pop("algo_options")
    return cfg


GRIDS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "dataset": "cifar10", "model": "resnet8",
        "methods": ["fedavg", "fedtiny", "feddst", "fedmef", "prunefl", "snip", "random"],
        "densities": [0.01, 0.05], "seeds": [0, 1, 2],
        "train": {"rounds": 300, "clients": 100, "per_round": 10, "local_epochs": 1, "batch_size": 20,
                  "optimizer": "sgd", "lr": 0.05, "lr_decay": 0.997, "momentum": 0.9, "weight_decay": 5e-4,
                  "partition": "dirichlet", "alpha": 0.5, "augment": "flip-crop", "eval_every": 10},
        "algo_options": {"delta": 10, "t_end": 150},
        # FedMef's headline row uses the paper's components only (its 1-bit ReLU cache is an extra of ours)
        "per_method": {"feddst": {"alpha": 0.5}, "fedmef": {"relu_bits": 0}},
    },
    "mnist": {
        "dataset": "mnist", "model": "lenet5",
        "methods": ["fedavg", "fedtiny", "feddst", "fedmef", "prunefl", "snip", "synflow", "random", "magnitude"],
        "densities": [0.01, 0.05], "seeds": [0, 1, 2],
        "train": _cli_defaults(clients=10, per_round=4, rounds=5),
        "algo_options": {},
        "per_method": {},
    },
    # the same protocol with every budgeted method on the "equal" per-layer budget (toolchain train --budget equal)
    "mnist-equal": {
        "dataset": "mnist", "model": "lenet5",
        "methods": ["fedtiny", "feddst", "fedmef", "prunefl", "random", "magnitude"],
        "densities": [0.01, 0.05], "seeds": [0, 1, 2],
        "train": _cli_defaults(clients=10, per_round=4, rounds=5),
        "algo_options": {},
        "per_method": {m: {BUDGET_OPTION[m]: "equal"} for m in ("fedtiny", "feddst", "fedmef", "prunefl", "random",
                                                                "magnitude")},
    },
}
# Ablation of FedTiny's CIFAR-10 result (docs/training.md): its ABNS-chosen mask with the adjustments off (delta 0),
# against the main grid's FedTiny (adjusting) and random ERK (its starting budget, no ABNS)
GRIDS["cifar10-fedtiny-static"] = {**GRIDS["cifar10"], "methods": ["fedtiny"], "seeds": [0, 1],
                                   "algo_options": {"delta": 0, "t_end": 150}, "per_method": {},
                                   "against": ("cifar10", ["fedtiny", "random"]), "label": "FedTiny, delta 0 (ABNS mask only)"}
# FedTiny with FedDST's adjustment rate (0.5 instead of its own 0.1): whether the rate is FedDST's lead at 5 %
GRIDS["cifar10-fedtiny-alpha"] = {**GRIDS["cifar10"], "methods": ["fedtiny"], "seeds": [0, 1], "densities": [0.05],
                                  "algo_options": {"delta": 10, "t_end": 150, "alpha": 0.5}, "per_method": {},
                                  "against": ("cifar10", ["fedtiny", "feddst", "random"]), "label": "FedTiny, rate 0.5"}


def machine_info(device: str | None = None) -> dict[str, Any]:
    if device and device.startswith("cuda"):
        return machine("host", "platform", "python", "torch", "cpus", "torch_threads", "processor",
                       device=f"{device} ({torch.cuda.get_device_name(torch.device(device))})")
    return machine("host", "platform", "python", "torch", "cpus", "torch_threads", "processor", device="cpu")


def run_key(method: str, density: float, seed: int) -> str:
    return f"{method}_d{density:g}_s{seed}"


def grid_runs(grid: dict[str, Any]) -> list[tuple[str, float, int]]:
    """Every (method, density, seed) of a grid, seed-major so a partial grid covers every cell first."""
    out = []
    for seed in grid["seeds"]:
        if "fedavg" in grid["methods"]:
            out.append(("fedavg", 1.0, seed))
        out += [(m, d, seed) for d in grid["densities"] for m in grid["methods"] if m != "fedavg"]
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(lock: Path) -> bool:
    """Take ``lock`` for this process (O_EXCL); a lock left by a dead process is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def merge(grid_name: str, src: Path) -> list[str]:
    """Take from another copy of this grid's results folder (a GPU machine's, or an earlier copy kept aside) what
    is further along: each finished run missing here, and each checkpoint with more rounds than ours. A run that
    a live process here holds (its lock) is left alone: that process would overwrite what we took."""
    out = RESULTS / f"fl_grid_{grid_name}"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    taken = []
    for result in sorted(src.glob("*.json")):
        key = result.stem
        lock = CACHE / grid_name / f"{key}.lock"
        if (out / result.name).exists() or not claim(lock):
            continue
        try:
            shutil.copy2(result, out / result.name)
            (out / "checkpoints" / f"{key}.pt").unlink(missing_ok=True)
            taken.append(f"{key}: finished")
        finally:
            lock.unlink(missing_ok=True)
    for ckpt in sorted((src / "checkpoints").glob("*.pt")):
        key = ckpt.stem
        mine = out / "checkpoints" / ckpt.name
        lock = CACHE / grid_name / f"{key}.lock"
        if (out / f"{key}.json").exists() or not claim(lock):
            continue
        try:
            theirs = len(read_checkpoint(ckpt).history)
            ours = len(read_checkpoint(mine).history) if mine.is_file() else 0
            if theirs > ours:
                shutil.copy2(ckpt, mine)
                taken.append(f"{key}: round {theirs} (had {ours})")
        finally:
            lock.unlink(missing_ok=True)
    return taken


def memory_figures(hist: list) -> dict[str, Any]:
    """The three figures of docs/memory.md, each the peak over every round (round 1 included)."""
    peak = max(hist, key=lambda r: r.device_memory["total"]).device_memory
    model_terms = max(r.device_memory["weights"] + r.device_memory["gradients"] + r.device_memory["optimizer"]
                      + r.device_memory["extra"] for r in hist)
    b1 = max((r.device_memory_batch1 for r in hist), key=lambda m: m.get("total", 0))
    return {"total_at_train_batch": peak["total"], "weights_grads_optimizer": model_terms, "total_at_batch1": b1["total"],
            "peak_breakdown": peak, "peak_breakdown_batch1": b1}


def run_one(grid_name: str, grid: dict[str, Any], data, method: str, density: float, seed: int,
            device: str | None = None) -> dict[str, Any]:
    opts = {**grid["algo_options"], **grid["per_method"].get(method, {})}
    cfg = TrainConfig(**grid["train"], density=density, seed=seed, algo_options=opts)
    fed = Federation.from_dataset(data, cfg)
    seed_everything(seed)
    model = build_model(grid["model"], data.input_shape, data.num_classes)
    strategy = make_strategy(method, cfg)
    ckpt = RESULTS / f"fl_grid_{grid_name}" / "checkpoints" / f"{run_key(method, density, seed)}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    resumed_at = len(read_checkpoint(ckpt).history) if ckpt.is_file() else 0
    hist = simulate(strategy, model, fed, cfg, progress=False, checkpoint=ckpt, clients_device=device)
    evaluated = [r for r in hist if r.accuracy == r.accuracy]
    return {
        "grid": grid_name, "method": method, "density_target": density, "seed": seed,
        "accuracy": hist[-1].accuracy, "best_accuracy": max(r.accuracy for r in evaluated),
        "chance_accuracy": chance_accuracy(fed.eval_y.numpy(), data.num_classes),
        "density": hist[-1].density, "rounds": len(hist),
        "curve": [[r.round, r.accuracy] for r in evaluated],
        "memory": memory_figures(hist), "memory_rule": MEMORY_RULE,
        "bytes_up_per_client_round": float(np.mean([r.bytes_up_per_client for r in hist])),
        "bytes_down_per_client_round": float(np.mean([r.bytes_down_per_client for r in hist])),
        "abns": {k: v for k, v in hist[0].extra.items() if k.startswith("abns")},
        "config": cfg.as_dict(), "machine": machine_info(device),
        # the engine of the process that finished the run, and the rounds it ran (the rest came from a checkpoint)
        "engine": engine_name(device), "rounds_this_process": len(hist) - resumed_at,
        # every round's engine, counted (a run resumed across engines, e.g. on a lent GPU, names each)
        "rounds_by_engine": dict(Counter(r.engine or engine_name(None) for r in hist)),
        # rounds run by this process (a resumed run's earlier rounds are in the sum of its round records)
        "wall_s_this_process": time.perf_counter() - t0, "wall_s": sum(r.seconds for r in hist),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def fill(grid_name: str, data_dir: str | None, methods: list[str] | None, max_runs: int | None,
         device: str | None = None, densities: list[float] | None = None, seeds: list[int] | None = None) -> int:
    grid = GRIDS[grid_name]
    out = RESULTS / f"fl_grid_{grid_name}"
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(grid["dataset"], data_dir)
    done = 0
    for method, density, seed in grid_runs(grid):
        if (methods and method not in methods) or (densities and density not in densities) \
                or (seeds and seed not in seeds):
            continue
        key = run_key(method, density, seed)
        result = out / f"{key}.json"
        lock = CACHE / grid_name / f"{key}.lock"
        if result.exists() or not claim(lock):
            continue
        try:
            t0 = time.perf_counter()
            print(f"[{time.strftime('%H:%M:%S')}] {grid_name} {key}: start", flush=True)
            res = run_one(grid_name, grid, data, method, density, seed, device)
            tmp = result.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(res, indent=1) + "\n")
            tmp.replace(result)  # saved the moment it finishes; the checkpoint is no longer needed
            (out / "checkpoints" / f"{key}.pt").unlink(missing_ok=True)
            print(f"[{time.strftime('%H:%M:%S')}] {grid_name} {key}: acc {res['accuracy']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            lock.unlink(missing_ok=True)
        done += 1
        if max_runs and done >= max_runs:
            break
    return done


TAIL = 6  # the tail mean averages the evaluations in the last 1/TAIL of the rounds
READING = {"accuracy_mean": "final", "tail_mean": "tail mean"}  # the accuracy readings a claim is judged on


def tail_accuracy(curve: list[list[float]], rounds: int) -> float:
    """Mean test accuracy over the evaluations in the last sixth of the rounds (the last evaluation when there is
    none): with 10 of 100 non-IID clients per round the final round alone moves by 2.4-3.3 points (std of the
    change between consecutive evaluations, CIFAR-10 runs), as much as the gaps between methods."""
    cutoff = rounds - rounds // TAIL
    return float(np.mean([a for r, a in curve if r > cutoff] or [curve[-1][1]]))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def progress_of(grid_name: str) -> list[dict[str, Any]]:
    """Runs with a checkpoint but no result yet: how far they are (read from the checkpoint's history)."""
    rows = []
    for ckpt in sorted((RESULTS / f"fl_grid_{grid_name}" / "checkpoints").glob("*.pt")):
        try:
            state = read_checkpoint(ckpt)
        except (OSError, RuntimeError, EOFError) as e:  # a checkpoint being replaced; say so, do not hide it
            print(f"warning: cannot read {ckpt.name} ({e}); left out of the report", file=sys.stderr)
            continue
        evaluated = [r for r in state.history if r.accuracy == r.accuracy]
        rows.append({"run": ckpt.stem, "round": len(state.history), "rounds": state.strategy.cfg.rounds,
                     "last_accuracy": evaluated[-1].accuracy if evaluated else None})
    return rows


def summarize(grid_name: str) -> dict[str, Any]:
    grid = GRIDS[grid_name]
    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / f"fl_grid_{grid_name}").glob("*.json"))]
    stale = [f"{r['method']}_d{r['density_target']:g}_s{r['seed']}" for r in runs if r.get("memory_rule", 1) != MEMORY_RULE]
    if stale:
        raise SystemExit(f"runs measured under an older memory rule: {', '.join(stale)}; "
                         "re-state them with bench/fl_grid_memory_rule.py")
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["method"], r["density_target"]), []).append(r)
    rows = []
    for (method, density), rs in sorted(cells.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0][1],
                                                                       grid["methods"].index(kv[0][0]))):
        acc = _mean_std([r["accuracy"] for r in rs])
        tail = _mean_std([tail_accuracy(r["curve"], r["rounds"]) for r in rs])
        rows.append({
            "method": method, "density": density, "seeds": sorted(r["seed"] for r in rs), "n": len(rs),
            # each seed's readings: claims compare methods on the seeds both have (a partial grid is unpaired)
            "by_seed": {str(r["seed"]): {"accuracy_mean": r["accuracy"], "best": r["best_accuracy"],
                                         "tail_mean": tail_accuracy(r["curve"], r["rounds"])} for r in rs},
            "accuracy_mean": acc[0], "accuracy_std": acc[1], "tail_mean": tail[0], "tail_std": tail[1],
            "at_chance": sum(r["accuracy"] < r["chance_accuracy"] + 0.05 for r in rs),
            **{k: float(np.mean([r["memory"][k] for r in rs]))
               for k in ("total_at_train_batch", "weights_grads_optimizer", "total_at_batch1")},
            # FedMef's definition of a footprint: model + activations (no gradients, no optimizer state)
            **{f"footprint_{at}": float(np.mean([r["memory"][b]["weights"] + r["memory"][b]["activations"] for r in rs]))
               for at, b in (("at_train_batch", "peak_breakdown"), ("at_batch1", "peak_breakdown_batch1"))},
            "bytes_up_per_client_round": float(np.mean([r["bytes_up_per_client_round"] for r in rs])),
            "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
            # the share of the row's rounds each engine trained (issue 14: say which rows a GPU made, and how much)
            "engine_share": {e: n / sum(by.values()) for by in [rounds_by_engine(rs)] for e, n in sorted(by.items())},
        })
    total = len(grid_runs(grid))
    return {"grid": grid_name, "settings": {k: grid[k] for k in ("dataset", "model", "train", "algo_options",
                                                                  "per_method", "seeds", "densities", "methods")},
            "finished_runs": len(runs), "total_runs": total, "rows": rows, "in_progress": progress_of(grid_name),
            "machines": sorted({json.dumps(r["machine"], sort_keys=True) for r in runs}),
            "cpu_s_of_finished_runs": sum(r["wall_s"] for r in runs), "runs": runs}


def _common_seeds(rows: list[dict[str, Any]]) -> list[str]:
    """The seeds every row has finished (rows written before ``by_seed`` existed count as none)."""
    return sorted(set.intersection(*(set(r.get("by_seed", {})) for r in rows)), key=int)


def _on(row: dict[str, Any], key: str, seeds: list[str]) -> float:
    return float(np.mean([row["by_seed"][s][key] for s in seeds]))


def _spread(a: dict[str, Any], b: dict[str, Any], key: str, seeds: list[str]) -> str:
    """`` +- std`` of the per-seed differences a - b (in points) when there are two seeds or more: a gap smaller than
    that is not one the grid can tell from seed noise."""
    if len(seeds) < 2:
        return ""
    return f" +- {100 * float(np.std([a['by_seed'][s][key] - b['by_seed'][s][key] for s in seeds], ddof=1)):.2f}"


def _seeds_said(seeds: list[str]) -> str:
    return f"n = {len(seeds)}: seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}, finished by both"


DENSE_TARGET = {"cifar10": 0.70}  # issue 14 item 4: rounds enough that dense FedAvg reaches this on the test set


def dense_check(summary: dict[str, Any]) -> list[str]:
    """Item 4's bar for the benchmark itself, read three ways (final round, tail mean, best evaluation)."""
    target = DENSE_TARGET.get(summary["grid"])
    dense = next((r for r in summary["rows"] if r["method"] == "fedavg"), None)
    if target is None or dense is None:
        return []
    seeds = sorted(dense["by_seed"], key=int)
    per = {k: [dense["by_seed"][s][k] for s in seeds] for k in ("accuracy_mean", "tail_mean", "best")}
    said = "; ".join(f"{READING.get(k, 'best evaluation')} {100 * np.mean(v):.2f} % (seeds "
                     + " / ".join(f"{100 * x:.2f}" for x in v) + ")" for k, v in per.items())
    met = [k for k, v in per.items() if np.mean(v) >= target]
    name = [READING.get(k, "best evaluation") for k in per]
    verdict = ("met" if len(met) == len(per) else "missed" if not met else
               "met on " + ", ".join(n for k, n in zip(per, name, strict=True) if k in met) + "; missed on "
               + ", ".join(n for k, n in zip(per, name, strict=True) if k not in met))
    return [f"**Dense FedAvg >= {100 * target:.0f} % (the benchmark's own bar)**, n = {len(seeds)}: {said}. "
            f"Verdict: {verdict}.", ""]


def claims(summary: dict[str, Any]) -> list[str]:
    """Each paper claim of issue 14 item 5 that the finished cells can speak to, as table lines."""
    by = {(r["method"], r["density"]): r for r in summary["rows"]}
    # the tail mean is a second reading only where the tail holds more than the final evaluation
    keys = ["accuracy_mean"] + (["tail_mean"] if summary["settings"]["train"]["rounds"] // TAIL else [])
    lines = []
    for d in summary["settings"]["densities"]:
        tiny = by.get(("fedtiny", d))
        base = [r for (m, dd), r in by.items() if dd == d and m not in ("fedtiny", "fedavg")]
        if tiny and base:
            # each baseline against FedTiny on the seeds both finished (paired); the best baseline is the one
            # FedTiny trails most, so a baseline with fewer seeds done does not hold the others' pairs back
            said, gaps = [], []
            for key in keys:
                paired = [(b, _common_seeds([tiny, b])) for b in base]
                b, seeds = min(((b, ss) for b, ss in paired if ss),  # noqa: B023 - used at once
                               key=lambda bs: _on(tiny, key, bs[1]) - _on(bs[0], key, bs[1]))
                gaps.append(100 * (_on(tiny, key, seeds) - _on(b, key, seeds)))
                said.append(f"{READING[key]}: FedTiny {100 * _on(tiny, key, seeds):.2f} vs {b['method']} "
                            f"{100 * _on(b, key, seeds):.2f}, {gaps[-1]:+.2f}{_spread(tiny, b, key, seeds)} points "
                            f"({_seeds_said(seeds)})")
            verdict = "reproduced" if min(gaps) >= 0 else "missed" if max(gaps) < 0 else "mixed (final vs tail mean)"
            lines.append(f"| FedTiny >= best baseline at {d:g} (paper +2.61) | {'; '.join(said)} | {verdict} |")
        mef = by.get(("fedmef", d))
        for other in ("feddst", "fedtiny"):
            o = by.get((other, d))
            seeds = _common_seeds([mef, o]) if mef and o else []
            if seeds:
                train, one = (mef[f"footprint_{k}"] / o[f"footprint_{k}"] for k in ("at_train_batch", "at_batch1"))
                gaps = [100 * (_on(mef, k, seeds) - _on(o, k, seeds)) for k in keys]
                held = [train <= 0.715 and g >= -0.5 for g in gaps]
                verdict = "reproduced" if all(held) else "missed" if not any(held) else "mixed (final vs tail mean)"
                lines.append(f"| FedMef footprint <= 0.715x {other}'s, accuracy within 0.5 at {d:g} | model + activations "
                             f"{train:.3f}x at the training batch ({one:.3f}x at batch 1), accuracy "
                             + ", ".join(f"{g:+.2f}{_spread(mef, o, k, seeds)} points {READING[k]}"
                                         for g, k in zip(gaps, keys, strict=True)) + f" ({_seeds_said(seeds)}) | {verdict} |")
    return lines


def against(summary: dict[str, Any]) -> list[str]:
    """An ablation grid's rows against its main grid's runs at the same density (``GRIDS[...]["against"]``: that
    grid and the methods to compare with), paired by seed, on both readings."""
    ref = GRIDS[summary["grid"]].get("against")
    if not ref:
        return []
    ref_grid, methods = ref
    theirs = [r for r in summarize(ref_grid)["rows"] if r["method"] in methods]
    keys = list(READING)
    name = GRIDS[summary["grid"]].get("label", summary["grid"])
    lines = ["", f"## Against `{ref_grid}` (same settings otherwise), paired by seed", "",
             "Each cell: this grid's row minus the other run, in points, mean +- std over the seeds both finished.", "",
             "| this grid | against | " + " | ".join(READING[k] for k in keys) + " | seeds |",
             "|---|---|" + "---|" * len(keys) + "---|"]
    for mine in summary["rows"]:
        for other in theirs:
            seeds = _common_seeds([mine, other]) if other["density"] == mine["density"] else []
            if not seeds:
                continue
            cells = [f"{100 * (_on(mine, k, seeds) - _on(other, k, seeds)):+.2f}{_spread(mine, other, k, seeds)}"
                     for k in keys]
            lines.append(f"| {name} at {mine['density']:g} ({100 * _on(mine, 'tail_mean', seeds):.2f} % tail "
                         f"mean) | {other['method']} ({100 * _on(other, 'tail_mean', seeds):.2f} %) | "
                         + " | ".join(cells) + f" | {', '.join(seeds)} |")
    return lines


def rounds_by_engine(runs: list[dict[str, Any]]) -> Counter:
    """Rounds per engine over runs (a run finished before rounds recorded their engine ran all on its own)."""
    total: Counter = Counter()
    for r in runs:
        total.update(r.get("rounds_by_engine") or {r.get("engine", engine_name(None)): r["rounds"]})
    return total


def markdown(s: dict[str, Any]) -> str:
    st, tr = s["settings"], s["settings"]["train"]
    lines = [f"# Federated pruning grid `{s['grid']}`: {st['dataset']} / {st['model']}", "",
             f"{tr['clients']} clients, {tr['per_round']} per round, {tr['partition']}"
             + (f" (alpha {tr['alpha']})" if tr["partition"] == "dirichlet" else "") + ", "
             f"{tr['rounds']} rounds, E = {tr['local_epochs']}, batch {tr['batch_size']}, {tr['optimizer']} lr {tr['lr']}"
             f" (decay {tr.get('lr_decay', 1.0)}/round), augmentation {tr.get('augment', 'none')}; dynamic-method "
             f"options {st['algo_options']} {st['per_method']}; seeds {st['seeds']}; evaluated on the full test set.",
             "", f"Finished runs: **{s['finished_runs']} of {s['total_runs']}** "
             f"(their rounds' wall time summed: {s['cpu_s_of_finished_runs'] / 3600:.1f} h). Finished on: "
             + "; ".join(sorted({f"{json.loads(m)['processor']} x{json.loads(m)['cpus']}, {json.loads(m)['device']}, "
                                 f"torch {json.loads(m)['torch']}" for m in s["machines"]}))
             + ". Their rounds by engine: " + ", ".join(f"{e} {n}" for e, n in sorted(rounds_by_engine(s["runs"]).items()))
             + ".", "",
             "Memory (docs/memory.md, peak over all rounds, round 1 included): **total** at the training batch; "
             "**w+g+opt** = weights + gradients + optimizer state + method buffers; **batch 1** = everything when "
             "training on one sample. FedMef's claim uses its own footprint, model + activations (docs/memory.md).", "",
             "Engine: every run trained its clients one by one on the CPU unless its row names another engine, with "
             "that engine's share of the row's rounds (`--device`: the round's clients batched on that device, equal "
             "up to float rounding; docs/training.md). *wall s/run* mixes the engines in those shares.",
             "",
             f"**Tail mean**: the mean of each run's evaluations in the last 1/{TAIL} of the rounds (the final round "
             "alone carries the sampling noise of its 10 clients), then mean +- std over seeds.", "",
             "| method | density | seeds | final accuracy % (mean +- std) | tail mean % | at chance | total KiB | "
             "w+g+opt KiB | batch 1 KiB | up B/client/round | wall s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        engines = [f"{e} {100 * f:.0f} %" for e, f in r.get("engine_share", {}).items() if e != engine_name(None)]
        lines.append(f"| {r['method']}{' (' + ', '.join(engines) + ')' if engines else ''} | {r['density']:g} | "
                     f"{r['n']} | {100 * r['accuracy_mean']:.2f} +- "
                     f"{100 * r['accuracy_std']:.2f} | {100 * r['tail_mean']:.2f} +- {100 * r['tail_std']:.2f} | "
                     f"{r['at_chance']}/{r['n']} | {r['total_at_train_batch'] / 1024:.0f} | "
                     f"{r['weights_grads_optimizer'] / 1024:.1f} | {r['total_at_batch1'] / 1024:.1f} | "
                     f"{r['bytes_up_per_client_round']:.0f} | {r['wall_s_mean']:.0f} |")
    lines += ["", *dense_check(s)]
    c = claims(s)
    if c:
        lines += ["", "## Paper claims on the finished cells", "", "| claim | measured | verdict |", "|---|---|---|", *c]
    lines += against(s)
    if s["in_progress"]:
        lines += ["", "## In progress (checkpointed, resumed by the next run of this script)", "",
                  "| run | round | last evaluated accuracy |", "|---|---|---|"]
        lines += [f"| {p['run']} | {p['round']} / {p['rounds']} | "
                  + (f"{100 * p['last_accuracy']:.2f} %" if p["last_accuracy"] is not None else "-") + " |"
                  for p in s["in_progress"]]
    return "\n".join(lines) + "\n"


def plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for method in s["settings"]["methods"]:
        rows = sorted((r for r in s["rows"] if r["method"] == method), key=lambda r: r["density"])
        if not rows:
            continue
        if method == "fedavg":
            ax.axhline(100 * rows[0]["accuracy_mean"], color="k", ls="--", lw=1, label="fedavg (dense)")
            continue
        ax.errorbar([r["density"] for r in rows], [100 * r["accuracy_mean"] for r in rows],
                    yerr=[100 * r["accuracy_std"] for r in rows], marker="o", capsize=3, label=method,
                    lw=2.5 if method == "fedtiny" else 1.2)
    ax.set_xscale("log")
    ax.set_xticks(s["settings"]["densities"], [f"{d:g}" for d in s["settings"]["densities"]])
    ax.set_xlabel("density")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"{s['settings']['dataset']} / {s['settings']['model']} ({s['finished_runs']}/{s['total_runs']} runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for r in s["runs"]:
        if r["seed"] == s["settings"]["seeds"][0]:
            pts = r["curve"]
            bx.plot([p[0] for p in pts], [100 * p[1] for p in pts], lw=1,
                    label=f"{r['method']} {r['density_target']:g}")
    bx.set_xlabel("round")
    bx.set_ylabel("test accuracy (%)")
    bx.set_title(f"curves, seed {s['settings']['seeds'][0]}")
    bx.grid(alpha=0.3)
    if s["runs"]:
        bx.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(grid_name: str) -> dict[str, Any]:
    s = summarize(grid_name)
    stem = RESULTS / f"fl_grid_{grid_name}"
    compact = {k: v for k, v in s.items() if k != "runs"}
    stem.with_suffix(".json").write_text(json.dumps(compact, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(s))
    plot(s, stem.with_suffix(".png"))
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=list(GRIDS), default="mnist")
    p.add_argument("--data", default=None, help="dataset folder (CIFAR-10 binary version for --grid cifar10)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the grid's methods")
    p.add_argument("--densities", default=None, help="comma-separated subset of the grid's densities (1 = FedAvg)")
    p.add_argument("--seeds", default=None, help="comma-separated subset of the grid's seeds")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many finished runs")
    p.add_argument("--merge", default=None, metavar="DIR",
                   help="take finished runs and further-along checkpoints from another copy of this grid's results "
                        "folder (bench/gpu_grid.sh's), then report")
    p.add_argument("--report", action="store_true", help="render the table/plot from the finished runs and exit")
    p.add_argument("--device", default=None,
                   help="train each round's clients together on this device, batched (cuda, cuda:1, cpu; "
                        "toolchain/learning/fl/vectorised.py); default: one by one on the CPU")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        if not Path(args.merge).is_dir():
            print(f"error: --merge {args.merge}: no such folder (give a copy of bench/results/fl_grid_{args.grid})",
                  file=sys.stderr)
            return 2
        for line in merge(args.grid, Path(args.merge)) or ["nothing further along there"]:
            print(line)
        report(args.grid)
        return 0
    if args.report:
        print(markdown(report(args.grid)))
        return 0
    methods = args.methods.split(",") if args.methods else None
    densities = [float(v) for v in args.densities.split(",")] if args.densities else None
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else None
    n = fill(args.grid, args.data, methods, args.max_runs, args.device, densities, seeds)
    report(args.grid)
    print(f"{n} run(s) finished by this process; report in bench/results/fl_grid_{args.grid}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
