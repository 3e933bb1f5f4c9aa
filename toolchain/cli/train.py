"""``toolchain train``: one federated pruning run in simulation (or on Flower), with metrics, model and plot."""

from __future__ import annotations

import argparse
import sys

from toolchain.cli.common import DefaultsFormatter
from toolchain.learning import options
from toolchain.learning.flower import ENGINES
from toolchain.learning.pruning import ALGORITHMS
from toolchain.pipelines.train import TrainOptions, train


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a federated pruning algorithm in simulation",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--algo", required=True, help=f"one of: {', '.join(ALGORITHMS)}")
    p.add_argument("--out", required=True, help="output folder for metrics.jsonl, summary.json, model.pt, plot")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a non-empty folder that is not an earlier training run")
    p.add_argument("--engine", choices=ENGINES, default="inprocess",
                   help="inprocess (default), flower-sim (Flower simulation, Ray) or flower (SuperLink; docs/flower.md)")
    p.add_argument("--superlink", metavar="HOST:PORT", default=None, help="--engine flower: the SuperLink address")
    p.add_argument("--superlink-ca", metavar="PEM", default=None,
                   help="--engine flower: the SuperLink's CA certificate (TLS; docs/flower.md)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="train each round's clients together, batched, on this torch device (cuda, cuda:1, cpu); "
                        "default: one by one on the CPU (docs/training.md)")
    p.add_argument("--insecure", action="store_true",
                   help="--engine flower: connect without TLS (only on a trusted network)")
    options.add_arguments(p, options.TRAIN_DEFAULTS, "zoo model (default: lenet5)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    opts = TrainOptions(**options.from_args(args), out=args.out, engine=args.engine, superlink=args.superlink,
                        superlink_ca=args.superlink_ca, insecure=args.insecure, force=args.force,
                        device=args.device)
    summary = train(opts)
    print(f"{opts.algo} {opts.model} on {opts.dataset}: accuracy {summary['accuracy'] * 100:.2f} % at density "
          f"{summary['density']:.4f}; device memory {summary['device_memory_bytes']['total']} B; "
          f"up {summary['bytes_up_per_round']:.0f} B / round; output {opts.out}")
    if summary.get("quality", {}).get("at_chance"):
        print(f"warning: {summary['quality']['message']}", file=sys.stderr)
    return 0
