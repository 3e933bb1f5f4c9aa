"""Sparse vs dense inference in the MicroPython engine (WebAssembly build), and flash bytes of .smf vs .tflite.

One LeNet-5-like model (MNIST, 5 % of conv/linear weights kept, full int8) run by the same runtime twice:
the sparse path (only kept weights are visited) and the dense path (``Model(..., dense=True)``: the same
kernels over every weight, zeros included). Outputs of both are checked against TFLite Micro.

    .venv/bin/python bench/sparse_inference.py [--inputs 50]

Writes bench/results/sparse_inference.json and .md.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, machine, parser, write_results
from support import sparse_models as sm  # the test models: Keras -> pruned -> full-int8 .tflite

from toolchain.contracts.smf import read_smf
from toolchain.deploy.emulators.wasm import run_micropython
from toolchain.export.smf_writer import tflite_to_smf

TIMED = """
import time, ubinascii
from smf import Model
m = Model(open('/model.smf', 'rb').read(), dense=%(dense)s)
buf = memoryview(m.input_buffer())[:m.input_size]
f = open('/inputs.bin', 'rb')
total = 0
for k in range(%(n)d):
    f.readinto(buf)
    t = time.ticks_us()
    out = m.infer()
    total += time.ticks_diff(time.ticks_us(), t)
    print(ubinascii.hexlify(out).decode())
print('us', total)
"""


def run(smf: bytes, x: np.ndarray, dense: bool) -> tuple[np.ndarray, float]:
    files = {**sm.engine_files(), "/model.smf": smf, "/inputs.bin": x.tobytes()}
    lines = run_micropython(TIMED % {"n": len(x), "dense": dense}, heap_bytes=1 << 20, files=files).split()
    outs = np.stack([np.frombuffer(bytes.fromhex(h), np.int8) for h in lines[:-2]])
    return outs, int(lines[-1]) / len(x) / 1000.0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--inputs", type=int, default=50)
    ap.add_argument("--density", type=float, default=0.05)
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = sm.cached_tflite(Path(tmp), "lenet", args.density)
        tflite = path.read_bytes()
        x = sm.quantized_inputs(path, args.inputs)
        ref = sm.tflm_outputs(path, x)
    smf = tflite_to_smf(tflite)
    model = read_smf(smf)
    total = sum(op.weights.size for op in model.ops if op.weights is not None)
    sparse_out, sparse_ms = run(smf, x, dense=False)
    dense_out, dense_ms = run(smf, x, dense=True)
    result = {
        "model": "LeNet-5-like (conv 6x5x5, conv 16x5x5, fc 120, fc 84, fc 10), MNIST 28x28x1, full int8",
        "density_target": args.density,
        "kept_weights": model.kept_weights(),
        "total_weights": total,
        "inputs": args.inputs,
        "runtime": "MicroPython 1.29 WebAssembly (Node.js), device_runtime/micropython",
        "sparse_ms_per_inference": round(sparse_ms, 3),
        "dense_ms_per_inference": round(dense_ms, 3),
        "speedup": round(dense_ms / sparse_ms, 2),
        "bit_exact_vs_tflite_micro": bool((sparse_out == ref).all() and (dense_out == ref).all()),
        "flash_bytes_smf": len(smf),
        "flash_bytes_tflite": len(tflite),
        "flash_ratio": round(len(tflite) / len(smf), 2),
        "encodings": [op.name + ":" + ["dense", "bitmap", "csr", "rle"][op.encoding]
                      for op in model.ops if op.weights is not None],
        "machine": machine("platform", "python", "cpu_count", "processor"),
        "wall_time_s": round(time.time() - t0, 1),
    }
    md = [
        "# Sparse vs dense inference (MicroPython engine, WebAssembly)",
        "",
        f"Model: {result['model']}; {result['kept_weights']} of {result['total_weights']} conv/linear weights kept "
        f"({100 * result['kept_weights'] / result['total_weights']:.1f} %).",
        "",
        "| path | ms / inference | bit-exact with TFLite Micro |",
        "|---|---|---|",
        f"| sparse (kept weights only) | {result['sparse_ms_per_inference']} | {result['bit_exact_vs_tflite_micro']} |",
        f"| dense (same kernels, every weight) | {result['dense_ms_per_inference']} | "
        f"{result['bit_exact_vs_tflite_micro']} |",
        "",
        f"Speed-up: **{result['speedup']}x** over {args.inputs} MNIST test inputs.",
        "",
        f"Flash: `.smf` {result['flash_bytes_smf']} B vs `.tflite` {result['flash_bytes_tflite']} B "
        f"(**{result['flash_ratio']}x** smaller). Encodings: {', '.join(result['encodings'])}.",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs, Python "
        f"{result['machine']['python']}; wall time {result['wall_time_s']} s (model training and conversion included).",
        "",
    ]
    write_results(RESULTS / "sparse_inference", result, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
