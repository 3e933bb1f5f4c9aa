"""On-device forward-only ZO fine-tuning on a device-local shifted data set (docs/ondevice.md).

For each build (a MicroPython target's ``toolchain build`` output with ``model.smf``): the device holds a local pool
of MNIST training digits rotated by 35 degrees with Gaussian pixel noise (sigma 25), a distribution the model was
not trained on. The device code itself (``ft.py`` + ``zo.py`` + the sparse engine, run by CPython: same code and
double floats as MicroPython on WebAssembly, where the tests show the scalars and weights are bit-identical) runs
``rounds`` rounds: a random batch of the pool, ``probe`` (K directions), ``update`` with its own scalars (a
single-device federation). The accuracy of the device's weights after each round is measured on 1000 rotated+noisy
*test* digits (host evaluation of the bit-identical weights), the rounds are replayed by the host reference, and the
fine-tuner's buffer sizes are reported (heap measured on the micro:bit by the tests).

    nice -n 10 .venv/bin/python bench/ondevice_zo.py --build esp32=build/esp32 --build microbit=build/microbit

With ``--port unix`` the device code runs on MicroPython 1.28's unix port instead (scripts/build_micropython.sh:
the engine's native kernels, a real heap bound, heap figures measured by the device); the pool must then fit the
heap, e.g. ``--port unix --pool 64 --batch 16 --k 16 --out bench/results/ondevice_zo_unix``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from common import RESULTS, machine, parser, pyplot, write_results
from support import sparse_models as sm

from toolchain.boards.profiles import get_profile
from toolchain.deploy.emulators.harness import DeviceRun, device_files, parse_run, rounds_script, run_rounds
from toolchain.verify.reference import (
    engine_features,
    head_accuracy,
    head_from_smf,
    reference_probe,
    reference_update,
)

ANGLE, NOISE = 35.0, 25.0


def shifted(images: np.ndarray, seed: int) -> np.ndarray:
    """Rotate by ANGLE degrees (bilinear) and add N(0, NOISE) pixel noise; int8 model input (raw - 128)."""
    import torch

    a = math.radians(ANGLE)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).expand(len(images), 2, 3)
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    r = torch.nn.functional.grid_sample(x, grid, align_corners=False)[:, 0].numpy()
    r = np.clip(r + np.random.default_rng(seed).normal(0, NOISE, r.shape), 0, 255)
    return (np.round(r) - 128).astype(np.int8)


def run_rounds_unix(head, spec: dict, data: np.ndarray, labels: list[int], seeds: list[int],  # noqa: ANN001
                    batches: list[list[int]], k: int, mu: float, lr: float, evals: list[int], smf: bytes,
                    heap_bytes: int) -> DeviceRun:
    """The harness's device script on the MicroPython 1.28 unix port (scripts/build_micropython.sh): the engine
    as x64 .mpy (its native kernels run), ft/zo as source, under a real heap bound of ``heap_bytes``; the
    device's gc.mem_alloc figures are meaningful there (unlike WebAssembly's)."""
    from toolchain.deploy.emulators import smf_ports, unix_port
    from toolchain.verify.reference import ENGINE_DIR

    data = np.ascontiguousarray(data, np.int8).reshape(len(data), -1)
    files = {**smf_ports.engine_files("unix", True), **device_files(head, spec, data, smf)}
    for m in ("zo", "ft"):
        files[f"{m}.mpy"] = unix_port.mpy_cross((ENGINE_DIR / f"{m}.py").read_bytes(), f"{m}.py", "x64")
    code = rounds_script(len(data), data.shape[1], labels, seeds, batches, k, mu, lr, evals, True, "")
    return parse_run(unix_port.run_micropython(code, files=files, heap_bytes=heap_bytes, timeout=3600))


def run_rounds_qemu(head, spec: dict, data: np.ndarray, labels: list[int], seeds: list[int],  # noqa: ANN001
                    batches: list[list[int]], k: int, mu: float, lr: float, evals: list[int],
                    smf: bytes) -> tuple[DeviceRun, list[int]]:
    """The harness's device script on MicroPython 1.28 for the Cortex-M3 under QEMU -icount shift=0 (the engine
    and ft/zo as armv7m .mpy, files in the board's RAM file system); also the instructions of each round
    (probe + update, timed by the board)."""
    from toolchain.deploy.emulators import qemu_cortexm, smf_ports, unix_port
    from toolchain.deploy.emulators.harness import DEVICE_SCRIPT
    from toolchain.verify.reference import ENGINE_DIR

    data = np.ascontiguousarray(data, np.int8).reshape(len(data), -1)
    files = {**smf_ports.engine_files("an385", True), **device_files(head, spec, data, smf)}
    for m in ("zo", "ft"):
        files[f"{m}.mpy"] = unix_port.mpy_cross((ENGINE_DIR / f"{m}.py").read_bytes(), f"{m}.py", "armv7m")
    probe = "    g, loss, n = t.probe(SEEDS[r], K, MU, bx, by)\n    t.update(SEEDS[r], g, LR)\n"
    assert probe in DEVICE_SCRIPT
    code = rounds_script(len(data), data.shape[1], labels, seeds, batches, k, mu, lr, evals, True, "").replace(
        probe, "    import time\n    t0 = time.ticks_us()\n" + probe
        + "    print('ticks', time.ticks_diff(time.ticks_us(), t0))\n")
    out = qemu_cortexm.run_micropython(code, files=files, board="an385", timeout=3600)
    ticks = [int(ln.split()[1]) for ln in out.splitlines() if ln.startswith("ticks")]
    return parse_run(out), [qemu_cortexm.instructions(t, "an385") for t in ticks]


def bench_target(name: str, build: Path, rounds: int, k: int, batch: int, lr: float, mu: float, pool_n: int,
                 eval_n: int, port: str = "cpython") -> dict:
    manifest = json.loads((build / "manifest.json").read_text())
    profile = get_profile(manifest["target"])
    smf = (build / "model.smf").read_bytes()
    head = head_from_smf(smf)
    tr, trl = sm.mnist("train")
    te, tel = sm.mnist("t10k")
    pool = shifted(tr[50000 : 50000 + pool_n], 1)
    yp = trl[50000 : 50000 + pool_n].tolist()
    ev = shifted(te[:eval_n], 2)
    ye = tel[:eval_n].tolist()
    rng = np.random.default_rng(0)
    batches = [sorted(rng.choice(pool_n, batch, replace=False).tolist()) for _ in range(rounds)]
    seeds = [int(s) for s in rng.integers(0, 2**32, rounds, dtype=np.uint64)]
    spec = {"estimator": "forward", "batch_max": batch, "k_max": k}

    t0 = time.perf_counter()
    round_instructions = None
    if port == "an385":
        run, round_instructions = run_rounds_qemu(head, spec, pool, yp, seeds, batches, k, mu, lr,
                                                  list(range(min(64, pool_n))), smf)
    elif port == "unix":
        # (x64 objects are about twice a 32-bit board's: the heap is bounded to twice the profile's RAM; the
        # figures reported are what the device allocated)
        run = run_rounds_unix(head, spec, pool, yp, seeds, batches, k, mu, lr, list(range(min(64, pool_n))), smf,
                              2 * profile.ram_bytes)
    else:
        run = run_rounds(head, spec, pool, yp, seeds, batches, k, mu, lr, list(range(min(64, pool_n))), smf=smf,
                         port="cpython", timeout=3600)
    device_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    fe = engine_features(smf, ev, head)
    clean = engine_features(smf, (te[:300].astype(np.int16) - 128).astype(np.int8), head)
    fp = engine_features(smf, pool, head)
    acc = [head_accuracy(head, head.weights, fe, ye)] + [head_accuracy(head, w, fe, ye) for w in run.weights]
    # host replay: the reference reproduces the device's scalars and weights
    w = head.weights.copy()
    worst, exact = 0.0, True
    for r, seed in enumerate(seeds):
        ref = reference_probe(head, w, fp[batches[r]], [yp[i] for i in batches[r]], seed, k, mu)
        worst = max(worst, float(np.abs(ref.scalars - run.scalars[r]).max()))
        w = reference_update(w, seed, run.scalars[r], lr)
        exact &= bool(np.array_equal(w, run.weights[r]))
    host_s = time.perf_counter() - t1

    flash = {"model.tflite": (build / "model.tflite").stat().st_size, "model.smf": len(smf),
             "head.bin": len(head.to_bytes())}
    gain = acc[-1] - acc[0]
    return {
        "target": name, "board": profile.name, "model": manifest["model"]["name"], "density": manifest["density"],
        "trainable": {"layer": "last dense", "kept_weights": head.nnz, "biases": head.rows, "d": head.nnz + head.rows},
        "settings": {"rounds": rounds, "K": k, "batch": batch, "lr": lr, "mu": mu, "estimator": "forward",
                     "pool": pool_n, "eval": eval_n, "shift": f"rotate {ANGLE} deg + N(0, {NOISE}) noise"},
        "accuracy_clean_test_300": head_accuracy(head, head.weights, clean, tel[:300].tolist()),
        "accuracy_per_round": acc,
        "accuracy_before": acc[0], "accuracy_after": acc[-1],
        "points_gained": 100 * gain, "points_per_round": 100 * gain / rounds,
        "points_per_10_rounds_first": 100 * (acc[min(10, rounds)] - acc[0]),
        "losses": run.losses,
        "replay": {"max_scalar_diff": worst, "weights_bit_exact": exact},
        "device_seconds": device_s, "device_seconds_per_round": device_s / rounds, "host_seconds": host_s,
        # the fine-tuner's buffers (computed from ft.py's layout; measured on the micro:bit by
        # tests/test_ondevice_ft.py: MicroPython WebAssembly grows its heap on demand and its gc.mem_alloc keeps
        # counting collected garbage, so it gives no heap figure)
        "heap": {"trainable_bytes": 4 * (head.nnz + head.rows), "copy_bytes": 4 * (head.nnz + head.rows),
                 "feature_buffer_bytes": batch * head.cols * (1 if head.in_zp == -128 else 2),
                 "scalars_bytes": 4 * k, "head_index_bytes": 2 * (head.rows + 1) + head.nnz * (1 if head.cols <= 256 else 2),
                 "total_buffers_bytes": 8 * (head.nnz + head.rows) + batch * head.cols * (1 if head.in_zp == -128 else 2)
                 + 4 * k + 2 * (head.rows + 1) + head.nnz * (1 if head.cols <= 256 else 2) + 16 * head.rows,
                 "profile_ram_bytes": profile.ram_bytes},
        "flash_bytes": flash, "smf_vs_tflite": flash["model.smf"] / flash["model.tflite"],
        "port": port,
        # measured by the device (unix port only: gc.mem_alloc after collections, under a heap bounded to twice the
        # board profile's RAM): model (engine + ft/zo code + model), tuner, local data, most a round allocated
        "device_heap": run.heap if port == "unix" else None,
        # instructions per round (probe + update) on the Cortex-M3, QEMU -icount shift=0
        "round_instructions": round_instructions,
    }


def render(results: list[dict], meta: dict) -> str:
    lines = ["# On-device ZO fine-tuning (device-local shifted MNIST)", "",
             f"Machine: {meta['machine']}; wall time {meta['wall_s']:.0f} s; device code run by {meta['port']}.", "",
             "| target | model | trainable d | K | batch | lr | acc before | acc after | points gained | per round | "
             "tuner buffers | .smf | .tflite |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["settings"]
        heap = r["heap"]["total_buffers_bytes"]
        lines.append(f"| {r['target']} | {r['model']} | {r['trainable']['d']} | {s['K']} | {s['batch']} | {s['lr']} | "
                     f"{100 * r['accuracy_before']:.1f} % | {100 * r['accuracy_after']:.1f} % | "
                     f"{r['points_gained']:+.1f} | {r['points_per_round']:+.3f} | "
                     f"{heap} B | {r['flash_bytes']['model.smf']} B | "
                     f"{r['flash_bytes']['model.tflite']} B |")
    lines += ["", "Accuracy on the shifted test digits after each 10 rounds:", ""]
    for r in results:
        a = r["accuracy_per_round"]
        lines.append(f"- {r['target']}: " + ", ".join(f"{100 * a[i]:.1f}" for i in range(0, len(a), 10))
                     + f" (300 clean test digits before fine-tuning: {100 * r['accuracy_clean_test_300']:.1f} %)")
    for r in results:
        ins = r.get("round_instructions")
        if ins:
            lines += ["", f"{r['target']}: instructions per round (probe of K = {r['settings']['K']} on "
                      f"{r['settings']['batch']} samples + update) on the Cortex-M3: mean {np.mean(ins):,.0f}, "
                      f"min {min(ins):,d}, max {max(ins):,d}."]
        h = r.get("device_heap")
        if h:
            lines += ["", f"{r['target']}: heap measured on the device (MicroPython 1.28 unix port x64, heap bounded to "
                      f"{2 * r['heap']['profile_ram_bytes']} B = twice the profile's RAM as x64 objects are about "
                      "twice a 32-bit board's; native engine): model + engine + ft/zo code "
                      f"{h['model']} B, tuner {h['tuner']} B, local data {h['data']} B, most allocated by a round "
                      f"{h['round_alloc']} B, live at the end {h['live_end']} B."]
    lines += ["", "Host replay of the device rounds (toolchain.verify.reference): "
              + "; ".join(f"{r['target']}: max |scalar diff| {r['replay']['max_scalar_diff']:.1e}, weights "
                          f"{'bit-exact' if r['replay']['weights_bit_exact'] else 'DIFFER'}" for r in results), "",
              f"Host seconds per round ({ {'unix': 'the unix port', 'an385': 'QEMU emulating the Cortex-M3'}.get(results[0].get('port'), 'CPython') if results else ''}"
              " running the device code, includes the int8 backbone on the batch): "
              + ", ".join(f"{r['target']} {r['device_seconds_per_round']:.2f} s" for r in results), "",
              "Tuner buffers: weights + exact-restore copy (8 d), head inputs of a batch, K scalars, row pointers and "
              "columns, logits; computed from ft.py's layout. Measured on the micro:bit (QEMU, tests/test_ondevice_ft.py,"
              " K = 16, 16 samples): tuner state 656 B, data 1360 B, a round 368 B. MicroPython WebAssembly gives no "
              "heap figure (its heap grows on demand and gc.mem_alloc keeps counting collected garbage).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, out=RESULTS / "ondevice_zo", out_help="results path without suffix (.json, .md, .png)")
    ap.add_argument("--build", action="append", required=True, help="NAME=DIR of a MicroPython target build")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--mu", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=512)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--port", choices=("cpython", "unix", "an385"), default="cpython",
                    help="run the device code under CPython, on the MicroPython 1.28 unix port (bounded heap) or on "
                         "its Cortex-M3 build under QEMU (instructions per round)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = []
    for item in args.build:
        name, _, path = item.partition("=")
        results.append(bench_target(name, Path(path), args.rounds, args.k, args.batch, args.lr, args.mu, args.pool,
                                    args.eval, args.port))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("accuracy_per_round", "losses")}))
    m = machine("host", "arch", "cpus", "python")
    meta = {"machine": f"{m['host']} {m['arch']} {m['cpus']} cpus, Python {m['python']}",
            "port": {"unix": "MicroPython 1.28 unix port x64 (device code: ft.py, zo.py, smf engine with native "
                             "kernels), heap bounded to twice the board profile's RAM",
                     "an385": "MicroPython 1.28 on a Cortex-M3 (qemu MPS2_AN385, -icount shift=0; device code: ft.py, "
                              "zo.py, smf engine with native kernels, armv7m .mpy)",
                     "cpython": "CPython (device code: ft.py, zo.py, smf engine)"}[args.port],
            "wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    write_results(out, {"meta": meta, "results": results}, render(results, meta), indent=1)
    try:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            ax.plot(100 * np.array(r["accuracy_per_round"]), label=f"{r['target']} ({r['model']}, d={r['trainable']['d']})")
        ax.set_xlabel("ZO round")
        ax.set_ylabel("accuracy on shifted test digits (%)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
