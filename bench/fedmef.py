"""FedMef vs FedTiny / FedDST / PruneFL / dense FedAvg on CIFAR-10: measured memory and accuracy.

Two parts, both written to ``bench/results/fedmef.json`` + ``.md`` + ``.png`` (machine and wall time
recorded):

1. **Memory** (full models, every density; cheap): the device footprint in FedMef's definition,
   model + activations saved for backward, *measured* with saved-tensor hooks during a real training
   step (forward + backward) on a CIFAR-10 batch (``toolchain.learning.fl.sap.measure_footprint``), next to the
   formula. FedMef = NSConv model + SAP (gamma 0.7, fp16 values + int32 indices) + 1-bit ReLU masks;
   the baselines train the BN model with plain layers. Ablations separate BN removal, SAP and the
   ReLU bitmap, and gamma 0.5.
2. **Accuracy** (REDUCED configuration, clearly not the paper's: a CIFAR-10 subset, few rounds, one
   seed; see ``REDUCED`` below): each method through the registry with the same rounds, clients,
   data, seed and schedule (delta, t_end, alpha). The footprint of each method's final model is
   measured the same way.

Usage: ``nice -n 10 .venv/bin/python bench/fedmef.py [--memory-only] [--only resnet8:0.05,...]``.
Results are merged into the JSON after every run, so an interrupted benchmark keeps what it finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, RESULTS, machine, parser, pyplot, write_results

from toolchain.data.datasets import load_dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.masks import apply_masks, dense_masks
from toolchain.learning.fl.sap import enable_sap, keep_count, measure_footprint
from toolchain.learning.fl.simulator import seed_everything, to_tensors
from toolchain.learning.pruning import ALGORITHMS, make_strategy
from toolchain.learning.pruning.scores import random_masks
from toolchain.models.zoo import build_model

DATA = REPO.parent / "shared" / "data" / "cifar10"
DENSITIES = (0.01, 0.05, 0.1)
MODELS = {"resnet8": {}, "mobilenetv2": {}}
MEM_BATCH = 64  # the authors' batch size
BASELINES = ("fedtiny", "feddst", "prunefl")
REDUCED = {
    "train_samples": 3000, "eval_samples": 1000, "clients": 10, "per_round": 4, "rounds": 10, "local_epochs": 1,
    "batch_size": 32, "lr": 0.05, "optimizer": "sgd", "partition": "iid", "seed": 0,
    "schedule": {"delta": 3, "t_end": 9, "alpha": 0.3},
    "mobilenetv2_width": 0.35,
}


def machine_info() -> dict:
    return machine("platform", "python", "torch", "cpus", "torch_threads", "load_avg_at_start")


def batch(data, n: int = MEM_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    return to_tensors(data.x_train[:n], data.y_train[:n], data)


# ---- memory --------------------------------------------------------------------------------------
def sap_formula(model: torch.nn.Module, x: torch.Tensor, gamma: float) -> int:
    """Analytic bytes of the conv/linear input caches under SAP: sum keep_count(numel) * (2 + 4)."""
    sizes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].numel()))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(keep_count(n, gamma) * 6 for n in sizes)


def memory_rows(data) -> list[dict]:
    x, y = batch(data)
    rows = []
    variants = [
        # (label, method(s) it stands for, norm, sap gamma or None, relu_bits)
        ("FedMef (NSConv + SAP g=0.7 + 1-bit ReLU)", "fedmef", "nsconv", 0.7, True),
        ("FedMef, SAP g=0.5 (library)", "fedmef-g0.5", "nsconv", 0.5, True),
        ("FedMef, dense ReLU cache (ablation)", "fedmef-relu32", "nsconv", 0.7, False),
        ("NSConv, no SAP (ablation)", "nsconv-only", "nsconv", None, False),
        ("BN model + SAP g=0.7 + 1-bit ReLU (ablation)", "bn+sap", "bn", 0.7, True),
        ("BN model, plain (FedTiny / FedDST / PruneFL)", "baselines", "bn", None, False),
    ]
    for name, kw in MODELS.items():
        for density in (*DENSITIES, 1.0):
            for label, key, norm, gamma, bits in variants:
                if density == 1.0 and key != "baselines":
                    continue
                seed_everything(0)
                model = build_model(name, data.input_shape, data.num_classes, norm=norm, **kw)
                masks = (dense_masks(model) if density == 1.0
                         else random_masks(model, density, torch.Generator().manual_seed(0)))
                apply_masks(model, masks)
                if gamma is not None:
                    enable_sap(model, gamma, relu_bits=bits)
                t0 = time.perf_counter()
                fp = measure_footprint(model, masks, x, y)
                row = {**fp.as_dict(), "model_bytes": fp.model, "model": name, "density": density, "variant": key,
                       "label": label if density < 1 else "FedAvg (dense BN model)",
                       "seconds": round(time.perf_counter() - t0, 2)}
                if gamma is not None:
                    row["sap_formula_conv_linear_inputs"] = sap_formula(model, x, gamma)
                rows.append(row)
                print(f"mem {name} d={density} {key}: total {fp.total / 2**20:.2f} MiB "
                      f"(model {fp.model / 2**10:.1f} KiB, act {fp.activations / 2**20:.2f} MiB)", flush=True)
    return rows


# ---- accuracy ----------------------------------------------------------------------------------------
def reduced_data():
    data = load_dataset("cifar10", DATA)
    rng = np.random.default_rng(REDUCED["seed"])
    tr = rng.permutation(len(data.y_train))[:REDUCED["train_samples"]]
    data.x_train, data.y_train = data.x_train[tr], data.y_train[tr]
    return data


def accuracy_run(data, name: str, density: float, algo: str, extra_opts: dict | None = None) -> dict:
    kw = {"width": REDUCED["mobilenetv2_width"]} if name == "mobilenetv2" else {}
    opts = dict(REDUCED["schedule"]) if algo in ("fedmef", *BASELINES) else {}
    opts.update(extra_opts or {})
    cfg = TrainConfig(rounds=REDUCED["rounds"], clients=REDUCED["clients"], per_round=REDUCED["per_round"],
                      local_epochs=REDUCED["local_epochs"], batch_size=REDUCED["batch_size"], lr=REDUCED["lr"],
                      optimizer=REDUCED["optimizer"], partition=REDUCED["partition"], seed=REDUCED["seed"],
                      density=density, eval_samples=REDUCED["eval_samples"], eval_every=REDUCED["rounds"],
                      algo_options=opts)
    seed_everything(cfg.seed)
    model = build_model(name, data.input_shape, data.num_classes, **kw)
    fed = Federation.from_dataset(data, cfg)
    strategy = make_strategy(algo, cfg)
    t0 = time.perf_counter()
    history = simulate(strategy, model, fed, cfg, progress=False)
    wall = time.perf_counter() - t0
    x, y = batch(data)
    fp = measure_footprint(strategy.model, strategy.masks, x, y)
    last = history[-1]
    return {"model": name, "model_kwargs": kw, "density": density, "algo": algo, "options": opts,
            "accuracy": last.accuracy,
            "final_density": last.density, "footprint": fp.as_dict(), "seconds": round(wall, 1),
            "bytes_up_per_client_round": sum(r.bytes_up_per_client for r in history) / len(history),
            "bytes_down_per_client_round": sum(r.bytes_down_per_client for r in history) / len(history),
            "extra_last_round": last.extra}


def accuracy_jobs(only: set[str] | None) -> list[tuple[str, float, str]]:
    """Priority order (an interrupted run keeps the most informative cells): ResNet-8 at 5 %, 10 %, 1 %
    with dense FedAvg, then MobileNetV2."""
    jobs: list[tuple[str, float, str]] = []
    order = [("resnet8", 0.05), ("resnet8", 0.1), ("resnet8", 0.01), ("mobilenetv2", 0.1), ("mobilenetv2", 0.05),
             ("mobilenetv2", 0.01)]
    for name, d in order:
        if only and f"{name}:{d}" not in only:
            continue
        jobs += [(name, d, algo) for algo in ("fedmef", *BASELINES) if algo in ALGORITHMS]
        if (name, 1.0, "fedavg") not in jobs:
            jobs.append((name, 1.0, "fedavg"))
    return jobs


# ---- reporting -------------------------------------------------------------------------------------
def cosine_at_default(data) -> dict:
    """cos(SAP weight gradient, exact) on a real CIFAR batch, 5 %-dense ResNet-8 NSConv, gamma 0.5/0.7."""
    import copy

    import torch.nn.functional as F

    x, y = batch(data)
    out = {}
    for norm in ("nsconv", "bn"):
        seed_everything(0)
        model = build_model("resnet8", data.input_shape, 10, norm=norm)
        masks = random_masks(model, 0.05, torch.Generator().manual_seed(0))
        apply_masks(model, masks)
        ref = copy.deepcopy(model)
        F.cross_entropy(ref(x), y).backward()
        a = torch.cat([p.grad.flatten() for n, p in ref.named_parameters() if n in masks])
        for gamma in (0.5, 0.7):
            sap = enable_sap(copy.deepcopy(model), gamma)
            F.cross_entropy(sap(x), y).backward()
            b = torch.cat([p.grad.flatten() for n, p in sap.named_parameters() if n in masks])
            out[f"resnet8-{norm}-gamma{gamma}"] = float(F.cosine_similarity(a, b, dim=0))
    return out


def render(res: dict) -> str:
    lines = ["# FedMef benchmark (CIFAR-10)", "",
             f"Machine: `{res['machine']['platform']}`, {res['machine']['cpus']} CPUs (shared), torch "
             f"{res['machine']['torch']}, 1 torch thread, `nice -n 10`. Wall time: {res.get('wall_seconds', 0):.0f} s.",
             "", "## 1. Measured device footprint (model + activations saved for backward)", "",
             f"Batch {MEM_BATCH}, one real training step per row, full-size models (MobileNetV2 width 1.0). Random "
             "ERK masks at each density (layer counts exact). 'act' = every distinct non-parameter, non-buffer "
             "tensor autograd saved (hooks), 'model' = kept values + cheapest index per pruned tensor + dense "
             "rest. NSConv's effective-weight copy is listed apart (dense in this simulation; nnz*4 B on a device).",
             "", "| model | density | variant | model KiB | act MiB | total MiB | vs BN baseline | SAP formula (conv/linear inputs) MiB |",
             "|---|---|---|---|---|---|---|---|"]
    mem = res.get("memory", [])
    base = {(r["model"], r["density"]): r["total"] for r in mem if r["variant"] == "baselines"}
    for r in mem:
        b = base.get((r["model"], r["density"]))
        rel = f"{(r['total'] / b - 1) * 100:+.1f} %" if b else ""
        formula = f"{r['sap_formula_conv_linear_inputs'] / 2**20:.2f}" if "sap_formula_conv_linear_inputs" in r else ""
        lines.append(f"| {r['model']} | {r['density']} | {r['label']} | {r['model_bytes'] / 1024:.1f} | "
                     f"{r['activations'] / 2**20:.2f} | {r['total'] / 2**20:.2f} | {rel} | {formula} |")
    if "cosine" in res:
        lines += ["", "SAP weight-gradient cosine similarity to the exact gradient (real CIFAR batch, ResNet-8 at 5 %, "
                  "at initialisation): " + ", ".join(f"{k}: {v:.4f}" for k, v in res["cosine"].items())]
    acc = res.get("accuracy", [])
    if acc:
        lines += ["", "## 2. Accuracy, REDUCED configuration (not comparable to the paper)", "",
                  "Config: " + json.dumps(REDUCED), "",
                  "| model | density | algorithm | accuracy | final density | footprint MiB (measured) | "
                  "up B/client/round | wall s |", "|---|---|---|---|---|---|---|---|"]
        for r in acc:
            lines.append(f"| {r['model']}{'(w=' + str(r['model_kwargs']['width']) + ')' if r['model_kwargs'] else ''} | "
                         f"{r['density']} | {r['algo']} | {r['accuracy'] * 100:.2f} % | {r['final_density']:.4f} | "
                         f"{r['footprint']['total'] / 2**20:.2f} | {r['bytes_up_per_client_round']:.0f} | {r['seconds']} |")
    before = res.get("accuracy_before_nsconv_fix", [])
    if before:  # the same cells with NSConv zeroing single-entry filters (toolchain/models/nsconv.py before dc348b4)
        lines += ["", "FedMef rows measured before NSConv stopped zeroing single-entry filters (same config): " + ", ".join(
            f"{r['model']} @ {r['density']}: {r['accuracy'] * 100:.2f} %" for r in before)]
    ones = res.get("accuracy_nsconv_init_ones", [])
    if ones:  # ablation: every NSConv gain starting at 1 instead of the NF gains (toolchain/models/nsconv.py, nsconv_init)
        lines += ["", "FedMef with `nsconv_init=ones` (all gains 1; same config): " + ", ".join(
            f"{r['model']} @ {r['density']}: {r['accuracy'] * 100:.2f} %" for r in ones)]
    if res.get("verdict"):
        lines += ["", "## Verdict", ""] + [f"- {v}" for v in res["verdict"]]
    return "\n".join(lines) + "\n"


def verdict(res: dict) -> list[str]:
    out = []
    mem = res.get("memory", [])
    by = {(r["model"], r["density"], r["variant"]): r for r in mem}
    for (name, d, v), r in sorted(by.items()):
        if v != "fedmef":
            continue
        b = by.get((name, d, "baselines"))
        if b:
            red = 1 - r["total"] / b["total"]
            out.append(f"{name} @ {d}: FedMef measured footprint {red * 100:.1f} % lower than the BN baselines "
                       f"(FedTiny/FedDST share it) -> {'meets' if red >= 0.285 else 'misses'} the -28.5 % claim "
                       "on memory")
    acc = {(r["model"], r["density"], r["algo"]): r for r in res.get("accuracy", [])}
    for (name, d, a), r in sorted(acc.items()):
        if a != "fedmef":
            continue
        for other in ("fedtiny", "feddst"):
            o = acc.get((name, d, other))
            if o:
                diff = (r["accuracy"] - o["accuracy"]) * 100
                out.append(f"{name} @ {d}: FedMef {r['accuracy'] * 100:.2f} % vs {other} {o['accuracy'] * 100:.2f} % "
                           f"({diff:+.2f} points; reduced config, one seed: {'within' if diff >= -0.5 else 'NOT within'}"
                           " 0.5 points)")
    return out


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    mem = res.get("memory", [])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name in zip(axes[:2], MODELS, strict=True):
        variants = [v for v in ("fedmef", "fedmef-g0.5", "nsconv-only", "bn+sap", "baselines")]
        width = 0.16
        for i, v in enumerate(variants):
            vals = [next((r["total"] / 2**20 for r in mem if r["model"] == name and r["density"] == d
                          and r["variant"] == v), 0) for d in DENSITIES]
            ax.bar(np.arange(len(DENSITIES)) + i * width, vals, width, label=v)
        ax.set_xticks(np.arange(len(DENSITIES)) + 2 * width, [str(d) for d in DENSITIES])
        ax.set_title(f"{name}: measured footprint, batch {MEM_BATCH}")
        ax.set_xlabel("density")
        ax.set_ylabel("MiB (model + saved activations)")
        ax.legend(fontsize=7)
    ax = axes[2]
    for algo in ("fedmef", *BASELINES):
        pts = sorted((r["density"], r["accuracy"] * 100) for r in res.get("accuracy", [])
                     if r["algo"] == algo and r["model"] == "resnet8")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algo)
    dense = [r["accuracy"] * 100 for r in res.get("accuracy", []) if r["algo"] == "fedavg" and r["model"] == "resnet8"]
    if dense:
        ax.axhline(dense[0], color="k", ls="--", label="fedavg dense")
    ax.set_xscale("log")
    ax.set_title("ResNet-8 accuracy (REDUCED config)")
    ax.set_xlabel("density")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(res: dict) -> None:
    res["verdict"] = verdict(res)
    write_results(RESULTS / "fedmef", res, render(res))
    plot(res, RESULTS / "fedmef.png")


ABLATIONS = {
    "no SAP (NSConv + BaE)": {"sap": 0},
    "no BaE (NSConv + SAP)": {"bae": 0},
    "BN model, no SAP, BaE on": {"nsconv": 0, "sap": 0},
    "SAP gamma 0.5": {"gamma": 0.5},
}


def ablation(t0: float) -> None:
    """Which FedMef component costs accuracy in the reduced configuration (ResNet-8, 5 %)."""
    path = RESULTS / "fedmef_ablation.json"
    res = json.loads(path.read_text()) if path.exists() else {"machine": machine_info(), "reduced_config": REDUCED,
                                                               "runs": []}
    data = reduced_data()
    done = {r["label"] for r in res["runs"]}
    for label, opts in ABLATIONS.items():
        if label in done:
            continue
        r = accuracy_run(data, "resnet8", 0.05, "fedmef", opts)
        r["label"] = label
        res["runs"].append(r)
        res["wall_seconds"] = time.perf_counter() - t0
        print(f"ablation {label}: {r['accuracy'] * 100:.2f} % (footprint {r['footprint']['total'] / 2**20:.2f} MiB)",
              flush=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        render_ablation(res)
    render_ablation(res)


def render_ablation(res: dict) -> None:
    lines = ["# FedMef ablations (ResNet-8, CIFAR-10, REDUCED configuration; density 0.05 unless labelled)", "",
             f"Same config as `fedmef.md` part 2: {json.dumps(REDUCED)}. Wall time "
             f"{res.get('wall_seconds', 0):.0f} s on `{res['machine']['platform']}` (shared 2 CPUs).", "",
             "| variant | density | options | accuracy | footprint MiB (measured) |", "|---|---|---|---|---|"]
    lines += [f"| {x['label']} | {x['density']} | `{json.dumps(x['options'])}` | {x['accuracy'] * 100:.2f} % | "
              f"{x['footprint']['total'] / 2**20:.2f} |" for x in res["runs"]]
    (RESULTS / "fedmef_ablation.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--accuracy-only", action="store_true", help="keep the memory rows already in the JSON")
    ap.add_argument("--ablation", action="store_true",
                    help="FedMef component ablations on ResNet-8 at 5 %% -> fedmef_ablation.json/.md")
    ap.add_argument("--render-only", action="store_true", help="re-render .md/.png from the JSON")
    ap.add_argument("--only", default="", help="comma list of model:density accuracy cells, e.g. resnet8:0.05")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path = RESULTS / "fedmef.json"
    if args.ablation:
        ablation(t0)
        return
    if args.render_only:
        save(json.loads(path.read_text()))
        return
    res = json.loads(path.read_text()) if path.exists() and args.accuracy_only else {}
    res["machine"] = machine_info()
    res["reduced_config"] = REDUCED
    full = load_dataset("cifar10", DATA)
    if not args.accuracy_only:
        res["memory"] = memory_rows(full)
        res["cosine"] = cosine_at_default(full)
        res["wall_seconds"] = time.perf_counter() - t0
        save(res)
    if args.memory_only:
        return
    wall0 = res.get("wall_seconds", 0) if args.accuracy_only else 0.0
    data = reduced_data()
    only = {s for s in args.only.split(",") if s} or None
    done = {(r["model"], r["density"], r["algo"]) for r in res.get("accuracy", [])}
    res.setdefault("accuracy", [])
    for name, d, algo in accuracy_jobs(only):
        if (name, d, algo) in done:
            continue
        r = accuracy_run(data, name, d, algo)
        print(f"acc {name} d={d} {algo}: {r['accuracy'] * 100:.2f} % in {r['seconds']} s "
              f"(footprint {r['footprint']['total'] / 2**20:.2f} MiB)", flush=True)
        res["accuracy"].append(r)
        done.add((name, d, algo))
        res["wall_seconds"] = wall0 + time.perf_counter() - t0
        save(res)


if __name__ == "__main__":
    main()
