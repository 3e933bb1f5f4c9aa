"""In-process engine vs Flower simulation (Ray) vs Flower deployment (SuperLink + SuperNodes), same workload.

Runs one federated pruning run per engine (same seed, data, model, strategy), records wall time (total,
engine start-up, per round), checks that the final weights and masks equal the in-process engine's, and
writes ``bench/results/flower_engines.json`` + ``.md``. All Flower processes run on loopback and are
stopped before the script exits.

    .venv/bin/python bench/flower_engines.py [--algo gmp] [--clients 3] [--rounds 3] [--train-samples 3000]
    .venv/bin/python bench/flower_engines.py --clients 100 --per-round 10 --engines inprocess,flower-sim \
        --name flower_engines_100    # writes bench/results/flower_engines_100.{json,md}

The overhead table of issue 19 (several workloads, resumable) is bench/flower_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, machine, parser, write_results

from toolchain.learning.flower import make_spec
from toolchain.learning.flower.driver import run_inprocess
from toolchain.pipelines.train import TrainOptions


def engine_versions() -> dict[str, Any]:
    import flwr
    import ray

    return {"flwr": flwr.__version__ if hasattr(flwr, "__version__") else "1.41.0", "ray": ray.__version__}


def compare(out: Path, ref) -> dict[str, Any]:
    ck = torch.load(out / "model.pt")
    sd = ref.model.state_dict()
    diff = max(float((ck["state_dict"][k].float() - v.float()).abs().max()) for k, v in sd.items())
    masks = all(torch.equal(ck["masks"][k], m) for k, m in ref.masks.items())
    return {"max_abs_weight_diff": diff, "masks_equal": masks}


def rounds_of(out: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--algo", default="gmp")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-samples", type=int, default=3000)
    ap.add_argument("--test-samples", type=int, default=500)
    ap.add_argument("--per-round", type=int, default=None, help="clients sampled per round (default: all)")
    ap.add_argument("--engines", default="inprocess,flower-sim,flower",
                    help="comma-separated; the deployment engine starts one SuperNode per client")
    ap.add_argument("--cpus", type=int, default=None, help="Ray CPUs for flower-sim (default: min(cpus, clients))")
    ap.add_argument("--name", default="flower_engines", help="results file stem in bench/results/")
    args = ap.parse_args()
    result = measure(args)
    write_results(RESULTS / args.name, result, markdown(result))
    print((RESULTS / f"{args.name}.md").read_text())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One workload on the engines of ``args.engines`` (the in-process engine always runs first: it is the
    reference the others are timed and compared against); returns the result dict."""
    wanted = set(args.engines.split(","))

    from toolchain.learning.flower.launch import run_simulation

    work = Path(tempfile.mkdtemp(prefix="flower-bench-"))
    info = machine("platform", "python", "cpu", "cpus", "torch", **engine_versions(),
                   load_avg_before=list(os.getloadavg()))
    t_all = time.perf_counter()

    def spec_for(engine: str):
        opts = TrainOptions(algo=args.algo, out=str(work / engine), model=args.model, clients=args.clients,
                            per_round=args.per_round, rounds=args.rounds, batch_size=32, lr=0.05, density=0.2, quiet=True, engine=engine,
                            algo_options={"prune_end": max(1, args.rounds - 1)} if args.algo == "gmp" else {})
        spec = make_spec(opts, args.train_samples, args.test_samples)
        if engine != "inprocess" and getattr(args, "mods", None):
            spec.extra["mods"] = list(args.mods)
        return spec

    engines: dict[str, dict[str, Any]] = {}

    t = time.perf_counter()
    hist, ref = run_inprocess(spec_for("inprocess"))
    engines["inprocess"] = {"wall_s": time.perf_counter() - t, "round_s": [r.seconds for r in hist],
                            "accuracy": hist[-1].accuracy, "max_abs_weight_diff": 0.0, "masks_equal": True,
                            "startup_s": None}
    print(f"inprocess  {engines['inprocess']['wall_s']:.1f} s", flush=True)

    if "flower-sim" in wanted:
        spec = spec_for("flower-sim")
        t = time.perf_counter()
        summary = run_simulation(spec, num_cpus=args.cpus)
        wall = time.perf_counter() - t
        rs = rounds_of(Path(spec.out))
        engines["flower-sim"] = {"wall_s": wall, "round_s": rs, "accuracy": summary["accuracy"],
                                 "startup_s": wall - sum(rs), **compare(Path(spec.out), ref)}
        print(f"flower-sim {wall:.1f} s", flush=True)
    if "flower" in wanted:
        deployment(args, spec_for("flower"), ref, engines)
    try:
        return finish(args, info, engines, t_all)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def deployment(args: argparse.Namespace, spec: Any, ref: Any, engines: dict[str, dict[str, Any]]) -> None:
    from toolchain.learning.flower.launch import LocalFederation, run_deployment

    t = time.perf_counter()
    with LocalFederation(args.clients) as fed:
        t_up = time.perf_counter() - t
        summary = run_deployment(spec, fed.address, timeout=1800, stream=False, **fed.security())
    wall = time.perf_counter() - t
    rs = rounds_of(Path(spec.out))
    engines["flower"] = {"wall_s": wall, "round_s": rs, "accuracy": summary["accuracy"],
                         "superlink_and_supernodes_up_s": t_up, "startup_s": wall - sum(rs),
                         **compare(Path(spec.out), ref)}
    print(f"flower     {wall:.1f} s", flush=True)


