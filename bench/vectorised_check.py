"""The vectorised client engine against the one-by-one engine on the CIFAR-10 grid's settings, side by side.

Every method of ``fl_grid.py --grid cifar10`` runs ``--rounds`` rounds on a slice of the training set, once
with clients trained one by one on the CPU and once with each round's clients trained together on
``--device`` (toolchain/learning/fl/vectorised.py). Per method: seconds per round of each engine and their
ratio, the accuracy each reaches, and how far the weights and masks drift apart (float rounding, amplified
by training). It fails if the accuracies part by more than ``MAX_ACCURACY_GAP``; the exact check of the
engine's arithmetic is tests/test_fl_vectorised.py in float64 (``TOOLCHAIN_TEST_DEVICE=cuda`` on a GPU). On a lent GPU
``bench/gpu_grid.sh run`` calls it before filling the grid. Writes ``bench/results/vectorised_engine_<device>``
``.{json,md}``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from common import RESULTS, machine, parser, write_results
from fl_grid import GRIDS

from toolchain.data.datasets import Dataset, load_dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.pruning import make_strategy
from toolchain.models.zoo import build_model

# In float32 the engines drift apart by rounding that training amplifies, as much as one ulp on the initial weights
# moves the one-by-one engine (--noise-floor; in float64 they agree exactly, tests/test_fl_vectorised.py). What must
# hold is the learning: the accuracies stay within this gap (measured on CPU: 0.0-0.4 points after the 2 rounds of
# the default check, 0.0-2.9 after 12 rounds, where one ulp moves a run by up to 3.6).
MAX_ACCURACY_GAP = 0.03


def run(data: Dataset, method: str, rounds: int, clients: int, device: str | None,
        nudge: bool = False) -> tuple[Any, list, float]:
    """One run; ``nudge`` moves every initial weight by one ulp (the rounding-noise reference)."""
    grid = GRIDS["cifar10"]
    train = {**grid["train"], "rounds": rounds, "clients": clients, "eval_every": rounds}
    opts = {**grid["algo_options"], "delta": 1, "t_end": rounds, **grid["per_method"].get(method, {})}
    cfg = TrainConfig(**train, density=1.0 if method == "fedavg" else 0.05, seed=0, algo_options=opts)
    fed = Federation.from_dataset(data, cfg)
    seed_everything(0)
    strategy = make_strategy(method, cfg)
    model = build_model(grid["model"], data.input_shape, data.num_classes)
    if nudge:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    t0 = time.perf_counter()
    hist = simulate(strategy, model, fed, cfg, progress=False, clients_device=device)
    return strategy, hist, (time.perf_counter() - t0) / rounds


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--data", default=None, help="CIFAR-10 folder")
    ap.add_argument("--device", default="cuda", help="the vectorised engine's device (default: cuda)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4000, help="training images used (the test set: a quarter)")
    ap.add_argument("--methods", default=",".join(GRIDS["cifar10"]["methods"]))
    ap.add_argument("--noise-floor", action="store_true",
                    help="also run the one-by-one engine with every initial weight one ulp up: how far rounding "
                         "alone moves a run (the reference for the engines' gap)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    full = load_dataset("cifar10", args.data)
    n = args.samples
    data = Dataset("cifar10-slice", full.x_train[:n], full.y_train[:n], full.x_test[:n // 4], full.y_test[:n // 4],
                   full.num_classes, full.preprocessing)
    rows, bad = [], []
    for method in args.methods.split(","):
        (a, ha, ta), (b, hb, tb) = (run(data, method, args.rounds, 20, d) for d in (None, args.device))
        sa, sb = a.model.state_dict(), b.model.state_dict()
        drift = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
        agree = min(float((a.masks[k] == b.masks[k]).float().mean()) for k in a.masks)
        row = {"method": method, "s_per_round_one_by_one": ta, "s_per_round_vectorised": tb,
               "speedup": ta / tb, "accuracy_one_by_one": ha[-1].accuracy, "accuracy_vectorised": hb[-1].accuracy,
               "max_weight_drift": drift, "mask_agreement": agree}
        if args.noise_floor:
            c, hc, _ = run(data, method, args.rounds, 20, None, nudge=True)
            row["accuracy_one_ulp_up"] = hc[-1].accuracy
            row["mask_agreement_one_ulp_up"] = min(float((a.masks[k] == c.masks[k]).float().mean()) for k in a.masks)
        rows.append(row)
        print(f"{method:8s} {ta:6.2f} s/round one by one, {tb:6.2f} vectorised ({ta / tb:.2f}x); accuracy "
              f"{100 * ha[-1].accuracy:.2f} / {100 * hb[-1].accuracy:.2f} %; weights drift {drift:.1e}, masks agree "
              f"{100 * agree:.2f} %", flush=True)
        if abs(ha[-1].accuracy - hb[-1].accuracy) > MAX_ACCURACY_GAP:
            bad.append(method)
    result = {"device": args.device, "rounds": args.rounds, "noise_floor": args.noise_floor, "training_samples": n, "clients": 20, "per_round": 10,
              "seed": 0, "rows": rows, "machine": machine("host", "platform", "python", "torch", "cpus", "processor",
                                                          device=args.device)}
    md = [f"# Vectorised client engine on `{args.device}` against one by one on the CPU", "",
          f"CIFAR-10 grid settings (ResNet-8, batch 20, flip-crop), {n} training images, 20 clients, 10 per round, "
          f"{args.rounds} rounds, masks adjusted every round, seed 0; density 0.05 (FedAvg dense). bench/vectorised_check.py.",
          "", "| method | s/round one by one | s/round vectorised | speed-up | accuracy % one by one / vectorised | "
          "max weight drift | masks agree % |" + (" one by one, weights 1 ulp up: accuracy % / masks agree % |"
                                                 if args.noise_floor else ""),
          "|---|---|---|---|---|---|---|" + ("---|" if args.noise_floor else "")]
    md += [f"| {r['method']} | {r['s_per_round_one_by_one']:.2f} | {r['s_per_round_vectorised']:.2f} | "
           f"{r['speedup']:.2f}x | {100 * r['accuracy_one_by_one']:.2f} / {100 * r['accuracy_vectorised']:.2f} | "
           f"{r['max_weight_drift']:.1e} | {100 * r['mask_agreement']:.2f} |"
           + (f" {100 * r['accuracy_one_ulp_up']:.2f} / {100 * r['mask_agreement_one_ulp_up']:.2f} |"
              if args.noise_floor else "") for r in rows]
    if args.noise_floor:
        md += ["", "The last column is the noise floor: the one-by-one engine again, every initial weight moved by one "
               "ulp. Where the engines differ by about as much as that, their gap is rounding, amplified by training."]
    write_results(RESULTS / f"vectorised_engine_{args.device.replace(':', '')}", result, "\n".join(md) + "\n")
    if bad:
        print(f"accuracy apart by more than {100 * MAX_ACCURACY_GAP:g} points for {', '.join(bad)}: do not fill the "
              "grid with this engine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
