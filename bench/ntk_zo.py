"""Benchmark: federated NTK foresight pruning + federated ZO training (issue #5, docs/ntk-zo.md).

Parts (each writes ``bench/results/ntk_zo_parts/<part>.json``; ``--report`` merges them into
``bench/results/ntk_zo.{json,md,png}``):

- ``memory``: measured device training memory, BP on the dense model vs ZO on the NTK-pruned model;
- ``masks``: Jaccard of the federated (data) and data-free NTK masks to the pooled-data NTK mask, with noise
  floors, over seeds (``--seeds``, ``--samples`` R, ``--models``; protocol: ``MASK_STUDY``, docs/ntk-zo.md §4.1);
- ``mnist-<alpha>``: LeNet-5 / MNIST, ZO with dense / ntk / ntk-datafree / random / snip masks + BP FedAvg;
- ``cifar-<alpha>``: ResNet-8 / CIFAR-10, a *reduced* configuration (see ``CIFAR`` below).

Run: ``nice -n 10 .venv/bin/python bench/ntk_zo.py --part mnist-0.5`` (one part per process), then
``.venv/bin/python bench/ntk_zo.py --report``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from common import REPO, RESULTS, machine, parser, pyplot, write_results
from torch import nn

from toolchain.data.datasets import load_dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.local import evaluate
from toolchain.learning.fl.masks import apply_masks, dense_masks
from toolchain.learning.fl.memory import forward_only_memory, training_memory
from toolchain.learning.fl.simulator import seed_everything, to_tensors
from toolchain.learning.pruning import make_strategy, ntk
from toolchain.learning.pruning.zo_fl import DEFAULTS as ZO_DEFAULTS
from toolchain.learning.pruning.zo_fl import NTKZeroOrder, device_graph, sparse_forward_macs
from toolchain.models.zoo import build_model

PARTS = RESULTS / "ntk_zo_parts"
CIFAR_DIR = REPO.parent / "shared" / "data" / "cifar10"
MASKS = ("dense", "ntk", "ntk-datafree", "random", "snip")

# ZO hyper-parameters. K=10 (below BAFFLE's 100-500: compute budget), mu=1e-3 (MeZO), forward difference,
# server clip of the aggregated scalars at 2 (stateless, broadcast as clipped). lr per mask from short
# centralised pilots (docs/ntk-zo.md): the dense net needs a smaller lr than the 10 %-dense ones.
MNIST = {"model": "lenet5", "dataset": "mnist", "data": None, "clients": 10, "per_round": 5, "rounds": 120,
         "batch": 16, "K": 10, "mu": 1e-3, "density": 0.1, "eval_every": 20, "eval_samples": 1000,
         "lr": {"dense": 0.005, "ntk": 0.01, "ntk-datafree": 0.01, "random": 0.01, "snip": 0.01}, "clip": 2.0,
         "T": 10, "bp_rounds": 3, "train_subset": None}
# Reduced CIFAR-10: 10k training images, 5 of 10 clients per round, K=10, batch 8, 30 rounds, T=5.
CIFAR = {"model": "resnet8", "dataset": "cifar10", "data": str(CIFAR_DIR), "clients": 10, "per_round": 5,
         "rounds": 30, "batch": 8, "K": 10, "mu": 1e-3, "density": 0.1, "eval_every": 10, "eval_samples": 500,
         "lr": {"dense": 0.005, "ntk": 0.01, "ntk-datafree": 0.01, "random": 0.01, "snip": 0.01}, "clip": 2.0,
         "T": 5, "bp_rounds": 1, "train_subset": 10000, "masks": ("dense", "ntk", "ntk-datafree")}


def machine_info() -> dict[str, Any]:
    return machine("platform", "python", "torch", "cpus", "torch_threads",
                   note="2 cores shared with other jobs (nice 10)")


def dataset(spec: dict[str, Any]):
    data = load_dataset(spec["dataset"], spec["data"])
    if spec.get("train_subset"):
        sel = np.random.default_rng(0).permutation(len(data.y_train))[:spec["train_subset"]]
        data = type(data)(data.name, data.x_train[sel], data.y_train[sel], data.x_test, data.y_test,
                          data.num_classes, data.preprocessing)
    return data


def config(spec: dict[str, Any], alpha: float, algo_options: dict[str, Any], rounds: int | None = None,
           batch: int | None = None, lr: float = 0.05) -> TrainConfig:
    return TrainConfig(rounds=rounds or spec["rounds"], clients=spec["clients"], per_round=spec["per_round"],
                       batch_size=batch or spec["batch"], lr=lr, density=spec["density"], partition="dirichlet",
                       alpha=alpha, seed=spec.get("seed", 0), eval_every=spec["eval_every"],
                       eval_samples=spec["eval_samples"],
                       algo_options=algo_options)


def run_zo(spec: dict[str, Any], data, alpha: float, mask: str, keep_model: bool = False) -> dict[str, Any]:
    opts = {"mask": mask, "K": spec["K"], "mu": spec["mu"], "lr": spec["lr"][mask], "clip": spec["clip"],
            "T": spec["T"], "batch": spec["batch"]}
    cfg = config(spec, alpha, opts)
    fed = Federation.from_dataset(data, cfg)
    seed_everything(spec.get("seed", 0))
    model = build_model(spec["model"], data.input_shape, data.num_classes)
    strategy = make_strategy("ntk-zo", cfg)
    t0 = time.time()
    hist = simulate(strategy, model, fed, cfg, progress=False)
    fwd = np.cumsum([r.extra["sample_forwards"] for r in hist])
    flops = np.cumsum([r.extra["flops"] for r in hist])
    curve = [{"round": r.round, "sample_forwards": int(f), "flops": float(fl), "accuracy": r.accuracy,
              "train_loss": r.train_loss} for r, f, fl in zip(hist, fwd, flops, strict=True) if r.accuracy == r.accuracy]
    zo_rounds = hist[1:]  # round 1 also carries the model download and (NTK) the pruning exchange
    out = {"mask": mask, "alpha": alpha, "options": opts, "density": hist[-1].density,
            "active_weights": hist[-1].extra["active_weights"], "macs_per_sample": strategy.macs_per_sample,
            "flops_per_round": float(np.mean([r.extra["flops"] for r in hist])),
            "sample_forwards_per_round": float(np.mean([r.extra["sample_forwards"] for r in hist])),
            "bytes_up_per_client_round": max(r.bytes_up_per_client for r in zo_rounds),
            "bytes_down_per_client_round": float(np.mean([r.bytes_down_per_client for r in zo_rounds])),
            # a round in which every sampled client already holds the model: only seeds and scalars come down
            "bytes_down_per_client_round_min": float(min(r.bytes_down_per_client for r in zo_rounds)),
            "round1_bytes_up_per_client": hist[0].bytes_up_per_client,
            "round1_bytes_down_per_client": hist[0].bytes_down_per_client,
            "device_memory": hist[-1].device_memory, "final_accuracy": hist[-1].accuracy,
            "best_accuracy": max(c["accuracy"] for c in curve), "curve": curve, "wall_s": time.time() - t0}
    if keep_model:
        out["model"] = strategy.model
    return out


def run_bp(spec: dict[str, Any], data, alpha: float) -> dict[str, Any]:
    cfg = config(spec, alpha, {}, rounds=spec["bp_rounds"], batch=32, lr=0.05)
    cfg.eval_every = 1
    fed = Federation.from_dataset(data, cfg)
    seed_everything(0)
    model = build_model(spec["model"], data.input_shape, data.num_classes)
    macs = sparse_forward_macs(model, dense_masks(model), data.input_shape)
    t0 = time.time()
    hist = simulate(make_strategy("fedavg", cfg), model, fed, cfg, progress=False)
    sizes = [len(c.y) for c in fed.clients]
    # a BP step costs about 3 forwards (forward + backward w.r.t. activations and weights)
    per_round = [3 * cfg.local_epochs * sum(sizes[c] for c in r.clients) for r in hist]
    fwd = np.cumsum(per_round)
    curve = [{"round": r.round, "sample_forwards": int(f), "flops": float(2 * macs * f), "accuracy": r.accuracy}
             for r, f in zip(hist, fwd, strict=True)]
    return {"mask": "bp-fedavg-dense", "alpha": alpha, "final_accuracy": hist[-1].accuracy, "curve": curve,
            "flops_per_round": float(2 * macs * np.mean(per_round)), "macs_per_sample": macs,
            "bytes_up_per_client_round": float(np.mean([r.bytes_up_per_client for r in hist])),
            "device_memory": hist[-1].device_memory, "wall_s": time.time() - t0}


def part_train(name: str, spec: dict[str, Any], alpha: float) -> dict[str, Any]:
    data = dataset(spec)
    runs = [run_bp(spec, data, alpha)]
    for mask in spec.get("masks", MASKS):
        runs.append(run_zo(spec, data, alpha, mask))
        print(f"{name} {mask}: acc {runs[-1]['final_accuracy']:.4f} ({runs[-1]['wall_s']:.0f} s)", flush=True)
    cfg = {k: v for k, v in spec.items() if k != "data"}
    return {"spec": cfg, "alpha": alpha, "runs": runs}


# ---- (b) longer horizon with a per-mask lr chosen on held-out data ----------------------------------------------
# The 120-round runs above use one lr per mask from short pilots. Here every mask gets the same lr grid, the lr is
# chosen by accuracy on a validation split held out of the training set (never the test set), and the chosen
# run's final model is then scored on the full 10k test set. K = 20 (the strategy default), 600 rounds.
SWEEP = {**MNIST, "rounds": 600, "K": 20, "eval_every": 100, "eval_samples": 2000, "val": 5000,
         "lrs": (0.0025, 0.005, 0.01, 0.02, 0.04), "masks": ("dense", "ntk", "ntk-datafree")}


def held_out(spec: dict[str, Any]) -> tuple[Any, Callable[[nn.Module], float]]:
    """The federation's data without ``spec["val"]`` held-out training images, which the simulator evaluates on
    (its ``x_test``), and a scorer on the real test set, used only for the chosen runs."""
    full = dataset(spec)
    perm = np.random.default_rng(0xA1).permutation(len(full.y_train))
    val, train = perm[:spec["val"]], perm[spec["val"]:]
    data = type(full)(full.name, full.x_train[train], full.y_train[train], full.x_train[val], full.y_train[val],
                      full.num_classes, full.preprocessing)
    tx, ty = to_tensors(full.x_test, full.y_test, full)
    return data, lambda model: evaluate(model, tx, ty)[0]


def part_seeds(alpha: float, seeds: int) -> dict[str, Any]:
    """The lr each mask chose in sweep-ALPHA / density-ALPHA-D (on seed 0's held-out data), re-run with seeds
    1..seeds-1 (partition, initialisation, ZO perturbations): test accuracy mean +- std over seeds."""
    chosen = []
    for f in sorted(PARTS.glob(f"sweep-{alpha}.json")) + sorted(PARTS.glob(f"density-{alpha}-*.json")):
        part = json.loads(f.read_text())
        for mask, c in part["chosen"].items():
            chosen.append({"mask": mask, "density": 1.0 if mask == "dense" else part["spec"]["density"],
                           "lr": c["lr"], "seed0_test_accuracy": c["test_accuracy"],
                           "flops_per_round": c["flops_per_round"]})
    data, test_accuracy = held_out(SWEEP)  # the split depends on neither mask nor density
    rows = []
    for c in chosen:
        spec = {**SWEEP, "density": c["density"], "lr": {c["mask"]: c["lr"]}}
        accs = [c["seed0_test_accuracy"]]
        for seed in range(1, seeds):
            rec = run_zo({**spec, "seed": seed}, data, alpha, c["mask"], keep_model=True)
            accs.append(test_accuracy(rec.pop("model")))
            print(f"seeds-{alpha} {c['mask']} d {c['density']} lr {c['lr']} seed {seed}: test {accs[-1]:.4f} "
                  f"({rec['wall_s']:.0f} s)", flush=True)
        rows.append({**c, "test_accuracy_by_seed": accs})
    return {"alpha": alpha, "seeds": seeds, "rows": rows}


def part_sweep(alpha: float, density: float | None = None, masks: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Each mask's lr chosen on held-out data (§4.2). ``density``/``masks``: the density ablation
    (``--part density-0.1-0.3``): the same protocol for NTK masks at another density; dense ZO and NTK at 0.1 are
    the rows of ``sweep-ALPHA``, which uses the same split, seed and lr grid."""
    spec = {**SWEEP, **({"density": density} if density is not None else {}), **({"masks": masks} if masks else {})}
    data, test_accuracy = held_out(spec)
    runs: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    for mask in spec["masks"]:
        grid, mine = list(spec["lrs"]), []
        while len(mine) < len(grid):
            lr = grid[len(mine)]
            rec = run_zo({**spec, "lr": {mask: lr}}, data, alpha, mask, keep_model=True)
            rec["val_accuracy"] = rec["final_accuracy"]
            rec["test_accuracy"] = test_accuracy(rec.pop("model"))
            mine.append(rec)
            print(f"sweep-{alpha} {mask} d {spec['density']} lr {lr}: val {rec['val_accuracy']:.4f} test {rec['test_accuracy']:.4f} "
                  f"({rec['wall_s']:.0f} s)", flush=True)
            if len(mine) == len(grid) and len(grid) < len(spec["lrs"]) + 2:
                # a best lr on the grid's edge extends the grid by a factor 2 beyond it (at most twice)
                best_lr = max(mine, key=lambda r: r["val_accuracy"])["options"]["lr"]
                if best_lr == min(grid):
                    grid.append(best_lr / 2)
                elif best_lr == max(grid):
                    grid.append(best_lr * 2)
        runs += mine
        best = max(mine, key=lambda r: r["val_accuracy"])
        chosen[mask] = {"lr": best["options"]["lr"], "val_accuracy": best["val_accuracy"],
                        "test_accuracy": best["test_accuracy"], "flops_per_round": best["flops_per_round"],
                        "sample_forwards_per_round": best["sample_forwards_per_round"],
                        "active_weights": best["active_weights"]}
    return {"spec": {k: v for k, v in spec.items() if k != "data"}, "alpha": alpha, "runs": runs, "chosen": chosen}


# ---- (d) mask agreement -------------------------------------------------------------------------------------
# Protocol (docs/ntk-zo.md §4.1). One replicate s fixes the Dirichlet partition, the per-step client samples,
# the NTK seed (theta and Delta of every step and draw: the protocol's ``derive(master_seed(s), 0x4E544B)``)
# and the input draws. Within a replicate every mask uses that NTK seed (common random numbers), the same T,
# density, eps, layer floor and draws R, and the same number of scored inputs per step; only where the data
# sits differs. Baselines: a second pooled mask on an independent input sample (same seeds), a pooled mask
# with other NTK seeds, and layer-matched chance. The NTK options are the strategy's defaults (``DEFAULTS``).
MASK_STUDY = {"clients": 100, "per_step": 10, "alphas": (0.1, 0.5), "density": 0.1, "seeds": 10,
              "T": ZO_DEFAULTS["T"], "ntk_batch": ZO_DEFAULTS["ntk_batch"], "eps": ZO_DEFAULTS["eps"],
              "ntk_min_layer": ZO_DEFAULTS["ntk_min_layer"], "ntk_samples": ZO_DEFAULTS["ntk_samples"]}
MASK_DATA = {"lenet5": ("mnist", None), "resnet8": ("cifar10", str(CIFAR_DIR))}
# two-sided 95 % Student-t quantiles, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}


def federated_ntk(model, fed: Federation, cfg: TrainConfig, datafree: bool, cohorts: list[list[int]],
                  data_seed: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The federated NTK mask exactly as ``--algo ntk-zo`` computes it (setup exchanges, encoded messages), with
    the clients of step tau = ``cohorts[tau - 1]``. Returns the mask and the inputs scored per step."""
    opts = dict(cfg.algo_options, mask="ntk-datafree" if datafree else "ntk")
    strat = NTKZeroOrder(TrainConfig(**{**cfg.as_dict(), "algo_options": opts}))
    ctx = type("Ctx", (), {"extra": {}, "server_x": fed.clients[0].x[:8], "server_y": fed.clients[0].y[:8]})()
    strat.setup(copy.deepcopy(model), ctx)
    scratch = copy.deepcopy(model)
    scored = []
    assert strat.setup_steps(1) == len(cohorts)
    for step, cids in enumerate(cohorts):
        ins = strat.configure_setup(1, step, cids)
        res = []
        for c in cids:
            gen = torch.Generator().manual_seed(ntk.derive(data_seed, 1000 * (step + 1) + c))  # fresh draw per step
            reply = strat.client_setup(ntk.PruneIns.from_bytes(ins[c].to_bytes()), fed.clients[c], scratch, gen)
            res.append(ntk.PruneRes.from_bytes(reply.to_bytes()))
        scored.append(sum(ins[c].batch if datafree else min(ins[c].batch, len(fed.clients[c].y)) for c in cids))
        strat.aggregate_setup(1, step, res)
    return strat.masks, scored


def chance_jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Expected Jaccard of two independent uniformly random masks with the layer-wise kept counts of a and b."""
    inter = sum(float(a[k].sum()) * float(b[k].sum()) / a[k].numel() for k in a)
    size = sum(float(a[k].sum()) + float(b[k].sum()) for k in a)
    return inter / (size - inter)


def summary(xs: list[float]) -> dict[str, float]:
    """Mean, sample std and the two-sided 95 % t interval of the mean."""
    arr = np.asarray(xs, dtype=np.float64)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    half = T975.get(len(arr) - 1, 1.96) * std / np.sqrt(len(arr)) if len(arr) > 1 else float("inf")
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": len(arr)}


MASK_PAIRS = ("federated_vs_pooled", "federated_cohort_vs_pooled", "datafree_vs_pooled",
              "pooled_vs_pooled_same_seeds", "pooled_vs_pooled_other_seeds", "chance_layer_matched",
              "federated_vs_datafree", "datafree_minus_federated")


def mask_replicate(model_name: str, data, s: int, samples: int, objective: str = "trace") -> list[dict[str, Any]]:
    """One replicate (seed ``s``) of every mask, for each Dirichlet alpha of the study."""
    st = MASK_STUDY
    opts = {"T": st["T"], "ntk_batch": st["ntk_batch"], "eps": st["eps"], "ntk_min_layer": st["ntk_min_layer"],
            "ntk_samples": samples, "ntk_objective": objective}
    seed_everything(s)
    model = build_model(model_name, data.input_shape, data.num_classes)
    rng = np.random.default_rng(ntk.derive(s, 0xC0))
    cohorts = [sorted(int(c) for c in rng.choice(st["clients"], st["per_step"], replace=False))
               for _ in range(st["T"])]
    data_seed = ntk.derive(s, 0xDA7A)
    out, df_mask = [], None
    for alpha in st["alphas"]:
        t0 = time.time()
        cfg = TrainConfig(rounds=1, clients=st["clients"], per_round=st["per_step"], density=st["density"],
                          partition="dirichlet", alpha=alpha, seed=s, algo_options=opts)
        fed = Federation.from_dataset(data, cfg)
        fed_mask, scored = federated_ntk(model, fed, cfg, False, cohorts, data_seed)
        # as `toolchain train` runs it: round 1's sampled clients do all T steps (simulator setup exchanges)
        cohort_mask, _ = federated_ntk(model, fed, cfg, False, [cohorts[0]] * st["T"], data_seed)
        if df_mask is None:  # data-free never reads the data, so it does not depend on the partition
            df_mask, _ = federated_ntk(model, fed, cfg, True, cohorts, data_seed)
        seed = ntk.derive(NTKZeroOrder(cfg).master_seed, 0x4E544B)  # the NTK seed the protocol broadcasts
        other_seed = ntk.derive(NTKZeroOrder(TrainConfig(seed=s + 10_000)).master_seed, 0x4E544B)
        pool_x = torch.cat([c.x for c in fed.clients])

        def pooled(tag: int, pool_x: torch.Tensor = pool_x, scored: list[int] = scored):
            def x_fn(tau: int) -> torch.Tensor:  # as many pooled inputs as the federation scored at step tau
                g = torch.Generator().manual_seed(ntk.derive(ntk.derive(data_seed, tag), tau))
                return pool_x[torch.randperm(len(pool_x), generator=g)[:scored[tau - 1]]]
            return x_fn

        def central(x_fn, ntk_seed: int):
            return ntk.centralised_ntk_masks(model, x_fn, st["density"], st["T"], ntk_seed, st["eps"], samples,
                                             st["ntk_min_layer"], objective)

        pool_a, pool_b, pool_c = central(pooled(1), seed), central(pooled(2), seed), central(pooled(3), other_seed)
        j = {"federated_vs_pooled": ntk.jaccard(fed_mask, pool_a),
             "federated_cohort_vs_pooled": ntk.jaccard(cohort_mask, pool_a),
             "datafree_vs_pooled": ntk.jaccard(df_mask, pool_a),
             "pooled_vs_pooled_same_seeds": ntk.jaccard(pool_a, pool_b),
             "pooled_vs_pooled_other_seeds": ntk.jaccard(pool_a, pool_c),
             "chance_layer_matched": chance_jaccard(pool_a, pool_b),
             "federated_vs_datafree": ntk.jaccard(fed_mask, df_mask)}
        j["datafree_minus_federated"] = j["datafree_vs_pooled"] - j["federated_vs_pooled"]
        out.append({"alpha": alpha, "seed": s, "jaccard": j, "scored_per_step": scored,
                    "chance_federated_vs_pooled": chance_jaccard(fed_mask, pool_a),
                    "chance_datafree_vs_pooled": chance_jaccard(df_mask, pool_a),
                    "layer_density": {k: {"federated": float(fed_mask[k].float().mean()),
                                          "federated_cohort": float(cohort_mask[k].float().mean()),
                                          "datafree": float(df_mask[k].float().mean()),
                                          "pooled": float(pool_a[k].float().mean())} for k in fed_mask},
                    "wall_s": time.time() - t0})
    return out


def part_masks(models: list[str], samples: int, seeds: int, objective: str = "trace") -> dict[str, Any]:
    """Jaccard agreement of the federated / data-free masks with the pooled-data mask over ``seeds`` replicates.

    Rows are keyed (model, R, alpha, objective); a run replaces its own rows in ``masks.json`` and keeps the
    others (rows without an objective predate the option: trace)."""
    path = PARTS / "masks.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    for r in old.get("rows", []):
        r.setdefault("objective", "trace")
    key = ("model", "objective", "samples", "alpha")
    rows = {tuple(r[k] for k in key): r for r in old.get("rows", [])}  # old format: no "rows"
    for model_name in models:
        name, data_dir = MASK_DATA[model_name]
        data = load_dataset(name, data_dir)
        reps: dict[float, list[dict[str, Any]]] = {a: [] for a in MASK_STUDY["alphas"]}
        for s in range(seeds):
            for rec in mask_replicate(model_name, data, s, samples, objective):
                reps[rec["alpha"]].append(rec)
                print(json.dumps({"model": model_name, "objective": objective, "R": samples, "alpha": rec["alpha"],
                                  "seed": s,
                                  **{k: round(v, 4) for k, v in rec["jaccard"].items()},
                                  "wall_s": round(rec["wall_s"], 1)}), flush=True)
        for alpha, rr in reps.items():
            rows[(model_name, objective, samples, alpha)] = {
                "model": model_name, "dataset": name, "alpha": alpha, "samples": samples, "objective": objective,
                "T": MASK_STUDY["T"],
                "seeds": seeds, **{k: summary([r["jaccard"][k] for r in rr]) for k in MASK_PAIRS},
                "datafree_closer_in": sum(r["jaccard"]["datafree_minus_federated"] > 0 for r in rr),
                "scored_per_step_mean": float(np.mean([np.mean(r["scored_per_step"]) for r in rr])),
                "scored_per_step_min": int(min(min(r["scored_per_step"]) for r in rr)),
                "replicates": rr, "wall_s": sum(r["wall_s"] for r in rr)}
        res = {"protocol": {**MASK_STUDY, "alphas": list(MASK_STUDY["alphas"]), "seeds": "per row"},
               "rows": sorted(rows.values(), key=lambda r: tuple(r[k] for k in key)),
               "machine": machine_info()}
        res["wall_s"] = sum(r["wall_s"] for r in res["rows"])
        PARTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def part_memory() -> dict[str, Any]:
    out = []
    for spec, shape in ((MNIST, (28, 28, 1)), (CIFAR, (32, 32, 3))):
        seed_everything(0)
        model = build_model(spec["model"], shape, 10)
        h, w, c = shape
        dense = dense_masks(model)
        fed_like = ntk.centralised_ntk_masks(
            model, lambda tau, c=c, h=h, w=w: torch.randn(64, c, h, w, generator=torch.Generator().manual_seed(tau)),
            spec["density"], spec["T"], 5, min_layer=0.01)
        for batch in (1, spec["batch"]):
            x = torch.randn(batch, c, h, w)
            y = torch.zeros(batch, dtype=torch.long)
            bp = training_memory(model, dense, x, y, "sgd", 0.9)
            zo_dense = forward_only_memory(model, dense, x, 4 * spec["K"], device_graph(model))
            pruned = copy.deepcopy(model)
            apply_masks(pruned, fed_like)
            zo = forward_only_memory(pruned, fed_like, x, 4 * spec["K"], device_graph(pruned))
            zo_torch_graph = forward_only_memory(pruned, fed_like, x, 4 * spec["K"])
            out.append({"model": spec["model"], "batch": batch, "bp_dense": bp.as_dict(),
                        "zo_dense": zo_dense.as_dict(), "zo_ntk_pruned": zo.as_dict(),
                        "zo_ntk_pruned_unfolded_torch_graph": zo_torch_graph.as_dict(),
                        "ratio_bp_dense_over_zo_pruned": bp.total / zo.total,
                        "ratio_bp_dense_over_zo_dense": bp.total / zo_dense.total,
                        "density": sum(int(m.sum()) for m in fed_like.values()) / sum(m.numel() for m in fed_like.values())})
            print(json.dumps({k: out[-1][k] for k in ("model", "batch", "ratio_bp_dense_over_zo_pruned")}), flush=True)
    return {"memory": out}


# ---- report ----------------------------------------------------------------------------------------------
def at_budget(curve: list[dict[str, Any]], budget: float) -> float | None:
    """Accuracy of the last evaluation at or below ``budget`` sample forwards."""
    pts = [c["accuracy"] for c in curve if c["sample_forwards"] <= budget]
    return pts[-1] if pts else None


def _log_x_axes(ax: Any, ticks: list[float], xlabel: str, ylabel: str, title: str) -> None:
    """A log x axis labelled at ``ticks`` only, with the report's grid and legend."""
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def density_ablation(parts: dict[str, Any], acceptance: dict[str, Any]) -> list[str]:
    """(b)'s ablation: NTK masks at several densities against dense ZO, each lr chosen on held-out data.

    Pruning lowers the ZO estimate's variance (fewer perturbed weights) and the network's capacity; at 0.1 the second
    won (§4.2). If variance were the binding limit, some density between 0.1 and 1 would beat dense ZO."""
    dens = sorted((k for k in parts if k.startswith("density-")), key=lambda k: parts[k]["spec"]["density"])
    if not dens:
        return []
    alpha = parts[dens[0]]["alpha"]
    base = parts.get(f"sweep-{alpha}")
    if base is None:
        return [f"(density ablation: sweep-{alpha} is missing; run it first)", ""]
    rows = [("dense", 1.0, base["chosen"]["dense"]), ("ntk", base["spec"]["density"], base["chosen"]["ntk"])]
    rows += [("ntk", parts[k]["spec"]["density"], parts[k]["chosen"]["ntk"]) for k in dens]
    rows.sort(key=lambda r: r[1])
    dense = base["chosen"]["dense"]
    lines = [f"## (b) ablation: NTK mask density (Dirichlet {alpha})", "",
             f"The protocol of sweep-{alpha} (same split, seed, {base['spec']['rounds']} rounds, K = "
             f"{base['spec']['K']}, lr grid) for NTK masks at more densities (`--part density-{alpha}-D`). Pruning "
             "cuts the ZO estimate's variance (fewer perturbed weights) and the network's capacity; if the variance "
             "were what binds, a density between 0.1 and 1 would beat dense ZO.", "",
             "| mask | density | active weights | chosen lr | val acc | test acc | test acc - dense | FLOPs / round |",
             "|---|---|---|---|---|---|---|---|"]
    for mask, d, c in rows:
        lines.append(f"| {mask} | {d:g} | {c['active_weights']} | {c['lr']} | {c['val_accuracy']:.4f} | "
                     f"{c['test_accuracy']:.4f} | {100 * (c['test_accuracy'] - dense['test_accuracy']):+.1f} points | "
                     f"{c['flops_per_round']:.3g} |")
    acceptance[f"b_density_ablation_{alpha}"] = {f"{m}_{d:g}": {"test_acc": c["test_accuracy"], "lr": c["lr"],
                                                              "flops_per_round": c["flops_per_round"]}
                                                 for m, d, c in rows}
    seeded = parts.get(f"seeds-{alpha}")
    if seeded:
        by = {(r["mask"], r["density"]): r for r in seeded["rows"]}
        ref = np.array(by[("dense", 1.0)]["test_accuracy_by_seed"])
        lines += ["", f"The chosen lrs again with seeds 1..{seeded['seeds'] - 1} (`--part seeds-{alpha} --seeds "
                  f"{seeded['seeds']}`: partition, initialisation and ZO perturbations change; the lr stays seed "
                  "0's choice). Difference to dense ZO paired by seed, mean +- std.", "",
                  "| mask | density | lr | test acc per seed | mean +- std | - dense ZO, paired (points) |",
                  "|---|---|---|---|---|---|"]
        summary = {}
        for (mask, d), r in sorted(by.items(), key=lambda kv: kv[0][1]):
            a = np.array(r["test_accuracy_by_seed"])
            diff = 100 * (a - ref)
            summary[f"{mask}_{d:g}"] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)),
                                        "minus_dense_mean": float(diff.mean()), "minus_dense_std": float(diff.std(ddof=1))}
            lines.append(f"| {mask} | {d:g} | {r['lr']} | {' / '.join(f'{x:.4f}' for x in a)} | "
                         f"{100 * a.mean():.1f} +- {100 * a.std(ddof=1):.1f} % | "
                         + ("-" if mask == "dense" else f"{diff.mean():+.1f} +- {diff.std(ddof=1):.1f}") + " |")
        acceptance[f"b_density_ablation_{alpha}_seeds"] = summary
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ntk_rows = [r for r in rows if r[0] == "ntk"]
    ax.plot([r[1] for r in ntk_rows], [100 * r[2]["test_accuracy"] for r in ntk_rows], marker="o",
            label="NTK ZO, seed 0")
    ax.axhline(100 * dense["test_accuracy"], color="k", ls="--", label=f"dense ZO (lr {dense['lr']}), seed 0")
    if seeded:
        m = [summary[f"ntk_{d:g}"] for _, d, _ in ntk_rows]
        ax.errorbar([r[1] * 1.04 for r in ntk_rows], [100 * x["mean"] for x in m], [100 * x["std"] for x in m],
                    fmt="s", ms=4, capsize=3, color="C1", label=f"NTK ZO, {seeded['seeds']} seeds")
        dm, ds = summary["dense_1"]["mean"], summary["dense_1"]["std"]
        ax.axhspan(100 * (dm - ds), 100 * (dm + ds), color="k", alpha=0.1, label=f"dense ZO, {seeded['seeds']} seeds")
    for _, d, c in ntk_rows:
        ax.annotate(f"lr {c['lr']}", (d, 100 * c["test_accuracy"]), fontsize=7, xytext=(3, -10),
                    textcoords="offset points")
    _log_x_axes(ax, [r[1] for r in ntk_rows], "density", "test accuracy (%)",
                f"LeNet-5 / MNIST, Dir {alpha}, {base['spec']['rounds']} ZO rounds")
    fig.tight_layout()
    fig.savefig(RESULTS / "ntk_zo_density.png", dpi=120)
    plt.close(fig)
    return lines + ["", "![test accuracy per density](ntk_zo_density.png)", ""]


