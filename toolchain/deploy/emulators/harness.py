"""Run the device fine-tuner (``ft.py`` + ``zo.py`` + the sparse engine) on MicroPython 1.29 WebAssembly or CPython.

Both run the same script: load the model and ``FineTuner``, then ``rounds`` rounds of ``probe`` on the local
batch of that round followed by ``update`` with the device's own scalars (a single-client federation: the
server's n-weighted mean of one reply is the reply itself, bit for bit). Every round prints its scalars (float32
bytes, hex), loss, n and the weights' float32 bytes, so the host can replay it with :mod:`.reference`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.deploy.emulators.wasm import run_micropython
from toolchain.verify.reference import ENGINE_DIR, Head

DEVICE_SCRIPT = """
import gc
try:
    import ubinascii as binascii
except ImportError:
    import binascii
import json
gc.collect()
h0 = gc.mem_alloc()
import ft
spec = json.loads(open(ROOT + 'config.json').read())
spec['head']['file'] = ROOT + 'head.bin'
m = None
if USE_MODEL:
    from smf import Model
    m = Model(open(ROOT + 'model.smf', 'rb').read())
gc.collect()
h1 = gc.mem_alloc()
t = ft.FineTuner(m, spec)
gc.collect()
h2 = gc.mem_alloc()
f = open(ROOT + 'data.bin', 'rb')
xs = []
for i in range(N):
    xs.append(f.read(SIZE))
f.close()
ys = LABELS
gc.collect()
a0 = gc.mem_alloc()
peak = 0
for r in range(len(SEEDS)):
    b = BATCHES[r]
    bx = [xs[i] for i in b]
    by = [ys[i] for i in b]
    gc.collect()
    a1 = gc.mem_alloc()
    g, loss, n = t.probe(SEEDS[r], K, MU, bx, by)
    t.update(SEEDS[r], g, LR)
    a2 = gc.mem_alloc()
    if a2 - a0 > peak:
        peak = a2 - a0
    from array import array
    print('round', binascii.hexlify(array('f', g)).decode(), repr(loss), n)
    print('w', binascii.hexlify(t.w).decode())
print('acc', repr(t.accuracy([xs[i] for i in EVAL], [ys[i] for i in EVAL])))
gc.collect()
print('heap', h1 - h0, h2 - h1, a0 - h2, peak, gc.mem_alloc() - h0)
"""


@dataclass
class DeviceRun:
    scalars: list[np.ndarray]  # per round, float32 [K]
    losses: list[float]
    counts: list[int]
    weights: list[np.ndarray]  # after each round's update, float32
    accuracy: float  # on the EVAL samples after the last round
    # gc.mem_alloc (after a collection) of: the loaded model with the ft/zo code ("model": engine + ft + zo code and
    # the model), the tuner's buffers, the local data; "round_alloc": the most any round allocated (garbage included:
    # boxed floats on WebAssembly), "live_end": everything live at the end. Not meaningful on WebAssembly: that port
    # grows its heap on demand (heap_bytes is only the initial size) and its mem_alloc keeps counting garbage.
    heap: dict[str, int]


def rounds_script(n: int, size: int, labels: list[int], seeds: list[int], batches: list[list[int]], k: int, mu: float,
            lr: float, evals: list[int], use_model: bool, root: str) -> str:
    consts = {"ROOT": root, "USE_MODEL": use_model, "N": n, "SIZE": size, "LABELS": labels, "SEEDS": seeds,
              "BATCHES": batches, "K": k, "MU": mu, "LR": lr, "EVAL": evals}
    return "".join(f"{a} = {v!r}\n" for a, v in consts.items()) + DEVICE_SCRIPT


def parse_run(out: str) -> DeviceRun:
    run = DeviceRun([], [], [], [], float("nan"), {})
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "round":
            run.scalars.append(np.frombuffer(bytes.fromhex(parts[1]), "<f4").copy())
            run.losses.append(float(parts[2]))
            run.counts.append(int(parts[3]))
        elif parts[0] == "w":
            run.weights.append(np.frombuffer(bytes.fromhex(parts[1]), "<f4").copy())
        elif parts[0] == "acc":
            run.accuracy = float(parts[1])
        elif parts[0] == "heap":
            run.heap = dict(zip(("model", "tuner", "data", "round_alloc", "live_end"), map(int, parts[1:6]),
                                strict=True))
    return run


def device_files(head: Head, spec: dict[str, Any], data: np.ndarray, smf: bytes | None) -> dict[str, bytes]:
    cfg = {**spec, "head": head.spec()}
    files = {"config.json": json.dumps(cfg).encode(), "head.bin": head.to_bytes(),
             "data.bin": np.ascontiguousarray(data, np.int8).tobytes()}
    if smf is not None:
        files["model.smf"] = smf
    return files


def run_rounds(head: Head, spec: dict[str, Any], data: np.ndarray, labels: list[int], seeds: list[int],
               batches: list[list[int]], k: int, mu: float, lr: float, evals: list[int], smf: bytes | None = None,
               port: str = "wasm", heap_bytes: int = 160 * 1024, timeout: float = 900.0) -> DeviceRun:
    """Run the rounds on ``port`` ("wasm": MicroPython 1.29 WebAssembly, ``heap_bytes`` its initial heap; or "cpython").

    ``data``: int8 [n, ...] model inputs if ``smf`` is given (the engine computes the head's inputs on the device),
    else the head's int8 inputs [n, cols] (``FineTuner(None, spec)``).
    """
    data = np.ascontiguousarray(data, np.int8).reshape(len(data), -1)
    files = device_files(head, spec, data, smf)
    if port == "wasm":

        lib = {f"/lib/{p.name}": p.read_bytes() for p in sorted(ENGINE_DIR.glob("*.py"))
               if p.name.startswith("smf") or p.name in ("zo.py", "ft.py")}
        code = rounds_script(len(data), data.shape[1], labels, seeds, batches, k, mu, lr, evals, smf is not None, "/")
        out = run_micropython(code, heap_bytes=heap_bytes, files={**lib, **{"/" + n: b for n, b in files.items()}},
                              timeout=timeout)
        return parse_run(out)
    if port != "cpython":
        raise ValueError(f"unknown port {port!r}; use 'wasm' or 'cpython'")
    with tempfile.TemporaryDirectory() as tmp:
        for name, b in files.items():
            (Path(tmp) / name).write_bytes(b)
        code = ("import gc\ngc.mem_alloc = lambda: 0\n"
                + rounds_script(len(data), data.shape[1], labels, seeds, batches, k, mu, lr, evals, smf is not None,
                          tmp + "/"))
        env = dict(os.environ, PYTHONPATH=str(ENGINE_DIR))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"device code failed under CPython: {proc.stderr[-2000:]}")
        return parse_run(proc.stdout)
