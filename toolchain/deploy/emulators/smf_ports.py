"""Run the .smf engine (device_runtime/micropython/smf*.py) on the MicroPython 1.28 builds, as a board would.

The modules are compiled by the mpy-cross of the same source, ``-march=`` of the port (x64 for the unix port,
armv7m for the Cortex-M3 board, armv6m for the Cortex-M0 one), as a bundle ships them (readable names, the
generated tables written in: ``toolchain.package.load.engine_source``): ``smf_viper`` becomes native code, the rest
bytecode. Inputs are streamed over stdin in compressed blocks (``qemu_cortexm.pack``) and outputs printed as
hex, so a thousand inputs never sit in a small heap. Per inference the device measures ``time.ticks_us()`` (instructions on QEMU).
"""

from __future__ import annotations

import numpy as np

from toolchain.contracts.paths import MICROPYTHON_ENGINE
from toolchain.deploy.emulators import qemu_cortexm, unix_port
from toolchain.package.load import engine_source

ENGINE_DIR = MICROPYTHON_ENGINE
PORTS = ("unix", "an385", "microbit")

_SCRIPT = """
import gc, sys, time, binascii
blk = bytearray(%(block)d * %(size)d)  # (before the model: a block this large may not be free afterwards)
gc.collect()
f0 = gc.mem_free()
from smf import Model
m = Model('model.smf', native=%(native)s, layout=%(layout)r)
gc.collect()
f1 = gc.mem_free()
print('engine', 'viper' if m.v else 'bytecode', f0 - f1)
tot = 0
for k in range(0, %(n)d, %(block)d):
    unpack(blk)
    for j in range(min(%(block)d, %(n)d - k)):
        d = memoryview(blk)[j * m.input_size:(j + 1) * m.input_size]
        t = time.ticks_us()
        o = m.infer(d)
        tot += time.ticks_diff(time.ticks_us(), t)
        print(binascii.hexlify(o).decode())
print('us', tot)
"""
BLOCK = 4


def available(port: str) -> bool:
    if not unix_port.mpy_cross_available():
        return False
    return unix_port.available() if port == "unix" else qemu_cortexm.available(port)


def missing_reason(port: str) -> str:
    return unix_port.MISSING if port == "unix" else qemu_cortexm.MISSING


def march(port: str) -> str:
    return "x64" if port == "unix" else qemu_cortexm.march(port)


# Modules only one engine imports: QEMU's files sit in its 140 KB heap (a board keeps them in flash), so a
# run ships what its engine can import. (smf_conv stays: the native path's fallback for unusual geometry.)
BYTECODE_ONLY = ("smf_fc", "smf_maxpool", "smf_avgpool", "smf_mean", "smf_elementwise", "smf_dense_baseline")
NATIVE_ONLY = ("smf_viper", "smf_viper_prep")


def engine_files(port: str, native: bool | None = None) -> dict[str, bytes]:
    """The engine (smf*.py; the micro:bit's own microbit_*.py stay out) as ``.mpy`` for ``port``; with ``native``
    True or False, also without the other engine's own modules."""
    skip = BYTECODE_ONLY if native else NATIVE_ONLY if native is False else ()
    return {p.stem + ".mpy": unix_port.mpy_cross(engine_source(p.stem).encode(), p.name, march(port))
            for p in sorted(ENGINE_DIR.glob("smf*.py")) if p.stem not in skip}


_HEAP_SCRIPT = """
import gc
gc.collect()
f0 = gc.mem_free()
from smf import Model
m = Model('model.smf', native=%s)
gc.collect()
f1 = gc.mem_free()
m = None
gc.collect()
print('heap', f0 - f1, gc.mem_free() - f1)
"""


def model_heap(smf: bytes, port: str, native: bool) -> dict[str, int]:
    """Heap a loaded model holds on ``port`` (gc.mem_free around ``Model(...)``): ``total``, ``data`` (what
    dropping the model gives back) and ``code`` (the engine modules that stay imported)."""
    files = {**engine_files(port, native), "model.smf": smf}
    code = _HEAP_SCRIPT % native
    if port == "unix":
        out = unix_port.run_micropython(code, files=files, heap_bytes=512 * 1024)
    else:
        out = qemu_cortexm.run_micropython(code, files=files, board=port, timeout=600)
    line = next((ln for ln in out.splitlines() if ln.startswith("heap")), None)
    if line is None:
        raise AssertionError(f"unexpected MicroPython output: {out[-500:]!r}")
    total, data = map(int, line.split()[1:3])
    return {"total": total, "data": data, "code": total - data}


def run_engine(smf: bytes, inputs: np.ndarray, port: str, *, native: bool | None = None, layout: str = "auto",
               heap_bytes: int = 512 * 1024, timeout: float = 1800.0,
               engine: dict[str, bytes] | None = None) -> tuple[np.ndarray, dict[str, object]]:
    """Outputs of the engine on ``port`` for ``inputs`` ([n, ...] int8) and figures: ``engine`` (viper or
    bytecode), ``model_heap`` (bytes the loaded model holds), ``us_per_inference`` and, on QEMU,
    ``instructions_per_inference``. ``heap_bytes`` applies to the unix port (QEMU's heap is the firmware's).
    ``engine``: the engine's files (name -> bytes) to use instead of :func:`engine_files` (e.g. a bundle's)."""
    n = len(inputs)
    flat = np.ascontiguousarray(inputs, np.int8).reshape(n, -1)
    code = qemu_cortexm.UNPACK + _SCRIPT % {"native": native, "layout": layout, "n": n, "block": BLOCK,
                                            "size": flat.shape[1]}
    files = {**(engine if engine is not None else engine_files(port, native)), "model.smf": smf}
    stdin = b"".join(qemu_cortexm.pack(flat[k:k + BLOCK].tobytes()) for k in range(0, n, BLOCK))
    if port == "unix":
        out = unix_port.run_micropython(code, files=files, stdin=stdin, heap_bytes=heap_bytes, timeout=timeout)
    else:
        out = qemu_cortexm.run_micropython(code, files=files, stdin=stdin, board=port, timeout=timeout)
    lines = out.split("\n")
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) != n + 2 or not lines[0].startswith("engine") or not lines[-1].startswith("us"):
        raise AssertionError(f"unexpected MicroPython output: {out[-500:]!r}")
    outputs = np.stack([np.frombuffer(bytes.fromhex(ln), np.int8) for ln in lines[1:-1]])
    _, engine, heap = lines[0].split()
    us = int(lines[-1].split()[1]) / n
    info: dict[str, object] = {"engine": engine, "model_heap": int(heap), "us_per_inference": us}
    if port != "unix":
        info["instructions_per_inference"] = qemu_cortexm.instructions(us, port)
    return outputs, info
