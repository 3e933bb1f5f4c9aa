"""Flower engines against the in-process engine on a fixed set of workloads (issue 19, item 6), one table.

Each row runs one workload on the in-process engine and on one Flower engine, back to back in one process
(``flower_engines.measure``: same seed, final weights and masks compared). Rows are saved as they finish
(``bench/results/flower_overhead/<row>.json`` + ``.md``) and skipped when re-run, so the set can be filled in
over several sessions; ``--redo ROW`` measures a row again. The summary (``bench/results/flower_overhead.{json,md,png}``)
is rendered from the saved rows.

Two kinds of workload: *toy* rows (a few to a few dozen samples per client: Flower's fixed cost per message
dominates) and *full* rows (the whole MNIST training set split over the clients: the local training a client
really does). The issue's targets: simulation within 1.5x of in-process at 100 and 1000 clients, deployment
on localhost within 2x.

    .venv/bin/python bench/flower_overhead.py                 # run the missing rows, then render
    .venv/bin/python bench/flower_overhead.py --rows sim100_full --redo sim100_full
    .venv/bin/python bench/flower_overhead.py --report        # render only
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import RESULTS, parser, pyplot, write_results
from flower_engines import markdown as row_markdown
from flower_engines import measure

OUT = RESULTS / "flower_overhead"
TARGET = {"flower-sim": 1.5, "flower": 2.0}


@dataclass(frozen=True)
class Row:
    name: str
    engine: str  # flower-sim or flower
    clients: int
    per_round: int
    train_samples: int
    rounds: int = 3
    mods: tuple[str, ...] = ()  # Flower client mods on the Flower engine's run (docs/flower.md)

    def args(self) -> argparse.Namespace:
        return argparse.Namespace(algo="gmp", model="lenet5", clients=self.clients, rounds=self.rounds,
                                  train_samples=self.train_samples, test_samples=500, per_round=self.per_round,
                                  engines=f"inprocess,{self.engine}", cpus=None, mods=list(self.mods))

    def label(self) -> str:
        kind = "simulation" if self.engine == "flower-sim" else "deployment (localhost)"
        return (f"{kind}{' + ' + ', '.join(self.mods) if self.mods else ''}: {self.clients} clients, "
                f"{self.per_round}/round, {self.train_samples} samples ({self.train_samples // self.clients}/client), "
                f"{self.rounds} rounds")


ROWS = [
    Row("sim100_toy", "flower-sim", 100, 10, 6000),
    Row("sim1000_toy", "flower-sim", 1000, 10, 10000),
    Row("deploy3_toy", "flower", 3, 3, 3000),
    Row("sim100_full", "flower-sim", 100, 10, 60000),
    Row("sim1000_full", "flower-sim", 1000, 10, 60000),
    Row("deploy3_full", "flower", 3, 3, 60000),
    # what SecAgg+ adds (4 exchanges a round, key agreement, masking); no target: not a transport overhead
    Row("sim100_full_secagg", "flower-sim", 100, 10, 60000, mods=("secaggplus",)),
]


def ratios(row: Row, r: dict[str, Any]) -> dict[str, Any]:
    """End to end, round 1, and the rounds after the first (Flower / in-process, wall seconds)."""
    ref, fl = r["engines"]["inprocess"], r["engines"][row.engine]
    later = lambda e: sum(e["round_s"][1:]) / max(1, len(e["round_s"]) - 1)  # noqa: E731
    return {"row": row.name, "label": row.label(), "engine": row.engine,
            "target": None if row.mods else TARGET[row.engine],
            "inprocess_wall_s": ref["wall_s"], "flower_wall_s": fl["wall_s"], "startup_s": fl["startup_s"],
            "wall_x": fl["wall_s"] / ref["wall_s"],
            "round1_s": [fl["round_s"][0], ref["round_s"][0]],
            "later_round_s": [later(fl), later(ref)], "later_x": later(fl) / later(ref),
            "identical": fl["max_abs_weight_diff"] == 0 and fl["masks_equal"],
            "max_abs_weight_diff": fl["max_abs_weight_diff"], "masks_equal": fl["masks_equal"],
            "load": [r["machine"]["load_avg_before"][0], r["machine"]["load_avg_after"][0]],
            "measured_at": r.get("measured_at", "")}


def summary_markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "# Flower engines: overhead against the in-process engine (issue 19, item 6)",
        "",
        "`bench/flower_overhead.py`: gmp on LeNet-5, MNIST split IID, 500 test samples, batch 32, 1 local epoch, "
        "lr 0.05, density 0.2; each row runs the in-process engine and one Flower engine back to back with the "
        "same seed. flower-sim: `flwr run` on a simulation SuperLink, Ray, one virtual SuperNode per client, "
        "`min(cpus, clients)` actors. flower: a local SuperLink + one SuperNode per client on loopback. "
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, torch {machine.get('torch', '?')}, "
        f"flwr {machine.get('flwr', '?')}, ray {machine.get('ray', '?')}; load average before/after in the last "
        "column (other work shared the machine).",
        "",
        "| workload | in-process wall (s) | Flower wall (s) | x end to end | Flower start-up (s) | round 1 Flower / "
        "in-process (s) | later rounds Flower / in-process (s) | x later rounds | target | weights, masks | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        if r["target"] is None:
            met = "no target"
        else:
            met = f"<= {r['target']}x: " + ("met" if r["later_x"] <= r["target"] else "missed")
        same = "identical" if r["identical"] else "DIFFERENT"
        if not r["identical"] and r["target"] is None:  # a mod that changes the update (SecAgg+ quantises it)
            same = (f"max abs weight diff {r['max_abs_weight_diff']:.1e}, masks "
                    f"{'equal' if r['masks_equal'] else 'differ'}")
        lines.append(
            f"| {r['label']} | {r['inprocess_wall_s']:.1f} | {r['flower_wall_s']:.1f} | {r['wall_x']:.1f} | "
            f"{r['startup_s']:.1f} | {r['round1_s'][0]:.2f} / {r['round1_s'][1]:.2f} | "
            f"{r['later_round_s'][0]:.2f} / {r['later_round_s'][1]:.2f} | **{r['later_x']:.2f}** | "
            f"{met} | {same} | "
            f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    lines += [
        "",
        "Columns: *start-up* is the Flower engine's wall time outside its rounds (SuperLink, run submission and "
        "app install, ServerApp process, Ray and its actors; deployment: SuperNodes too). *Round 1* carries "
        "each Ray actor's or ClientApp process's one-time load and set-up replay. *Later rounds* is the steady "
        "state the target is judged on (the mean of rounds 2..R); *x end to end* includes the fixed start-up, "
        "which a run of a few rounds cannot amortise. Per-row details: `bench/results/flower_overhead/<row>.md`.",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["later_x"] for r in rows], width=0.4, label="later rounds")
    ax.bar([x + 0.2 for x in xs], [r["wall_x"] for r in rows], width=0.4, label="end to end")
    for x, r in zip(xs, rows, strict=True):
        if r["target"] is not None:
            ax.hlines(r["target"], x - 0.45, x + 0.45, colors="k", linestyles="dashed")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1)  # 1 = as fast as in-process
    ax.set_xticks(list(xs), [r["row"] for r in rows], rotation=15)
    ax.set_ylabel("Flower / in-process (wall)")
    ax.set_title("Flower engines vs in-process (dashed: target)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render() -> None:
    saved = {p.stem: json.loads(p.read_text()) for p in OUT.glob("*.json")}
    rows = [ratios(row, saved[row.name]) for row in ROWS if row.name in saved]
    if not rows:
        raise SystemExit(f"no finished rows in {OUT}; run without --report first")
    machine = next(iter(saved.values()))["machine"]
    write_results(RESULTS / "flower_overhead", {"benchmark": "flower_overhead", "machine": machine, "rows": rows},
                  summary_markdown(rows, machine))
    plot(rows, RESULTS / "flower_overhead.png")
    print((RESULTS / "flower_overhead.md").read_text())


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated subset of the rows")
    ap.add_argument("--redo", default="", help="comma-separated rows to measure again")
    ap.add_argument("--report", action="store_true", help="render the summary from the saved rows and exit")
    args = ap.parse_args()
    if not args.report:
        names = args.rows.split(",")
        unknown = sorted(set(names + [n for n in args.redo.split(",") if n]) - {r.name for r in ROWS})
        if unknown:
            raise SystemExit(f"unknown row(s) {unknown}; rows: {', '.join(r.name for r in ROWS)}")
        OUT.mkdir(parents=True, exist_ok=True)
        for row in ROWS:
            if row.name not in names or ((OUT / f"{row.name}.json").is_file() and row.name not in args.redo):
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {row.name}: {row.label()}", flush=True)
            result = measure(row.args())
            result["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            write_results(OUT / row.name, result, row_markdown(result))  # saved at once: a re-run skips it
    render()


if __name__ == "__main__":
    main()
