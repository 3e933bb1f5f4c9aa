"""Device engine speed as instructions: bytecode vs viper dense vs viper sparse on real MicroPython 1.28 builds.

Instructions per inference and per kept MAC on the qemu Cortex-M3 board (MPS2_AN385, ``-icount shift=0``:
guest time counts instructions, toolchain/deploy/emulators/qemu_cortexm.py), per layer and in total, for

- the default ``toolchain build --target esp32`` model (built into .cache/engine/esp32 if missing), and
- LeNet-5-like models with every layer pruned to 1 %, 5 % and 10 % (tests/support/sparse_models.py);

milliseconds per inference and the smallest heap that runs the engine on the unix port (x64; ms are wall
time of a shared machine, so only indicative). Every run's outputs are checked against TFLite Micro. The
per-layer figures fit the cost model that picks a layer's layout (``layout='auto'``,
device_runtime/micropython/smf_viper_prep.py); the fit is printed and saved.

    .venv/bin/python bench/engine_speed.py [--inputs 20] [--bytecode-inputs 2]

Writes bench/results/engine_speed.json, .md and .png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, RESULTS, machine, parser, pyplot, write_results
from support import sparse_models as sm

from toolchain.contracts.smf import SmfModel, read_smf
from toolchain.deploy.emulators import qemu_cortexm, smf_ports, unix_port
from toolchain.export.smf_writer import tflite_to_smf

CACHE = REPO / ".cache" / "engine"
ENGINES = {  # name -> (native, layout)
    "bytecode": (False, "sparse"),
    "viper dense": (True, "dense"),
    "viper ws": (True, "ws"),
    "viper sparse": (True, "sparse"),
    "viper auto": (True, "auto"),
}
LAYOUT_OF = {"viper dense": "dense", "viper ws": "ws", "viper sparse": "sparse"}
OPNAMES = {1: "CONV_2D", 2: "DEPTHWISE", 3: "FULLY_CONNECTED", 4: "MAX_POOL", 5: "AVG_POOL", 6: "MEAN", 7: "ADD",
           8: "PAD", 10: "REQUANTIZE"}

# Per-operator instruction profile on the board: inferences timed whole (ticks_us around infer), then the
# operators of the first inputs timed one by one (the input copied in first; RESHAPE has no operator).
PROFILE = """
import gc, sys, time, binascii
blk = bytearray(%(block)d * %(size)d)
from smf import Model
m = Model('model.smf', native=%(native)s, layout=%(layout)r)
gc.collect()
ops = m.ops
lay = []
for op in ops:
    if not m.v:
        lay.append('bytecode')
    elif op[0] is m.v.conv:
        lay.append('dense' if op[5][7] is None else ('ws' if op[5][8] is None else 'sparse'))
    elif op[0] is m.v.fc:
        lay.append('dense' if op[5][-1] is None else 'sparse')
    else:
        lay.append('-')
print('layouts', ' '.join(lay))
tot = 0
per = [0] * len(ops)
prof = 0
for k in range(0, %(n)d, %(block)d):
    unpack(blk)
    for j in range(min(%(block)d, %(n)d - k)):
        d = memoryview(blk)[j * %(size)d:(j + 1) * %(size)d]
        t = time.ticks_us()
        o = m.infer(d)
        tot += time.ticks_diff(time.ticks_us(), t)
        print(binascii.hexlify(o).decode())
        if prof < %(prof)d:
            prof += 1
            b = m.input_buffer()
            for i in range(m.input_size):
                b[i] = d[i] - 256 if d[i] > 127 else d[i]
            for i in range(len(ops)):
                op = ops[i]
                t = time.ticks_us()
                op[0](m, op)
                per[i] += time.ticks_diff(time.ticks_us(), t)
print('us', tot, prof, ' '.join([str(v) for v in per]))
"""

UNIX_TIMED = """
import sys, time
from smf import Model
m = Model('model.smf', native=%(native)s, layout=%(layout)r)
x = open('x.bin', 'rb').read()
n = m.input_size
best = None
for r in range(3):
    t = time.ticks_us()
    for k in range(%(n)d):
        m.infer(memoryview(x)[k * n:(k + 1) * n])
    dt = time.ticks_diff(time.ticks_us(), t)
    best = dt if best is None or dt < best else best
print(best)
"""

HEAP_PROBE = """
from smf import Model
m = Model('model.smf', native=%(native)s, layout=%(layout)r)
x = open('x.bin', 'rb').read()
for k in range(2):
    m.infer(x)