def report() -> None:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json"))}
    lines = ["# NTK foresight pruning + federated ZO training (issue #5)", "",
             "Generated by `bench/ntk_zo.py`; method and choices in `docs/ntk-zo.md`. Machine: "
             f"{machine_info()['platform']}, torch {torch.__version__}, 1 torch thread, 2 cores shared with other jobs.", ""]
    wall = sum(p.get("wall_s", 0) for p in parts.values())
    lines.append(f"Wall time: {wall / 60:.1f} min summed over the parts, each under `nice -n 10`: the memory part ran "
                 "3-5 at a time with other engineers' jobs (load average 14-17); the mask study (d) with a load average "
                 "about 4; the four training parts (b, c) were re-run after the aggregation fix, two at a time on an "
                 "otherwise idle machine; the two sweep parts and the Frobenius rows of (d) ran two at a time on an "
                 "otherwise idle machine (sweeps 19.5 + 19.1 min, Frobenius rows 4.8 min LeNet-5, 37.8 min ResNet-8); the "
                 "density and seed parts of (b)'s ablation one at a time beside two CIFAR-10 grid workers (load about 3).")
    lines.append("")
    acceptance: dict[str, Any] = {}
    if "memory" in parts:
        lines += ["## (a) Device training memory (measured)", "",
                  "| model | batch | BP dense total | ZO dense total | ZO NTK-pruned total (weights / act / scalars) "
                  "| BP dense / ZO pruned |", "|---|---|---|---|---|---|"]
        for m in parts["memory"]["memory"]:
            z = m["zo_ntk_pruned"]
            lines.append(f"| {m['model']} | {m['batch']} | {m['bp_dense']['total']} | {m['zo_dense']['total']} | "
                         f"{z['total']} ({z['weights']} / {z['activations']} / {z['extra']}) | "
                         f"{m['ratio_bp_dense_over_zo_pruned']:.1f}x |")
        acceptance["a_memory_ratio"] = {f"{m['model']}_b{m['batch']}": m["ratio_bp_dense_over_zo_pruned"]
                                        for m in parts["memory"]["memory"]}
        mem = parts["memory"]["memory"]
        for model in dict.fromkeys(m["model"] for m in mem):
            rows = sorted((m for m in mem if m["model"] == model), key=lambda m: m["batch"])
            # ZO streams its batch one sample at a time; BP at the training batch holds every activation
            acceptance["a_memory_ratio"][f"{model}_bp_b{rows[-1]['batch']}_vs_zo_stream"] = (
                rows[-1]["bp_dense"]["total"] / rows[0]["zo_ntk_pruned"]["total"])
        lines.append("")
    train_parts = [k for k in parts if k.startswith(("mnist", "cifar"))]
    if train_parts:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(train_parts), figsize=(5 * len(train_parts), 3.6), squeeze=False)
        lines += ["## (b, c) Accuracy per forward pass, FLOPs, bytes", ""]
        for ax, key in zip(axes[0], train_parts, strict=True):
            p = parts[key]
            zo_runs = [r for r in p["runs"] if r["mask"] != "bp-fedavg-dense"]
            budget = min(r["curve"][-1]["sample_forwards"] for r in zo_runs)
            lines += [f"### {key} ({p['spec']['model']}, Dirichlet {p['alpha']}, {p['spec']['clients']} clients, "
                      f"{p['spec']['per_round']} per round, K={p['spec']['K']}, batch {p['spec']['batch']}, "
                      f"{p['spec']['rounds']} rounds)", "",
                      f"Common budget: {budget:.3g} sample forwards per federation.", "",
                      "| run | density | acc @ budget | final acc | FLOPs / round | fwd / round | up B / client-round "
                      "| down B / client-round (mean, min) | round-1 up / down B | device mem B | wall s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in p["runs"]:
                acc_b = at_budget(r["curve"], budget)
                xs = [c["sample_forwards"] for c in r["curve"]]
                ys = [100 * c["accuracy"] for c in r["curve"]]
                ax.plot(xs, ys, marker="o", ms=2, label=r["mask"])
                if r["mask"] == "bp-fedavg-dense":
                    lines.append(f"| BP FedAvg dense (reference) | 1.0 | {'' if acc_b is None else f'{acc_b:.4f}'} | "
                                 f"{r['final_accuracy']:.4f} | {r['flops_per_round']:.3g} | - | "
                                 f"{r['bytes_up_per_client_round']:.0f} | - | - | {r['device_memory']['total']} | "
                                 f"{r['wall_s']:.0f} |")
                    continue
                lines.append(f"| ZO {r['mask']} (lr {r['options']['lr']}) | {r['density']:.4f} | "
                             f"{'' if acc_b is None else f'{acc_b:.4f}'} | {r['final_accuracy']:.4f} | "
                             f"{r['flops_per_round']:.3g} | {r['sample_forwards_per_round']:.0f} | "
                             f"{r['bytes_up_per_client_round']:.0f} | {r['bytes_down_per_client_round']:.0f} "
                             f"(min {r['bytes_down_per_client_round_min']:.0f}) | "
                             f"{r['round1_bytes_up_per_client']:.0f} / {r['round1_bytes_down_per_client']:.0f} | "
                             f"{r['device_memory']['total']} | {r['wall_s']:.0f} |")
            by = {r["mask"]: r for r in zo_runs}
            if "dense" in by and "ntk" in by:
                acceptance[f"b_{key}"] = {
                    "ntk_acc_at_budget": at_budget(by["ntk"]["curve"], budget),
                    "dense_acc_at_budget": at_budget(by["dense"]["curve"], budget),
                    "ntk_flops_per_round": by["ntk"]["flops_per_round"],
                    "dense_flops_per_round": by["dense"]["flops_per_round"]}
            acceptance[f"c_{key}_max_upload"] = max(r["bytes_up_per_client_round"] for r in zo_runs)
            acceptance[f"c_{key}_bound_8K_16"] = 8 * p["spec"]["K"] + 16
            lines.append("")
            ax.set_xscale("log")
            ax.set_xlabel("sample forward passes (BP: 3 per sample-step)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(key)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "ntk_zo.png", dpi=120)
        plt.close(fig)
        lines += ["![accuracy per forward pass](ntk_zo.png)", ""]
    sweep_parts = [k for k in parts if k.startswith("sweep-")]
    if sweep_parts:
        plt = pyplot()
        sp = parts[sweep_parts[0]]["spec"]
        lines += ["## (b) Longer horizon, lr chosen per mask on held-out data", "",
                  f"LeNet-5 / MNIST, {sp['clients']} clients, {sp['per_round']} per round, K = {sp['K']}, batch "
                  f"{sp['batch']}, {sp['rounds']} rounds, density {sp['density']}, T = {sp['T']}. Every mask runs the "
                  f"same lr grid {list(sp['lrs'])} (extended by 2x past an edge that wins); the lr is chosen by "
                  f"accuracy on {sp['val']} training images held out of the federation (evaluated on "
                  f"{sp['eval_samples']} of them), and the chosen run's final model is scored on the full 10k test "
                  "set. Every mask has the same number of forward passes per round, so 'same forward passes' is "
                  "'same rounds'.", ""]
        fig, axes = plt.subplots(1, len(sweep_parts), figsize=(5 * len(sweep_parts), 3.6), squeeze=False)
        for ax, key in zip(axes[0], sweep_parts, strict=True):
            p = parts[key]
            lines += [f"### {key} (Dirichlet {p['alpha']})", "",
                      "| mask | lr | val acc | test acc | FLOPs / round | fwd / round | active weights | wall s |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in sorted(p["runs"], key=lambda r: (r["mask"], r["options"]["lr"])):
                pick = " **(chosen)**" if p["chosen"][r["mask"]]["lr"] == r["options"]["lr"] else ""
                lines.append(f"| {r['mask']} | {r['options']['lr']}{pick} | {r['val_accuracy']:.4f} | "
                             f"{r['test_accuracy']:.4f} | {r['flops_per_round']:.3g} | "
                             f"{r['sample_forwards_per_round']:.0f} | {r['active_weights']} | {r['wall_s']:.0f} |")
            for mask in p["chosen"]:
                mine = sorted((r for r in p["runs"] if r["mask"] == mask), key=lambda r: r["options"]["lr"])
                ax.plot([r["options"]["lr"] for r in mine], [100 * r["val_accuracy"] for r in mine], marker="o",
                        label=mask)
            _log_x_axes(ax, sorted({r["options"]["lr"] for r in p["runs"]}), "lr", "validation accuracy (%)",
                        f"{key}: {p['spec']['rounds']} rounds")
            c = p["chosen"]
            acceptance[f"b_{key}"] = {
                "ntk_test_acc": c["ntk"]["test_accuracy"], "dense_test_acc": c["dense"]["test_accuracy"],
                "ntk_datafree_test_acc": c["ntk-datafree"]["test_accuracy"],
                "ntk_flops_per_round": c["ntk"]["flops_per_round"], "dense_flops_per_round": c["dense"]["flops_per_round"],
                "lr": {m: c[m]["lr"] for m in c}}
            lines.append("")
        fig.tight_layout()
        fig.savefig(RESULTS / "ntk_zo_sweep.png", dpi=120)
        plt.close(fig)
        lines += ["![validation accuracy per lr](ntk_zo_sweep.png)", ""]
    lines += density_ablation(parts, acceptance)
    if "masks" in parts and "rows" in parts["masks"]:
        mk = parts["masks"]
        st = mk["protocol"]
        lines += ["## (d) Mask agreement with the pooled-data NTK mask (Jaccard)", "",
                  f"{st['clients']} clients, {st['per_step']} sampled per pruning step, density {st['density']}, "
                  f"T = {st['T']}, {st['ntk_batch']} inputs per client and step (the pooled masks score as many "
                  "pooled inputs per step as the federation did), the NTK seeds of the protocol shared by every mask "
                  "of a replicate (common random numbers). Mean ± std over the replicates (seeds: partition, "
                  "client samples, NTK seeds, input draws); last column: paired difference data-free − federated, "
                  "mean [95 % t interval], and in how many replicates data-free was closer. "
                  f"Machine: {mk['machine']['platform']}, 1 torch thread, nice 10, 2 shared cores; wall time "
                  f"{mk['wall_s'] / 60:.1f} min. Protocol and reading: docs/ntk-zo.md §4.1.", "",
                  "| model | objective | R | Dirichlet | seeds | federated vs pooled | federated, one cohort for all T steps "
                  "| data-free vs pooled | pooled vs pooled (same seeds, other inputs) | pooled vs pooled (other "
                  "seeds) | chance (layer-matched) | federated vs data-free | data-free − federated |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def ms(x: dict[str, Any]) -> str:
            return f"{x['mean']:.4f} ± {x['std']:.4f}"

        for m in mk["rows"]:
            d = m["datafree_minus_federated"]
            obj = m.get("objective", "trace")
            lines.append(f"| {m['model']} | {obj} | {m['samples']} | {m['alpha']} | {m['seeds']} | "
                         f"{ms(m['federated_vs_pooled'])} | {ms(m['federated_cohort_vs_pooled'])} | "
                         f"{ms(m['datafree_vs_pooled'])} | {ms(m['pooled_vs_pooled_same_seeds'])} | "
                         f"{ms(m['pooled_vs_pooled_other_seeds'])} | {ms(m['chance_layer_matched'])} | "
                         f"{ms(m['federated_vs_datafree'])} | {d['mean']:+.4f} [{d['ci95'][0]:+.4f}, "
                         f"{d['ci95'][1]:+.4f}], {m['datafree_closer_in']}/{m['seeds']} |")
            if m["alpha"] == 0.1:
                lo, hi = d["ci95"]
                key = (f"d_{m['model']}" + ("" if obj == "trace" else f"_{obj}")
                       + ("" if m["samples"] == st["ntk_samples"] else f"_R{m['samples']}"))
                acceptance[key] = {
                    "datafree": m["datafree_vs_pooled"]["mean"], "datafree_std": m["datafree_vs_pooled"]["std"],
                    "federated": m["federated_vs_pooled"]["mean"], "federated_std": m["federated_vs_pooled"]["std"],
                    "pooled_vs_pooled_same_seeds": m["pooled_vs_pooled_same_seeds"]["mean"],
                    "datafree_minus_federated_ci95": d["ci95"], "seeds": m["seeds"], "R": m["samples"],
                    "verdict": "met" if lo > 0 else "not met" if hi < 0 else "inconclusive (interval contains 0)"}
        lines.append("")
    lines += ["## Acceptance values", "", "```json", json.dumps(acceptance, indent=1), "```", ""]
    write_results(RESULTS / "ntk_zo", {"machine": machine_info(), "acceptance": acceptance, "parts": parts},
                  "\n".join(lines), indent=1)
    print("\n".join(lines))


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--part", help="memory | masks | mnist-0.5 | mnist-0.1 | cifar-0.5 | cifar-0.1 | sweep-0.1 | "
                                   "sweep-0.5 | density-ALPHA-DENSITY, then seeds-ALPHA (after sweep-ALPHA)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--seeds", type=int, default=MASK_STUDY["seeds"], help="masks: replicates per row")
    ap.add_argument("--samples", type=int, default=MASK_STUDY["ntk_samples"], help="masks: NTK-SAP draws R per step")
    ap.add_argument("--models", default="lenet5", help="masks: comma-separated, lenet5 and/or resnet8")
    ap.add_argument("--objective", default="trace", choices=ntk.OBJECTIVES,
                    help="masks: NTK objective (trace = NTK-SAP; frobenius = spectrum-type, not additive)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.report:
        report()
        return 0
    t0 = time.time()
    if args.part == "memory":
        res = part_memory()
    elif args.part == "masks":
        res = part_masks(args.models.split(","), args.samples, args.seeds, args.objective)
    elif args.part and args.part.startswith("sweep-"):
        res = part_sweep(float(args.part.split("-")[1]))
    elif args.part and args.part.startswith("seeds-"):  # seeds-ALPHA: the chosen lrs with more seeds
        res = part_seeds(float(args.part.split("-")[1]), args.seeds)
    elif args.part and args.part.startswith("density-"):  # density-ALPHA-DENSITY: NTK masks at another density
        _, alpha, density = args.part.split("-")
        res = part_sweep(float(alpha), float(density), masks=("ntk",))
    elif args.part and args.part.split("-")[0] in ("mnist", "cifar"):
        name, alpha = args.part.split("-")
        res = part_train(args.part, MNIST if name == "mnist" else CIFAR, float(alpha))
    else:
        ap.error("pass --part or --report")
    res.update(machine=machine_info())
    res.setdefault("wall_s", time.time() - t0)  # masks: the sum over its rows, which may come from several runs
    PARTS.mkdir(parents=True, exist_ok=True)
    (PARTS / f"{args.part}.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
