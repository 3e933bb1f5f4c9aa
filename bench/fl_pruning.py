"""Federated pruning benchmark: accuracy vs density, device memory and bytes per round, per method.

Configurations (all methods share rounds, seeds, partition and training settings within a config):

- ``quick``: MNIST / LeNet-5, 10 clients (all sampled each round), Dirichlet 0.5 over a seeded
  2000-image training subset, 10 rounds, E=2, Adam 1e-2, densities 1 %, 5 %, 10 %; run fully, results
  committed (a sparse LeNet-5 without BN barely moves with SGD at these densities; Adam does).
- ``cifar-reduced``: CIFAR-10 / ResNet-8, a *reduced* version of the paper-scale setting (100 clients,
  10 per round, Dirichlet 0.5, hundreds of rounds), sized for a shared 2-core machine: fewer
  clients, rounds and images; densities 1 % and 5 %. Labelled reduced everywhere it is written.
- ``cifar-reduced-10r``: the same, with twice the rounds (10) and data (3200 images, 10 clients, 5 per
  round); also reduced.
- ``cifar-reduced-fed100``: the paper's federation (100 clients, 10 per round, Dirichlet 0.5) over a 10k-image
  subset (100 images per client on average), 30 rounds, adjustments every 3 rounds until round 24; reduced.
- ``cifar-paper``: the paper-scale grid (100 clients, 10 per round, densities 1/5/10 %); defined so it
  can be run on a bigger machine, not run here.

Writes ``bench/results/fl_pruning_<config>.json`` + ``.md`` + ``.png`` with machine info and wall time.
Variant rows: ``fedtiny-pretrain`` = FedTiny with [AUTH]'s server pre-training (``pretrain=1``). Runs can
be split over processes with ``--part NAME`` and combined with ``--merge``; ``--memory-sweep`` writes
``fl_pruning_memory.{json,md}`` (dense vs FedTiny memory by batch size).
``--reproduce`` re-runs the quick config and checks every final accuracy against the committed JSON
(tolerance 0.5 points); exit status 1 on a mismatch.

Run: ``nice -n 10 .venv/bin/python bench/fl_pruning.py --config quick``
     ``nice -n 10 .venv/bin/python bench/fl_pruning.py --config cifar-reduced --data /work/shared/data/cifar10``
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cpu_kernels  # noqa: F401 - before torch: kernels that round alike on every host (--reproduce)
import numpy as np
import torch
from common import RESULTS, machine, parser, pyplot, write_results

from toolchain.data.datasets import Dataset, load_dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.pruning import make_strategy
from toolchain.models.zoo import build_model

METHODS = ["fedtiny", "random", "magnitude", "snip", "synflow", "prunefl", "feddst"]


def _reduced_cifar(train_subset: int, eval_samples: int, *, rounds: int, clients: int, per_round: int, delta: int,
                   t_end: int) -> dict[str, Any]:
    """A reduced CIFAR-10 / ResNet-8 configuration: Adam 3e-3, one local epoch, Dirichlet 0.5, densities 1 and 5 %;
    only the size of the run (images, rounds, federation) and the adjustment schedule differ between them."""
    return {
        "dataset": "cifar10", "model": "resnet8", "train_subset": train_subset, "eval_samples": eval_samples,
        "densities": [0.01, 0.05], "seeds": [0],
        "train": {"rounds": rounds, "clients": clients, "per_round": per_round, "local_epochs": 1, "batch_size": 32,
                  "optimizer": "adam", "lr": 3e-3, "weight_decay": 1e-4, "partition": "dirichlet", "alpha": 0.5,
                  "eval_every": 5},
        "algo_options": {"delta": delta, "t_end": t_end},
        "per_method": {"feddst": {"alpha": 0.5}, "synflow": {"synflow_iterations": 20}},
    }


CONFIGS: dict[str, dict[str, Any]] = {
    "quick": {
        "dataset": "mnist", "model": "lenet5", "train_subset": 2000, "eval_samples": 1000,
        "densities": [0.01, 0.05, 0.1], "seeds": [0],
        "train": {"rounds": 10, "clients": 10, "per_round": 10, "local_epochs": 2, "batch_size": 32,
                  "optimizer": "adam", "lr": 1e-2, "weight_decay": 1e-4, "partition": "dirichlet", "alpha": 0.5,
                  "eval_every": 5},
        # dynamic methods: adjustments every 2 rounds until round 8 (the authors' delta=10/T_end=100
        # scaled to a 10-round run); FedDST's alpha is its official readjustment ratio
        "algo_options": {"delta": 2, "t_end": 8},
        "per_method": {"feddst": {"alpha": 0.5}},
    },
    "cifar-reduced": _reduced_cifar(1600, 500, rounds=5, clients=8, per_round=4, delta=1, t_end=4),
    # second reduced CIFAR run: twice the rounds and data of cifar-reduced
    "cifar-reduced-10r": _reduced_cifar(3200, 1000, rounds=10, clients=10, per_round=5, delta=2, t_end=8),
    # the paper's federation (100 clients, 10 per round, Dir 0.5) on fewer rounds and images
    "cifar-reduced-fed100": _reduced_cifar(10000, 1000, rounds=30, clients=100, per_round=10, delta=3, t_end=24),
    "cifar-paper": {
        "dataset": "cifar10", "model": "resnet8", "train_subset": None, "eval_samples": None,
        "densities": [0.01, 0.05, 0.1], "seeds": [0],
        "train": {"rounds": 500, "clients": 100, "per_round": 10, "local_epochs": 5, "batch_size": 64,
                  "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "partition": "dirichlet", "alpha": 0.5,
                  "eval_every": 10},
        "algo_options": {"delta": 10, "t_end": 300},
        "per_method": {"feddst": {"alpha": 0.5}},
    },
}


def machine_info() -> dict[str, Any]:
    return machine("platform", "python", "torch", "cpus", "torch_threads", "processor")


def subset(data: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(data.y_train):
        return data
    sel = np.sort(np.random.default_rng(seed).permutation(len(data.y_train))[:n])
    return Dataset(data.name, data.x_train[sel], data.y_train[sel], data.x_test, data.y_test, data.num_classes,
                   data.preprocessing)


# Extra rows: a registered algorithm with options (e.g. FedTiny with [AUTH]'s server pre-training).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"fedtiny-pretrain": ("fedtiny", {"pretrain": 1}),
                                                   "fedtiny-erk": ("fedtiny", {"candidate_base": "erk"})}


def run_one(data: Dataset, conf: dict[str, Any], method: str, density: float, seed: int) -> dict[str, Any]:
    algo, variant_opts = VARIANTS.get(method, (method, {}))
    opts = {**conf["algo_options"], **conf["per_method"].get(method, {}), **variant_opts}
    cfg = TrainConfig(**conf["train"], density=density, seed=seed, eval_samples=conf["eval_samples"],
                      algo_options=opts)
    fed = Federation.from_dataset(data, cfg)
    seed_everything(seed)
    model = build_model(conf["model"], data.input_shape, data.num_classes)
    strategy = make_strategy(algo, cfg)
    t0 = time.perf_counter()
    hist = simulate(strategy, model, fed, cfg, progress=False)
    wall = time.perf_counter() - t0
    evaluated = [r for r in hist if r.accuracy == r.accuracy]
    peak = max(hist, key=lambda r: r.device_memory["total"]).device_memory
    return {
        "method": method, "density_target": density, "seed": seed,
        "accuracy": hist[-1].accuracy, "best_accuracy": max(r.accuracy for r in evaluated),
        "density": hist[-1].density,
        "curve": [[r.round, r.accuracy] for r in evaluated],
        "peak_device_memory": peak,
        "bytes_up_per_client_round": float(np.mean([r.bytes_up_per_client for r in hist])),
        "bytes_down_per_client_round": float(np.mean([r.bytes_down_per_client for r in hist])),
        "round1_bytes_up": hist[0].bytes_up, "round1_bytes_down": hist[0].bytes_down,
        "abns": {k: v for k, v in hist[0].extra.items() if k.startswith("abns")},
        "options": opts, "wall_s": wall,
    }


def run_config(name: str, data_dir: str | None, methods: list[str], densities: list[float] | None,
               log: bool = True) -> dict[str, Any]:
    conf = CONFIGS[name]
    data = subset(load_dataset(conf["dataset"], data_dir), conf["train_subset"], 12345)
    t0 = time.perf_counter()
    runs = []
    for seed in conf["seeds"]:
        if "fedavg" in methods:
            runs.append(run_one(data, conf, "fedavg", 1.0, seed))
            if log:
                print(f"fedavg dense: {runs[-1]['accuracy']:.4f} ({runs[-1]['wall_s']:.0f}s)", flush=True)
        for d in densities or conf["densities"]:
            for m in methods:
                if m == "fedavg":
                    continue
                runs.append(run_one(data, conf, m, d, seed))
                r = runs[-1]
                if log:
                    print(f"{m:10s} d={d:<5} acc {r['accuracy']:.4f} density {r['density']:.4f} "
                          f"mem {r['peak_device_memory']['total']} B ({r['wall_s']:.0f}s)", flush=True)
    return {"config": name, "reduced": name.startswith("cifar-reduced"), "settings": conf, "machine": machine_info(),
            "wall_s": time.perf_counter() - t0, "runs": runs}


def markdown(res: dict[str, Any]) -> str:
    conf = res["settings"]
    tr = conf["train"]
    lines = [f"# Federated pruning benchmark: `{res['config']}`" + (" (REDUCED configuration)" if res["reduced"] else ""),
             "",
             f"{conf['dataset']} / {conf['model']}; {tr['clients']} clients, {tr['per_round']} per round, "
             f"Dirichlet {tr['alpha']}, {tr['rounds']} rounds, E={tr['local_epochs']}, batch {tr['batch_size']}, "
             f"{tr['optimizer']} lr {tr['lr']}; train subset {conf['train_subset']}, eval on {conf['eval_samples']} "
             f"test images; seeds {conf['seeds']}; dynamic-method options {conf['algo_options']}.",
             f"Machine: {res['machine']['platform']}, {res['machine']['cpus']} CPUs (shared), torch "
             f"{res['machine']['torch']}, 1 thread. Wall time {res['wall_s']:.0f} s.", "",
             "Peak device memory = weights + gradients + optimizer + measured activations (batch "
             f"{tr['batch_size']}) + method buffers (docs/memory.md). Bytes = encoded payload sizes per sampled "
             "client per round, averaged over rounds (FedTiny's round 1 includes ABNS).", "",
             "| method | target density | density | final acc % | best acc % | peak memory KiB | "
             "(w/g/opt/act/extra KiB) | up B/client/round | down B/client/round | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        m = r["peak_device_memory"]
        parts = "/".join(f"{m[k] / 1024:.0f}" for k in ("weights", "gradients", "optimizer", "activations", "extra"))
        lines.append(f"| {r['method']} | {r['density_target']} | {r['density']:.4f} | {100 * r['accuracy']:.2f} | "
                     f"{100 * r['best_accuracy']:.2f} | {m['total'] / 1024:.0f} | {parts} | "
                     f"{r['bytes_up_per_client_round']:.0f} | {r['bytes_down_per_client_round']:.0f} | {r['wall_s']:.0f} |")
    dense = [r for r in res["runs"] if r["method"] == "fedavg"]
    tiny = [r for r in res["runs"] if r["method"] == "fedtiny"]
    if dense and tiny:
        dm = dense[0]["peak_device_memory"]

        def model_terms(m: dict[str, int]) -> int:  # everything except the measured activations
            return m["total"] - m["activations"]

        lines += ["", "FedTiny peak memory / dense FedAvg peak memory (total; without activations): " + ", ".join(
            f"d={t['density_target']}: {t['peak_device_memory']['total'] / dm['total']:.3f}; "
            f"{model_terms(t['peak_device_memory']) / model_terms(dm):.3f}" for t in tiny)]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    methods = sorted({r["method"] for r in res["runs"] if r["method"] != "fedavg"})
    for m in methods:
        pts = sorted((r["density_target"], 100 * r["accuracy"]) for r in res["runs"] if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, lw=2.5 if m == "fedtiny" else 1.2)
    for r in res["runs"]:
        if r["method"] == "fedavg":
            ax.axhline(100 * r["accuracy"], color="k", ls="--", lw=1, label="fedavg (dense)")
    ax.set_xscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"{res['settings']['dataset']} / {res['settings']['model']}" + (" (reduced)" if res["reduced"] else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(res: dict[str, Any], out: Path, part: str | None = None) -> None:
    stem = out / (f"fl_pruning_{res['config']}" + (f"_part-{part}" if part else ""))
    if part:  # partial results (one process of a split run): JSON only, merged by --merge
        write_results(stem, res, indent=1)
        return
    write_results(stem, res, markdown(res), indent=1)
    plot(res, stem.with_suffix(".png"))


def merge(config: str, out: Path) -> dict[str, Any]:
    """Combine ``fl_pruning_<config>_part-*.json`` (runs split over processes) into one result."""
    parts = sorted(out.glob(f"fl_pruning_{config}_part-*.json"))
    loaded = [json.loads(p.read_text()) for p in parts]
    res = dict(loaded[0])
    order = {m: i for i, m in enumerate(["fedavg", *METHODS, *VARIANTS])}
    res["runs"] = sorted((r for x in loaded for r in x["runs"]),
                         key=lambda r: (r["density_target"] != 1.0, r["density_target"], order.get(r["method"], 99)))
    res["wall_s"] = max(x["wall_s"] for x in loaded)
    res["processes"] = len(loaded)
    res["cpu_s_sum_of_runs"] = sum(r["wall_s"] for r in res["runs"])
    write(res, out)
    for p in parts:
        p.unlink()
    return res


def memory_sweep(out: Path) -> dict[str, Any]:
    """Peak device memory of dense FedAvg vs FedTiny's accounting, over batch sizes (no training needed).

    FedTiny's terms at density rho: sparse weights/gradients/Adam state under a FedTiny-shaped mask (dense
    first conv, the rest layer-wise magnitude at rho') plus the largest top-K buffer of any block at the first
    adjustment (alpha_t ~ alpha = 0.1). Activations are measured (they do not depend on the mask).
    """
    from toolchain.learning.fl.memory import training_memory
    from toolchain.learning.pruning.blocks import model_blocks
    from toolchain.learning.pruning.dynamic import swap_counts, topk_buffer_bytes
    from toolchain.learning.pruning.scores import keep_count, layer_topk

    rows = []
    for model_name, shape in (("lenet5", (28, 28, 1)), ("resnet8", (32, 32, 3))):
        seed_everything(0)
        model = build_model(model_name, shape, 10)
        params = dict(model.named_parameters())
        names = [n for b in model_blocks(model) for n in b]
        dense = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
        for rho in (0.01, 0.05, 0.1):
            first, rest = names[0], names[1:]
            total = sum(params[n].numel() for n in names)
            rho_adj = (keep_count(total, rho) - params[first].numel()) / sum(params[n].numel() for n in rest)
            masks = {first: dense[first]}
            masks.update({n: layer_topk(params[n].detach().abs(), max(1, round(rho_adj * params[n].numel())))
                          for n in rest})
            topk = max(topk_buffer_bytes(swap_counts(masks, [n for n in b if n != first], 0.1), masks)
                       for b in model_blocks(model))
            for bs in (1, 8, 32, 64):
                x = torch.randn(bs, shape[2], shape[0], shape[1])
                y = torch.zeros(bs, dtype=torch.long)
                d = training_memory(model, dense, x, y, "adam").as_dict()
                t = training_memory(model, masks, x, y, "adam", extra_bytes=topk).as_dict()
                rows.append({"model": model_name, "density": rho, "batch": bs, "dense": d, "fedtiny": t,
                             "ratio_total": t["total"] / d["total"],
                             "ratio_without_activations": (t["total"] - t["activations"]) / (d["total"] - d["activations"])})
    res = {"machine": machine_info(), "optimizer": "adam", "rows": rows}
    lines = ["# Device memory: FedTiny accounting vs dense FedAvg (Adam), by batch size", "",
             "Weights/gradients/optimizer/top-K by formula, activations measured (docs/memory.md).", "",
             "| model | density | batch | dense KiB | FedTiny KiB | ratio total | ratio without activations | activations KiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['density']} | {r['batch']} | {r['dense']['total'] / 1024:.1f} | "
                     f"{r['fedtiny']['total'] / 1024:.1f} | {r['ratio_total']:.3f} | "
                     f"{r['ratio_without_activations']:.3f} | {r['dense']['activations'] / 1024:.1f} |")
    write_results(out / "fl_pruning_memory", res, "\n".join(lines) + "\n", indent=1)
    return res


def reproduce(out: Path, methods: list[str] | None, densities: list[float] | None = None,
              tol_points: float = 0.5) -> int:
    committed = json.loads((out / "fl_pruning_quick.json").read_text())
    want = methods or sorted({r["method"] for r in committed["runs"]})
    fresh = run_config("quick", None, want, densities, log=False)
    index = {(r["method"], r["density_target"], r["seed"]): r for r in fresh["runs"]}
    bad = compared = 0
    for r in committed["runs"]:
        key = (r["method"], r["density_target"], r["seed"])
        if key not in index:
            continue
        compared += 1
        diff = 100 * abs(index[key]["accuracy"] - r["accuracy"])
        status = "ok" if diff <= tol_points else "MISMATCH"
        bad += status != "ok"
        print(f"{status:8s} {key[0]:10s} d={key[1]:<5} committed {100 * r['accuracy']:.2f} now "
              f"{100 * index[key]['accuracy']:.2f} (diff {diff:.2f} points)")
    if not compared:
        print("no committed run matched the requested methods/densities")
    return 1 if bad or not compared else 0


def main() -> int:
    p = parser(__doc__, out=RESULTS)
    p.add_argument("--config", choices=list(CONFIGS), default="quick")
    p.add_argument("--data", default=None, help="dataset folder (CIFAR-10 binary version)")
    p.add_argument("--methods", default=",".join(["fedavg", *METHODS]))
    p.add_argument("--densities", default=None, help="comma-separated, overrides the config's")
    p.add_argument("--rounds", type=int, default=None, help="override the config's rounds (smoke runs)")
    p.add_argument("--part", default=None, help="write a partial result (split a config over processes)")
    p.add_argument("--merge", action="store_true", help="merge the config's partial results and render")
    p.add_argument("--memory-sweep", action="store_true", help="dense vs FedTiny memory over batch sizes")
    p.add_argument("--reproduce", action="store_true", help="re-run the quick config and compare with the committed JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    if args.memory_sweep:
        memory_sweep(Path(args.out))
        print((Path(args.out) / "fl_pruning_memory.md").read_text())
        return 0
    if args.merge:
        print(markdown(merge(args.config, Path(args.out))))
        return 0
    dens = [float(d) for d in args.densities.split(",")] if args.densities else None
    if args.reproduce:
        return reproduce(Path(args.out), methods if args.methods != p.get_default("methods") else None, dens)
    if args.rounds:
        CONFIGS[args.config]["train"]["rounds"] = args.rounds
    res = run_config(args.config, args.data, methods, dens)
    write(res, Path(args.out), args.part)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
