"""Layer allocation ablation: is it the per-layer budget, not the method, that holds ERK methods back at 1 %?

On the MNIST quick protocol (``bench/fl_grid.py --grid mnist``: LeNet-5, ``toolchain train`` defaults, 10 clients,
4 per round, 5 rounds) every method that takes ERK's per-layer counts (random, magnitude, FedTiny, FedDST,
FedMef, PruneFL) ends at 60-72 % at 1 % density, SNIP at 82 % and SynFlow at 92 %. This benchmark keeps the
method fixed (a random static mask, sparse FedAvg) and changes only how many weights each layer keeps:

- ``erk``: ERK's exact counts (``scores.erk_counts``): the random baseline of the grid;
- ``synflow-counts``: SynFlow's counts on the same initial weights, positions random;
- ``equal``: the same count in every layer (capped at the layer's size, the rest spread over the others);
- ``synflow``: SynFlow's own mask (positions chosen too), for reference.

``--grid cifar10`` runs the same comparison on the CIFAR-10 grid's protocol (ResNet-8, 100 clients, Dirichlet
0.5; ``bench/fl_grid.py``), by default as a short-horizon pilot (``--rounds 60`` of the grid's 300): it asks
whether the product's default budget (equal) also suits a residual network, where SNIP empties whole branches.

Each finished run is saved at once (resumable). Writes ``bench/results/layer_allocation.{json,md,png}``
(``layer_allocation_cifar10.*`` for ``--grid cifar10``).
Usage: ``nice python bench/layer_allocation.py [--seeds 0,1,2] [--density 0.01]``;
``nice python bench/layer_allocation.py --grid cifar10 --seeds 0 --variants erk,equal --data DIR``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, machine, parser, pyplot, write_results
from fl_grid import GRIDS
from torch import nn

from toolchain.data.datasets import load_dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.masks import Masks
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.fl.strategy import ServerContext
from toolchain.learning.pruning.baselines import StaticMask
from toolchain.learning.pruning.scores import erk_counts, layer_counts, random_masks_with_counts, synflow_masks
from toolchain.models.zoo import build_model

STEM = RESULTS / "layer_allocation"
VARIANTS = ("erk", "synflow-counts", "equal", "synflow")


class Allocated(StaticMask):
    """Sparse FedAvg under a static mask: ``variant`` decides the per-layer counts (and, for ``synflow``, where)."""

    name = "allocated"

    def __init__(self, cfg: TrainConfig, variant: str) -> None:
        super().__init__(cfg)
        self.variant = variant

    def score_masks(self, model: nn.Module, ctx: ServerContext) -> Masks:
        h, w, c = model.arch["in_shape"]
        gen = torch.Generator().manual_seed(self.cfg.seed + 31)  # as the grid's random ERK
        if self.variant == "erk":
            return random_masks_with_counts(model, erk_counts(model, self.cfg.density), gen)
        if self.variant == "equal":
            return random_masks_with_counts(model, layer_counts(model, self.cfg.density, "equal"), gen)
        syn = synflow_masks(model, (h, w, c), self.cfg.density, 100, "global")
        if self.variant == "synflow":
            return syn
        return random_masks_with_counts(model, {n: int(m.sum()) for n, m in syn.items()}, gen)


def stem(grid: str) -> Path:
    return STEM if grid == "mnist" else STEM.with_name(f"{STEM.name}_{grid}")


def train_config(grid: str, rounds: int | None) -> dict:
    return {**GRIDS[grid]["train"], **({"rounds": rounds} if rounds else {})}


def protocol(res: dict) -> str:
    """The protocol a result file holds, in words (titles of its table and plot)."""
    return {"mnist": "MNIST / LeNet-5, quick protocol",
            "cifar10": f"CIFAR-10 / ResNet-8, {res['train']['rounds']} rounds of the grid's protocol"}[res["grid"]]


def run(data, grid: str, train: dict, variant: str, density: float, seed: int) -> dict:
    cfg = TrainConfig(**train, density=density, seed=seed)
    fed = Federation.from_dataset(data, cfg)
    seed_everything(seed)
    model = build_model(GRIDS[grid]["model"], data.input_shape, data.num_classes)
    strategy = Allocated(cfg, variant)
    t0 = time.perf_counter()
    hist = simulate(strategy, model, fed, cfg, progress=False)
    return {"variant": variant, "density": density, "seed": seed, "accuracy": hist[-1].accuracy,
            "curve": [[h.round, h.accuracy] for h in hist if h.accuracy == h.accuracy],  # evaluated rounds
            "counts": {n: int(m.sum()) for n, m in strategy.masks.items()},
            "sizes": {n: int(m.numel()) for n, m in strategy.masks.items()},
            "wall_s": round(time.perf_counter() - t0, 1)}


def markdown(res: dict) -> str:
    runs = res["runs"]
    lines = [f"# Layer allocation at extreme sparsity ({protocol(res)})", "",
             f"Train config: `{json.dumps(res['train'])}`. Same method for every row: a random static mask under "
             "sparse FedAvg; only the per-layer counts change (``synflow`` also picks the positions). "
             f"Machine: {res['machine']['cpus']} CPUs, torch {res['machine']['torch']}; "
             f"wall {sum(r['wall_s'] for r in runs):.0f} s.", "",
             "| allocation | density | seeds | final accuracy % (mean +- std) | per seed | kept per layer (seed 0) |",
             "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        for d in sorted({r["density"] for r in runs}):
            rs = sorted((r for r in runs if r["variant"] == variant and r["density"] == d), key=lambda r: r["seed"])
            if not rs:
                continue
            acc = [100 * r["accuracy"] for r in rs]
            counts = " / ".join(f"{rs[0]['counts'][n]}" for n in rs[0]["counts"])
            lines.append(f"| {variant} | {d:g} | {len(rs)} | {np.mean(acc):.2f} +- {np.std(acc):.2f} | "
                         f"{', '.join(f'{a:.2f}' for a in acc)} | {counts} |")
    names = list(runs[0]["sizes"]) if runs else []
    lines += ["", "Layers (size): " + ", ".join(f"{n} ({runs[0]['sizes'][n]})" for n in names) + "."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, variant in enumerate(VARIANTS):
        acc = [100 * r["accuracy"] for r in res["runs"] if r["variant"] == variant]
        if acc:
            ax.bar(i, np.mean(acc), yerr=np.std(acc), capsize=4)
            ax.scatter([i] * len(acc), acc, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(VARIANTS)), VARIANTS)
    ax.set_ylabel("final test accuracy %")
    ax.set_title(f"{protocol(res)}, density {res['runs'][0]['density']:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--grid", choices=("mnist", "cifar10"), default="mnist", help="whose protocol (bench/fl_grid.py)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: the grid's; 60 for cifar10)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--data", default=None, help="dataset folder (default: the shared copy)")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(set(variants) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    out = stem(args.grid)
    train = train_config(args.grid, args.rounds or (60 if args.grid == "cifar10" else None))
    path = out.with_name(out.name + ".json")
    res = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if res["runs"] and res.get("train", train) != train:
        ap.error(f"{path} holds runs of another train config; move it away or pass the same --rounds")
    res.update(grid=args.grid, train=train, machine=machine("platform", "python", "torch", "cpus", "processor"))
    done = {(r["variant"], r["density"], r["seed"]) for r in res["runs"]}
    data = load_dataset(GRIDS[args.grid]["dataset"], args.data)
    todo: list[tuple[str, int]] = [(v, int(s)) for s in args.seeds.split(",") for v in variants
                                   if (v, args.density, int(s)) not in done]
    for variant, seed in todo:
        r = run(data, args.grid, train, variant, args.density, seed)
        res["runs"].append(r)
        write_results(out, res, markdown(res))  # saved at once: an interrupted run keeps what finished
        print(f"{variant} d={args.density} s={seed}: {100 * r['accuracy']:.2f} % ({r['wall_s']} s)", flush=True)
    write_results(out, res, markdown(res))
    plot(res, out.with_name(out.name + ".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
