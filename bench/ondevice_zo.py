"""On-device forward-only ZO fine-tuning on a device-local shifted data set, on real MicroPython ports, several seeds.

For each build (a MicroPython target's ``toolchain build`` output with ``model.smf``): the device holds a local pool
of MNIST training digits rotated by 35 degrees with Gaussian pixel noise (sigma 25), a distribution the model was
not trained on. The device code itself (``ft.py`` + ``zo.py`` + the sparse engine) runs ``rounds`` rounds: a random
batch of the pool, ``probe`` (K directions), ``update`` with its own scalars (a single-device federation). The
accuracy of the device's weights after each round is measured on 1000 rotated+noisy *test* digits (host evaluation
of the weights the device printed), and the rounds are replayed by the host reference. A seed draws the batches
and the ZO direction seeds of every round (``numpy.random.default_rng(seed)``); pool and test digits are the same
for every seed. Each finished seed is written to ``<out>.json`` at once; a rerun skips the seeds already there
(same settings), so an interrupted run resumes.

Ports (``--port``):

- ``unix``: MicroPython 1.28's unix port (scripts/build_micropython.sh), the engine's native kernels, a heap bounded
  to twice the board profile's RAM (``-X heapsize``: x64 objects are about twice a 32-bit board's); heap figures
  measured by the device;
- ``an385``: MicroPython 1.28 on a Cortex-M3 under QEMU ``-icount shift=0``: instructions per round;
- ``microbit``: the micro:bit v1 firmware (MicroPython 1.9.2, 16 KB RAM) under QEMU, the bundle's own hex and tuner;
  the head inputs of the pool are computed by the host engine (bit-exact with the device's, tests) and copied to the
  board's file system, as in tests/test_ondevice_ft.py; heap measured by the board (gc.mem_alloc);
- ``cpython``: the device code under CPython (no heap or speed figure).

    .venv/bin/python bench/ondevice_zo.py --port unix --build esp32=.cache/engine/esp32 --pool 64 --rounds 60 \
        --k 16 --batch 16 --seeds 0,1,2                       # -> bench/results/ondevice_zo_unix.{json,md,png}
    nice .venv/bin/python bench/ondevice_zo.py --port an385 --build esp32=.cache/engine/esp32 --pool 32 \
        --rounds 30 --k 16 --batch 16 --seeds 0,1,2           # -> ondevice_zo_an385.*
    .venv/bin/python bench/ondevice_zo.py --port microbit --build microbit=build/microbit --pool 64 --rounds 30 \
        --k 16 --batch 16 --lr 0.1 --seeds 0,1,2              # -> ondevice_zo_microbit.*
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



# One round on the micro:bit, as short commands (a long one was lost on the emulated UART, and the raw REPL's
# buffer and the parser need heap): the batch's rows read from the pool file on flash into the preallocated
# row buffers V (the other rows into the scratch row T), then probe + update with the collector off, then the
# results. Only the batch is ever in RAM: 16 rows held as bytes objects, or a pool of 24 rows held as one bytes
# object, left the parser no contiguous block by the second round (measured); 1.9.2 has no memoryview.
# Every command ends with a collection: the next command's parser needs contiguous blocks, and without it the
# second round's first line failed ("parser could not allocate enough memory", measured).
MICROBIT_ROUND = (
    "B=%(batch)r\nS=%(seed)d\ngc.collect()",
    "f=open('feats.bin','rb')\nj=0\nfor i in range(%(n)d):\n if j<%(b)d and B[j]==i:\n  f.readinto(V[j])\n"
    "  j+=1\n else:\n  f.readinto(T)\nf.close()\nby=[Y[i] for i in B]\nf=B=None\ngc.collect()",
    "gc.collect()\na1=gc.mem_alloc()\ngc.disable()\ng,l,n=tuner.probe(S,%(k)d,%(mu)r,V,by)\n"
    "tuner.update(S,g,%(lr)r)\na2=gc.mem_alloc()\ngc.enable()\ngc.collect()",
    "by=None\nprint(a2-a1,repr(l),n)\ng=l=n=None\ngc.collect()",
)

# the scalars and weights as float32 bytes, 8 values a line (one repr of all 51 weights needs an 800-byte string)
MICROBIT_READ = "for i in range(0,len(%(a)s),8):\n print(bytes(%(a)s[i:i+8]))\ngc.collect()"


def run_rounds_microbit(bundle: Path, feats: np.ndarray, labels: list[int], seeds: list[int],
                        batches: list[list[int]], k: int, mu: float, lr: float) -> DeviceRun:
    """The rounds on the micro:bit v1 firmware (MicroPython 1.9.2) in QEMU, with the bundle's hex (its main.py
    builds the tuner from spec.py and head.bin) and the head inputs of the pool (``feats``, int8 [n, cols]) as the
    file feats.bin in its flash file system: the device-local data stay in flash, each round reads its batch's rows
    into row buffers allocated once. The round runs with the collector off, so gc.mem_alloc counts everything it
    allocated. Heap: runtime (zo + ft code), tuner state, data (labels and the row buffers), the most a round
    allocated, free after the last round."""
    import ast

    from toolchain.deploy.emulators import microbit
    from toolchain.deploy.repl import ReplError
    from toolchain.package.bundle import MICROBIT_TUNER_FILES

    cols = feats.shape[1]
    run = DeviceRun([], [], [], [], float("nan"), {})
    files = {**{name: (bundle / name).read_bytes() for name in MICROBIT_TUNER_FILES},
             "feats.bin": np.ascontiguousarray(feats, np.int8).tobytes()}
    # main.py of the hex builds the tuner
    with microbit.microbit_session(hex_path=bundle / "microbit.hex", files=files, timeout=60) as (_board, repl):
        tuned = int(repl.exec("import gc\ngc.collect()\nprint(gc.mem_alloc())"))  # runtime + tuner
        # (short commands: the raw REPL's own buffers are garbage; one statement per line)
        # labels as bytes, the batch's row buffers allocated once
        repl.exec(f"Y={bytes(labels)!r}\nT=bytearray({cols})\nV=[bytearray({cols}) for j in range({len(batches[0])})]")
        data = int(repl.exec("gc.collect()\nprint(gc.mem_alloc())")) - tuned
        peak = 0
        for r, seed in enumerate(seeds):
            v = {"batch": batches[r], "seed": seed, "k": k, "mu": mu, "lr": lr, "n": len(feats),
                 "b": len(batches[r])}
            for i, c in enumerate(MICROBIT_ROUND):
                try:
                    out = repl.exec(c % v, timeout=300)
                except ReplError as exc:
                    raise RuntimeError(f"round {r}, command {i}: {exc}") from None
            alloc, loss, n = out.split()
            peak = max(peak, int(alloc))
            run.losses.append(float(loss))
            run.counts.append(int(n))
            for name, dst in (("tuner.g", run.scalars), ("tuner.w", run.weights)):
                raw = b"".join(ast.literal_eval(ln) for ln in repl.exec(MICROBIT_READ % {"a": name}).split("\n")
                               if ln.strip())
                dst.append(np.frombuffer(raw, "<f4").copy())
        free = int(repl.exec("gc.collect()\nprint(gc.mem_free())"))
        rt = int(repl.exec("del tuner, V, T, Y\ngc.collect()\nprint(gc.mem_alloc())"))  # zo + ft code only
    run.heap = {"runtime": rt, "tuner": tuned - rt, "data": data, "round_alloc": peak, "free_end": free}
    return run


def shared_data(build: Path, pool_n: int, eval_n: int) -> dict:
    """What every seed of a build uses: model, head, the shifted pool and test digits, their head inputs."""
    manifest = json.loads((build / "manifest.json").read_text())
    smf = (build / "model.smf").read_bytes()
    head = head_from_smf(smf)
    tr, trl = sm.mnist("train")
    te, tel = sm.mnist("t10k")
    pool = shifted(tr[50000 : 50000 + pool_n], 1)
    ev = shifted(te[:eval_n], 2)
    ye = tel[:eval_n].tolist()
    fe = engine_features(smf, ev, head)
    clean = engine_features(smf, (te[:300].astype(np.int16) - 128).astype(np.int8), head)
    return {"manifest": manifest, "profile": get_profile(manifest["target"]), "smf": smf, "head": head,
            "pool": pool, "yp": trl[50000 : 50000 + pool_n].tolist(), "fe": fe, "ye": ye,
            "fp": engine_features(smf, pool, head),
            "acc_clean": head_accuracy(head, head.weights, clean, tel[:300].tolist())}


def bench_seed(name: str, build: Path, d: dict, st: dict, seed: int, port: str) -> dict:
    """One seed of one build on ``port``: accuracies per round, replay, heap and instructions."""
    head, smf, pool, yp = d["head"], d["smf"], d["pool"], d["yp"]
    rounds, k, batch, lr, mu, pool_n = st["rounds"], st["K"], st["batch"], st["lr"], st["mu"], st["pool"]
    rng = np.random.default_rng(seed)
    batches = [sorted(rng.choice(pool_n, batch, replace=False).tolist()) for _ in range(rounds)]
    seeds = [int(s) for s in rng.integers(0, 2**32, rounds, dtype=np.uint64)]
    spec = {"estimator": "forward", "batch_max": batch, "k_max": k}
    evals = list(range(min(64, pool_n)))
    t0 = time.perf_counter()
    round_instructions = None
    if port == "an385":
        run, round_instructions = run_rounds_qemu(head, spec, pool, yp, seeds, batches, k, mu, lr, evals, smf)
    elif port == "unix":
        run = run_rounds_unix(head, spec, pool, yp, seeds, batches, k, mu, lr, evals, smf, 2 * d["profile"].ram_bytes)
    elif port == "microbit":
        for attempt in range(3):  # the emulated UART has no flow control: a lost byte can stall a session
            try:
                run = run_rounds_microbit(build / "bundle", d["fp"], yp, seeds, batches, k, mu, lr)
                break
            except (RuntimeError, OSError) as exc:
                print(f"micro:bit session {attempt + 1} of 3 failed: {str(exc)[-300:]}", flush=True)
        else:
            raise RuntimeError("the micro:bit session failed three times")
    else:
        run = run_rounds(head, spec, pool, yp, seeds, batches, k, mu, lr, evals, smf=smf, port="cpython",
                         timeout=3600)
    device_s = time.perf_counter() - t0
    fe, ye, fp = d["fe"], d["ye"], d["fp"]
    acc = [head_accuracy(head, head.weights, fe, ye)] + [head_accuracy(head, w, fe, ye) for w in run.weights]
    # host replay: the reference reproduces the device's scalars (float32; 30-bit floats on the micro:bit) and,
    # given the device's scalars, its weights
    w = head.weights.copy()
    worst, worst_w, exact = 0.0, 0.0, True
    for r, s in enumerate(seeds):
        ref = reference_probe(head, w, fp[batches[r]], [yp[i] for i in batches[r]], s, k, mu)
        worst = max(worst, float(np.abs(ref.scalars - run.scalars[r]).max()))
        w = reference_update(w, s, run.scalars[r], lr)
        worst_w = max(worst_w, float(np.abs(w - run.weights[r]).max()))
        exact &= bool(np.array_equal(w, run.weights[r]))
        w = run.weights[r].copy()  # (continue from the device's weights: the 30-bit float error does not add up)
    return {"target": name, "seed": seed, "accuracy_per_round": acc, "accuracy_before": acc[0],
            "accuracy_after": acc[-1], "points_gained": 100 * (acc[-1] - acc[0]), "losses": run.losses,
            "replay": {"max_scalar_diff": worst, "max_weight_diff": worst_w, "weights_bit_exact": exact},
            "device_seconds": device_s, "device_seconds_per_round": device_s / rounds,
            # measured by the device (gc.mem_alloc after collections) on a heap that is really bounded: the unix
            # port (twice the profile's RAM), the Cortex-M3 (the firmware's fixed 256 KB, 32-bit objects; the
            # figures are differences, so the harness's RAM file system is not in them) and the micro:bit (16 KB
            # RAM); None under CPython
            "device_heap": run.heap if port != "cpython" else None,
            # instructions per round (probe + update) on the Cortex-M3, QEMU -icount shift=0
            "round_instructions": round_instructions}


def target_info(name: str, d: dict, st: dict) -> dict:
    head, build_smf = d["head"], d["smf"]
    return {"target": name, "board": d["profile"].name, "model": d["manifest"]["model"]["name"],
            "density": d["manifest"]["density"],
            "trainable": {"layer": "last dense", "kept_weights": head.nnz, "biases": head.rows, "d": head.nnz + head.rows},
            "accuracy_clean_test_300": d["acc_clean"], "smf_bytes": len(build_smf), "settings": st,
            "profile_ram_bytes": d["profile"].ram_bytes}


def _ms(v: list[float], f: str = "{:.1f}", scale: float = 1.0) -> str:
    a = np.asarray(v, float) * scale
    return (f + " ± " + f.replace("+", "")).format(a.mean(), a.std(ddof=1) if len(a) > 1 else 0.0)


def summarize(targets: dict, runs: list[dict]) -> dict:
    out = {}
    for name in targets:
        rs = [r for r in runs if r["target"] == name]
        if not rs:
            continue
        s = {"seeds": [r["seed"] for r in rs],
             "accuracy_before_mean": float(np.mean([r["accuracy_before"] for r in rs])),
             "accuracy_after_mean": float(np.mean([r["accuracy_after"] for r in rs])),
             "accuracy_after_std": float(np.std([r["accuracy_after"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
             "points_gained_mean": float(np.mean([r["points_gained"] for r in rs])),
             "points_gained_std": float(np.std([r["points_gained"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0}
        ins = [np.mean(r["round_instructions"]) for r in rs if r["round_instructions"]]
        if ins:
            s["round_instructions_mean"] = float(np.mean(ins))
        heaps = [r["device_heap"] for r in rs if r["device_heap"]]
        if heaps:
            s["device_heap_max"] = {k: max(h[k] for h in heaps) for k in heaps[0]}
        out[name] = s
    return out


def render(res: dict) -> str:
    meta, targets, runs = res["meta"], res["targets"], res["runs"]
    lines = ["# On-device ZO fine-tuning (device-local shifted MNIST)", "",
             f"Machine: {meta['machine']}; wall time {meta['wall_s']:.0f} s (this invocation; seeds resumed from "
             f"earlier runs keep their own device seconds below); date {meta['date']}.", "",
             f"Device code run by {meta['port']}.", "",
             "Seeds draw the batches and the ZO direction seeds of every round; the local pool and the 1000 shifted "
             "test digits are the same for every seed (accuracy before is therefore the same). Mean ± sample std "
             "over the seeds.", "",
             "| target | model | trainable d | rounds | K | batch | pool | lr | seeds | acc before | acc after | "
             "points gained |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in targets.items():
        rs = [r for r in runs if r["target"] == name]
        if not rs:
            continue
        st = t["settings"]
        lines.append(f"| {name} | {t['model']} | {t['trainable']['d']} | {st['rounds']} | {st['K']} | {st['batch']} | "
                     f"{st['pool']} | {st['lr']} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{_ms([r['accuracy_before'] for r in rs], scale=100)} % | "
                     f"{_ms([r['accuracy_after'] for r in rs], scale=100)} % | "
                     f"{_ms([r['points_gained'] for r in rs], '{:+.1f}')} |")
    lines += ["", "Per seed:", "", "| target | seed | acc before | acc after | every 10 rounds | device s / round | "
              "max scalar diff vs host | weights vs host replay |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a = r["accuracy_per_round"]
        rp = r["replay"]
        lines.append(f"| {r['target']} | {r['seed']} | {100 * r['accuracy_before']:.1f} % | "
                     f"{100 * r['accuracy_after']:.1f} % | "
                     + ", ".join(f"{100 * a[i]:.1f}" for i in range(0, len(a), 10))
                     + f" | {r['device_seconds_per_round']:.2f} | {rp['max_scalar_diff']:.1e} | "
                     + ("bit-exact" if rp["weights_bit_exact"] else f"max diff {rp['max_weight_diff']:.1e}") + " |")
    ins = [(r, r["round_instructions"]) for r in runs if r.get("round_instructions")]
    if ins:
        lines += ["", "Instructions per round (probe of K directions on a batch + update) on the Cortex-M3 "
                  "(QEMU -icount shift=0, 1 instruction per ns of guest time):", ""]
        for name in targets:
            per = [np.mean(v) for r, v in ins if r["target"] == name]
            if per:
                lines.append(f"- {name}: mean over seeds {_ms(per, '{:,.0f}')}; per seed "
                             + ", ".join(f"{r['seed']}: {np.mean(v):,.0f} (min {min(v):,d}, max {max(v):,d})"
                                         for r, v in ins if r["target"] == name))
    heaps = [r for r in runs if r.get("device_heap")]
    if heaps:
        lines += ["", "Heap measured on the device (gc.mem_alloc after collections; a round's allocation with the "
                  "collector off on the micro:bit, garbage included), bytes, per seed:", ""]
        keys = list(heaps[0]["device_heap"])
        lines += ["| target | seed | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for r in heaps:
            lines.append(f"| {r['target']} | {r['seed']} | " + " | ".join(str(r["device_heap"][k]) for k in keys) + " |")
        lines += ["", meta.get("heap_note", "")]
    lines += ["", "Clean test digits (300, before fine-tuning): "
              + ", ".join(f"{n} {100 * t['accuracy_clean_test_300']:.1f} %" for n, t in targets.items()), ""]
    return "\n".join(lines)


PORTS = {
    "unix": ("MicroPython 1.28 unix port x64 (ft.py, zo.py and the smf engine with native kernels as x64 .mpy), "
             "heap bounded (-X heapsize) to twice the board profile's RAM",
             "unix port: model = engine + ft/zo code + model, tuner = its buffers, data = the local pool, round_alloc "
             "= the most a round allocated (garbage included), live_end = everything live at the end; x64 objects "
             "are about twice a 32-bit board's."),
    "an385": ("MicroPython 1.28 on a Cortex-M3 (qemu MPS2_AN385, -icount shift=0; ft.py, zo.py and the smf engine "
              "with native kernels as armv7m .mpy)",
              "Cortex-M3 (32-bit objects, fixed 256 KB heap): model = engine + ft/zo code + model, tuner = its "
              "buffers, data = the local pool, round_alloc = the most a round allocated (garbage included), "
              "live_end = everything live at the end (differences of gc.mem_alloc: the harness's RAM file system "
              "holding the files is not in them)."),
    "microbit": ("the micro:bit v1 firmware (MicroPython 1.9.2, nRF51822, 16 KB RAM) under QEMU, the bundle's hex "
                 "and tuner (ft.py, zo.py from source); head inputs of the pool computed by the host engine",
                 "micro:bit: runtime = zo + ft code, tuner = its state, data = the pool's labels and the batch's row "
                 "buffers (the pool's head inputs stay in the flash file system), round_alloc = what one round allocated with the collector off, free_end = gc.mem_free() "
                 "after the last round."),
    "cpython": ("CPython (ft.py, zo.py, smf engine)", ""),
}


def main() -> None:
    ap = parser(__doc__, out=None)
    ap.add_argument("--out", default=None, help="results path without suffix (default bench/results/ondevice_zo_<port>)")
    ap.add_argument("--build", action="append", default=[], help="NAME=DIR of a MicroPython target build")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--mu", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default %(default)s)")
    ap.add_argument("--port", choices=tuple(PORTS), default="unix",
                    help="where the device code runs (module docstring)")
    ap.add_argument("--render-only", action="store_true", help="rewrite .md and .png from the .json, run nothing")
    args = ap.parse_args()
    out = Path(args.out) if args.out else RESULTS / f"ondevice_zo_{args.port}"
    if args.render_only:
        res = json.loads(out.with_suffix(".json").read_text())
        write_results(out, res, render(res), indent=1)
        plot(out, res["meta"], res["targets"], res["runs"])
        return
    st = {"rounds": args.rounds, "K": args.k, "batch": args.batch, "lr": args.lr, "mu": args.mu,
          "estimator": "forward", "pool": args.pool, "eval": args.eval,
          "shift": f"rotate {ANGLE} deg + N(0, {NOISE}) noise"}
    seeds = [int(s) for s in args.seeds.split(",")]
    prev = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    t0 = time.perf_counter()
    m = machine("host", "arch", "cpus", "python")
    meta = {"machine": f"{m['host']} {m['arch']} {m['cpus']} cpus, Python {m['python']}", "port": PORTS[args.port][0],
            "heap_note": PORTS[args.port][1], "seeds": seeds, "wall_s": 0.0}
    targets: dict = {}
    runs: list[dict] = []
    for item in args.build:
        name, _, path = item.partition("=")
        d = shared_data(Path(path), args.pool, args.eval)
        targets[name] = target_info(name, d, st)
        same = prev.get("targets", {}).get(name, {}).get("settings") == st and prev["meta"].get("port") == meta["port"]
        done = {r["seed"]: r for r in prev.get("runs", []) if same and r["target"] == name}
        for seed in seeds:
            if seed in done:
                print(f"{name} seed {seed}: resumed from {out.with_suffix('.json')}")
                runs.append(done[seed])
                continue
            runs.append(bench_seed(name, Path(path), d, st, seed, args.port))
            r = runs[-1]
            print(f"{name} seed {seed}: {100 * r['accuracy_before']:.1f} -> {100 * r['accuracy_after']:.1f} %, "
                  f"{r['device_seconds']:.0f} s", flush=True)
            save(out, meta, targets, runs, t0)  # each finished seed at once: a rerun resumes after it
    save(out, meta, targets, runs, t0)
    print(f"wrote {out.with_suffix('.json')} and .md")


def save(out: Path, meta: dict, targets: dict, runs: list[dict], t0: float) -> None:
    meta = {**meta, "wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res = {"meta": meta, "targets": targets, "runs": runs, "summary": summarize(targets, runs)}
    write_results(out, res, render(res), indent=1)
    plot(out, meta, targets, runs)


def plot(out: Path, meta: dict, targets: dict, runs: list[dict]) -> None:
    try:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, t in targets.items():
            acc = np.array([r["accuracy_per_round"] for r in runs if r["target"] == name]) * 100
            if not len(acc):
                continue
            x = np.arange(acc.shape[1])
            mean, std = acc.mean(0), acc.std(0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1])
            ax.plot(x, mean, label=f"{name} ({t['model']}, d={t['trainable']['d']}, {len(acc)} seeds)")
            ax.fill_between(x, mean - std, mean + std, alpha=0.25)
        ax.set_xlabel("ZO round")
        ax.set_ylabel("accuracy on shifted test digits (%)")
        ax.set_title(meta["port"].split("(")[0].strip(), fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        plt.close(fig)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