print('ok')
"""


def layer_macs(model: SmfModel) -> list[dict[str, Any]]:
    """Per weighted operator: multiply-accumulates over every weight and over kept weights only (taps that
    fall into the padding excluded, as the kernels skip them), weights, kept weights, outputs, and the loop
    counts of the cost model (features())."""
    rows = []
    dev = -1  # index among the device's operators (RESHAPE has none)
    for i, op in enumerate(model.ops):
        dev += op.opcode != 9
        if op.weights is None:
            continue
        w = op.weights
        out = model.tensors[op.output]
        if op.opcode in (1, 2):
            inp = model.tensors[op.inputs[0]]
            (h, wd, c), (oh, ow, oc) = inp.shape, out.shape
            kh, kw = op.params["kh"], op.params["kw"]
            sy, sx = op.params["stride"]
            pt, pl = op.params["pad"]
            # output pixels reached by tap (ky, kx): the in-bounds count in each direction
            ny = np.array([sum(0 <= oy * sy + ky - pt < h for oy in range(oh)) for ky in range(kh)])
            nx = np.array([sum(0 <= ox * sx + kx - pl < wd for ox in range(ow)) for kx in range(kw)])
            reach = np.outer(ny, nx).reshape(-1)  # per tap
            cin = 1 if op.opcode == 2 else c
            per_col = np.repeat(reach, cin)  # column (ky*kw + kx)*cin + ci
            rows_col = np.repeat(np.repeat(ny, kw), cin)  # output rows a weight's loop visits
            dense = int(per_col.sum()) * w.shape[0]
            kept = int(((w != 0) * per_col[None, :]).sum())
            outputs = oh * ow * oc
            ws_loops = int(((w != 0) * rows_col[None, :]).sum())  # inner loops of the ws kernel
            dense_loops = oc * ow * int(ny.sum())  # inner loops of the dense kernel (one per window row)
            ya, xa = -(-pt // sy), -(-pl // sx)  # interior: whole window inside the input
            yb = max(ya, min(oh, (h - kh + pt) // sy + 1))
            xb = max(xa, min(ow, (wd - kw + pl) // sx + 1))
            inner = (yb - ya) * (xb - xa)
            nk = int((w != 0).sum())
            oss_inner, oss_border = nk * inner, nk * (oh * ow - inner)
        else:
            dense = int(w.size)
            kept = int((w != 0).sum())
            outputs = out.shape[2]
            ws_loops = dense_loops = outputs
            oss_inner, oss_border = kept, 0
        rows.append({"op": i, "dev": dev, "name": OPNAMES[op.opcode], "shape": list(w.shape), "weights": int(w.size),
                     "kept_weights": int((w != 0).sum()), "density": round(float((w != 0).mean()), 4),
                     "dense_macs": dense, "kept_macs": kept, "outputs": int(outputs), "ws_loops": ws_loops,
                     "dense_loops": dense_loops, "oss_inner": oss_inner, "oss_border": oss_border})
    return rows


def run_qemu(smf: bytes, x: np.ndarray, native: bool, layout: str, n_prof: int) -> dict[str, Any]:
    n = len(x)
    flat = np.ascontiguousarray(x, np.int8).reshape(n, -1)
    block = 4
    code = qemu_cortexm.UNPACK + PROFILE % {"native": native, "layout": layout, "n": n, "block": block,
                                            "size": flat.shape[1], "prof": n_prof}
    stdin = b"".join(qemu_cortexm.pack(flat[k:k + block].tobytes()) for k in range(0, n, block))
    out = qemu_cortexm.run_micropython(code, files={**smf_ports.engine_files("an385", native), "model.smf": smf},
                                       stdin=stdin, board="an385", timeout=3600)
    lines = [ln for ln in out.split("\n") if ln.strip()]
    layouts = lines[0].split()[1:]
    outputs = np.stack([np.frombuffer(bytes.fromhex(ln), np.int8) for ln in lines[1:-1]])
    parts = lines[-1].split()
    tot, prof = int(parts[1]), int(parts[2])
    per_op = [qemu_cortexm.instructions(int(v) / prof) for v in parts[3:]]
    return {"outputs": outputs, "instructions": qemu_cortexm.instructions(tot / n), "per_op": per_op,
            "layouts": layouts}


def run_unix(smf: bytes, x: np.ndarray, native: bool, layout: str) -> float:
    code = UNIX_TIMED % {"native": native, "layout": layout, "n": len(x)}
    files = {**smf_ports.engine_files("unix", native), "model.smf": smf,
             "x.bin": np.ascontiguousarray(x, np.int8).tobytes()}
    return int(unix_port.run_micropython(code, files=files, heap_bytes=1 << 20)) / len(x) / 1000.0


def min_heap(smf: bytes, x: np.ndarray, native: bool, layout: str) -> int:
    """The smallest unix-port heap (-X heapsize, a real bound; 256-byte resolution) in which the engine
    loads the model and runs two inferences: code, model and buffers included, files on the host."""
    files = {**smf_ports.engine_files("unix", native), "model.smf": smf,
             "x.bin": np.ascontiguousarray(x[0], np.int8).tobytes()}
    code = HEAP_PROBE % {"native": native, "layout": layout}

    def fits(n: int) -> bool:
        try:
            return unix_port.run_micropython(code, files=files, heap_bytes=n).strip() == "ok"
        except unix_port.MicroPythonError as exc:
            if "MemoryError" in str(exc):
                return False
            raise

    lo, hi = 4096, 1 << 20
    if not fits(hi):
        raise RuntimeError("does not fit 1 MB")
    while hi - lo > 256:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def esp32_default() -> Path:
    path = CACHE / "esp32" / "model.tflite"
    if not path.is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "toolchain"), "build", "--target", "esp32", "--out",
                        str(path.parent), "--quiet"], check=True)
    return path


def features(r: dict[str, Any], layout: str) -> list[float]:
    """The cost model's loop counts of layer r under layout (device_runtime/micropython/smf_viper_prep.py COST)."""
    if r["name"] != "CONV_2D":
        return [r["kept_macs"] if layout != "dense" else r["dense_macs"], 0, r["outputs"]]
    if layout == "ws":
        return [r["kept_macs"], r["ws_loops"], r["outputs"]]
    if layout == "sparse":
        return [r["oss_inner"], r["oss_border"], r["outputs"]]
    return [r["dense_macs"], r["dense_loops"], r["outputs"]]