def finish(args: argparse.Namespace, info: dict[str, Any], engines: dict[str, dict[str, Any]],
           t_all: float) -> dict[str, Any]:
    base = engines["inprocess"]["wall_s"]
    base_round = sum(engines["inprocess"]["round_s"]) / len(engines["inprocess"]["round_s"])
    for e in engines.values():
        e["wall_ratio_vs_inprocess"] = e["wall_s"] / base
        e["round_ratio_vs_inprocess"] = (sum(e["round_s"]) / len(e["round_s"])) / base_round
    info["load_avg_after"] = list(os.getloadavg())
    return {"benchmark": "flower_engines", "machine": info,
            "workload": {"algo": args.algo, "model": args.model, "clients": args.clients, "rounds": args.rounds,
                         "train_samples": args.train_samples, "test_samples": args.test_samples,
                         "per_round": args.per_round or args.clients, "batch_size": 32, "local_epochs": 1},
            "engines": engines, "wall_time_s": time.perf_counter() - t_all}


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workload"]
    lines = [
        "# Flower engines vs the in-process engine",
        "",
        f"Workload: `{w['algo']}` on `{w['model']}`, {w['clients']} clients ({w['per_round']} sampled per round), "
        f"{w['rounds']} rounds, "
        f"{w['train_samples']} MNIST training samples split IID, {w['test_samples']} test samples, batch "
        f"{w['batch_size']}, 1 local epoch. Same seed on every engine.",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, flwr {m['flwr']}, "
        f"ray {m['ray']}. Load average before/after: {m['load_avg_before'][0]:.1f} / {m['load_avg_after'][0]:.1f} "
        "(the machine is shared; timings are noisy). Total wall time of the benchmark: "
        f"{r['wall_time_s']:.0f} s.",
        "",
        "| engine | wall (s) | x in-process | start-up (s) | mean round (s) | x in-process (round) | accuracy | "
        "max abs weight diff | masks equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in r["engines"].items():
        mean_round = sum(e["round_s"]) / len(e["round_s"])
        startup = "-" if e["startup_s"] is None else f"{e['startup_s']:.1f}"
        lines.append(f"| {name} | {e['wall_s']:.1f} | {e['wall_ratio_vs_inprocess']:.1f} | {startup} | "
                     f"{mean_round:.2f} | {e['round_ratio_vs_inprocess']:.1f} | {e['accuracy']:.4f} | "
                     f"{e['max_abs_weight_diff']:.3g} | {e['masks_equal']} |")
    lines += [
        "",
        "Start-up: engine time outside the rounds (flower-sim: Ray and its actors; flower: SuperLink + SuperNodes, "
        "run submission, ServerApp process, node discovery). The deployment engine starts a fresh ClientApp "
        "process for every message (import torch, load the shard, replay the strategy setup), which dominates "
        "its rounds at this scale. Weights and masks are compared with the in-process engine's final model.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