def fit_cost(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cost model's coefficients from per-layer instruction counts (features()).

    Convolutions: least squares on the differences between layouts of the same layer (ws - sparse,
    dense - sparse, ws - dense). The requantization after each layer is the same code for every layout but
    its cost depends on the data (how many outputs fall between the clamp limits), so absolute counts fit
    badly; differences cancel it. Only differences of the per-output term are identifiable: ws's is 0.
    Fully connected layers: plain least squares per layout (sparse, dense). ``picks_best`` counts the layers
    whose predicted cheapest layout is the measured cheapest one."""
    fits: dict[str, dict[str, Any]] = {}
    lays = ["ws", "sparse", "dense"]
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["name"] == "CONV_2D":
            by.setdefault((r["model"], r["op"]), {})[r["layout"]] = r
    full = {k: v for k, v in by.items() if set(v) == set(lays)}
    if len(full) >= 3:
        x, y = [], []
        for v in full.values():
            for a, b in (("ws", "sparse"), ("dense", "sparse"), ("ws", "dense")):
                row = np.zeros(9)
                row[3 * lays.index(a):3 * lays.index(a) + 3] += features(v[a], a)
                row[3 * lays.index(b):3 * lays.index(b) + 3] -= features(v[b], b)
                x.append(row)
                y.append(v[a]["instructions"] - v[b]["instructions"])
        coef = np.insert(np.linalg.lstsq(np.delete(np.array(x), 2, axis=1), np.array(y, float), rcond=None)[0], 2, 0.0)

        def pred(v: dict[str, dict[str, Any]], lay: str) -> float:
            k = lays.index(lay)
            return float(np.dot(coef[3 * k:3 * k + 3], features(v[lay], lay)))

        hits = sum(min(lays, key=lambda lay, v=v: pred(v, lay)) == min(lays, key=lambda lay, v=v: v[lay]["instructions"])
                   for v in full.values())
        for k, lay in enumerate(lays):
            fits[lay] = {"c0": round(float(coef[3 * k]), 1), "c1": round(float(coef[3 * k + 1]), 1),
                         "c2": round(float(coef[3 * k + 2]), 1), "layers": len(full),
                         "picks_best": f"{hits} of {len(full)}"}
    for lay in ("sparse", "dense"):
        sel = [r for r in rows if r["layout"] == lay and r["name"] == "FULLY_CONNECTED"]
        if len(sel) >= 3:
            xf = np.array([[features(r, lay)[0], r["outputs"]] for r in sel], float)
            yf = np.array([r["instructions"] for r in sel], float)
            c = np.linalg.lstsq(xf, yf, rcond=None)[0]
            fits[f"{lay} fc"] = {"c0": round(float(c[0]), 1), "c1": 0.0, "c2": round(float(c[1]), 1),
                                 "layers": len(sel),
                                 "max_rel_error": round(float(np.max(np.abs(xf @ c - yf) / yf)), 3)}
    return fits


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--inputs", type=int, default=20)
    ap.add_argument("--bytecode-inputs", type=int, default=2)
    ap.add_argument("--unix-inputs", type=int, default=200)
    args = ap.parse_args()
    for port in ("an385", "unix"):
        if not smf_ports.available(port):
            sys.exit(smf_ports.missing_reason(port))
    t0 = time.time()
    models = {"esp32 default (LeNet-5, GMP 10 %)": esp32_default()}
    for d in (0.10, 0.05, 0.01):
        models[f"LeNet-5-like, every layer {round(d * 100)} %"] = sm.cached_tflite(CACHE / "models", "lenet", d)
    results: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    for mname, path in models.items():
        smf = tflite_to_smf(path.read_bytes())
        model = read_smf(smf)
        macs = layer_macs(model)
        x_all = sm.quantized_inputs(path, max(args.inputs, args.unix_inputs))
        ref = sm.tflm_outputs(path, x_all[:args.inputs])
        entry: dict[str, Any] = {"model": mname, "tflite": str(path.relative_to(REPO)), "layers": macs,
                                 "kept_macs": sum(r["kept_macs"] for r in macs),
                                 "dense_macs": sum(r["dense_macs"] for r in macs), "engines": {}}
        for ename, (native, layout) in ENGINES.items():
            n = args.bytecode_inputs if ename == "bytecode" else args.inputs
            q = run_qemu(smf, x_all[:n], native, layout, n_prof=min(n, 3))
            exact = bool((q["outputs"] == ref[:n]).all())
            ms = run_unix(smf, x_all[:args.unix_inputs if ename != "bytecode" else 20], native, layout)
            heap = min_heap(smf, x_all, native, layout)
            per_layer = []
            for r in macs:
                ins = q["per_op"][r["dev"]]
                per_layer.append({"op": r["op"], "layout": q["layouts"][r["dev"]], "instructions": ins})
                if ename in LAYOUT_OF:  # (a layer that did not get its layout, e.g. dense did not fit, counts as run)
                    layer_rows.append({**r, "model": mname, "layout": q["layouts"][r["dev"]], "instructions": ins})
            entry["engines"][ename] = {
                "instructions_per_inference": q["instructions"],
                "instructions_per_kept_mac": round(q["instructions"] / entry["kept_macs"], 1),
                "per_op_instructions": q["per_op"], "layouts": q["layouts"], "weighted_layers": per_layer,
                "unix_ms_per_inference": round(ms, 3), "unix_min_heap_bytes": heap, "qemu_inputs": n,
                "bit_exact_vs_tflite_micro": exact}
            print(f"{mname:40s} {ename:13s} {q['instructions']:>11,d} instr/inference "
                  f"{q['instructions'] / entry['kept_macs']:8.1f}/kept MAC  unix {ms:8.3f} ms  heap {heap}  "
                  f"exact={exact}  {' '.join(q['layouts'])}", flush=True)
        e = entry["engines"]
        entry["viper_speedup_vs_bytecode"] = round(e["bytecode"]["instructions_per_inference"]
                                                   / e["viper auto"]["instructions_per_inference"], 2)
        results.append(entry)
    fits = fit_cost(layer_rows)
    write(results, fits, layer_rows, args, time.time() - t0)


def write(results: list[dict[str, Any]], fits: dict[str, Any], layer_rows: list[dict[str, Any]],
          args: argparse.Namespace, wall: float) -> None:
    doc = {"runtime": "MicroPython 1.28.0 built from ../shared/vendor (scripts/build_micropython.sh): qemu port "
                      "MPS2_AN385 (Cortex-M3, armv7m native code) under qemu-system-arm -icount shift=0; unix port x64",
           "inputs": {"viper": args.inputs, "bytecode": args.bytecode_inputs, "unix": args.unix_inputs},
           "models": results, "cost_fit": fits, "layers": layer_rows,
           "machine": machine("platform", "python", "cpu_count"), "wall_time_s": round(wall, 1)}
    md = ["# Device engine speed: instructions on a Cortex-M3 (QEMU -icount), ms on the unix port", "",
          f"Runtime: {doc['runtime']}. Instructions per inference are the mean over {args.inputs} MNIST test inputs "
          f"({args.bytecode_inputs} for the bytecode engine), per layer over the first 3; every output checked against "
          "TFLite Micro. Layouts: `sparse` output-stationary over kept weights, `ws` weight-stationary over kept "
          "weights, `dense` every weight; `viper auto` (the default) picks per layer by the cost model below. "
          "unix ms: best of 3 passes on a shared 2-core machine (indicative only). Min heap: the smallest "
          "`-X heapsize` of the unix port (a real bound) in which the engine loads the model and runs two "
          "inferences (engine code, model and buffers; 256 B resolution; x64 objects are larger than a 32-bit "
          "board's).", "",
          "| model | engine | instructions / inference | per kept MAC | vs bytecode | unix ms | min heap (B) | bit-exact "
          "| layouts |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        bc = r["engines"]["bytecode"]["instructions_per_inference"]
        for ename, e in r["engines"].items():
            ins = e["instructions_per_inference"]
            md.append(f"| {r['model']} | {ename} | {ins:,d} | {e['instructions_per_kept_mac']} | {bc / ins:.1f}x | "
                      f"{e['unix_ms_per_inference']} | {e['unix_min_heap_bytes']:,d} | {e['bit_exact_vs_tflite_micro']} "
                      f"| {' '.join(e['layouts'])} |")
    md += ["", "Kept MACs per inference: " + "; ".join(f"{r['model']}: {r['kept_macs']:,d} of {r['dense_macs']:,d}"
                                                      for r in results), "",
           "## Per layer: viper sparse (output-stationary), ws (weight-stationary) and dense", "",
           "`dense / best sparse` is the speed-up of the better sparse loop over dense; the goal is >= 0.5 / density.",
           "",
           "| model | layer | density | kept MACs | sparse instr | ws instr | dense instr | auto ran | dense / best sparse "
           "| 0.5 / density |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        by = {e: {w["op"]: w for w in r["engines"][e]["weighted_layers"]} for e in LAYOUT_OF}
        auto = {w["op"]: w for w in r["engines"]["viper auto"]["weighted_layers"]}
        for lay in r["layers"]:
            s, ws, d = (by[e][lay["op"]] for e in ("viper sparse", "viper ws", "viper dense"))
            note = "" if d["layout"] == "dense" else f" (did not fit: ran {d['layout']})"
            best = min(s["instructions"], ws["instructions"])
            md.append(f"| {r['model']} | {lay['op']} {lay['name']} {lay['shape']} | {lay['density']:.3f} | "
                      f"{lay['kept_macs']:,d} | {s['instructions']:,d} | {ws['instructions']:,d} | "
                      f"{d['instructions']:,d}{note} | {auto[lay['op']]['layout']} | "
                      f"{d['instructions'] / max(1, best):.1f}x | {0.5 / max(lay['density'], 1e-9):.1f}x |")
    md += ["", "## Cost model fit", "",
           "instructions = c0 * f0 + c1 * f1 + c2 * f2 per layer; f: ws = (MACs, inner loops, outputs), sparse = "
           "(kept weights x interior pixels, kept weights x border pixels, outputs), dense = (MACs, window rows, "
           "outputs), fully connected = (MACs, -, outputs). Convolutions: least squares on the differences "
           "between the layouts of each layer (the requantization is the same code for every layout but costs "
           "what the data make it, so differences cancel it; c2 relative to ws's); fully connected: least squares "
           "per layout. device_runtime/micropython/smf_viper_prep.py `COST` holds these figures and `layout='auto'` picks, "
           "per layer, the lowest prediction (dense only if its weight copy fits). The convolution fit has only "
           "two geometries (LeNet's conv1 and conv2) at four densities: it ranks them right, and is untested "
           "beyond.", "",
           "| layout | c0 | c1 | c2 | layers | fit |", "|---|---|---|---|---|---|"]
    for k, f in fits.items():
        quality = f"picks the measured best on {f['picks_best']}" if "picks_best" in f else \
            f"max rel. error {f['max_rel_error']}"
        md.append(f"| {k} | {f['c0']} | {f['c1']} | {f['c2']} | {f['layers']} | {quality} |")
    md += ["", f"Wall time {doc['wall_time_s']} s on {doc['machine']['platform']}, {doc['machine']['cpu_count']} CPUs.",
           ""]
    write_results(RESULTS / "engine_speed", doc, "\n".join(md))
    print("\n".join(md))
    plot(results, RESULTS / "engine_speed.png")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(results[0]["engines"])
    width = 0.8 / len(names)
    for k, ename in enumerate(names):
        ys = [r["engines"][ename]["instructions_per_inference"] for r in results]
        ax.bar(np.arange(len(results)) + k * width, ys, width, label=ename)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2)
    ax.set_xticklabels([r["model"].replace(", ", "\n") for r in results], fontsize=8)
    ax.set_ylabel("instructions per inference (Cortex-M3, QEMU -icount)")
    ax.legend(fontsize=8)
    ax.set_title("MicroPython 1.28 .smf engine: bytecode vs viper")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
