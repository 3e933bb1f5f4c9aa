"""Per-board latency estimate of the ``.smf`` device engine, from the Cortex-M3 instruction counts of
``bench/engine_speed.py`` (``bench/results/engine_speed.json``).

instructions = fixed + sum over prunable layers of (a_kind * kept MACs + b_kind * outputs), per engine:

- ``viper auto`` (native kernels, the default layout) on boards whose bundle is compiled with ``mpy-cross
  -march`` (the profile's ``mpy_march``: esp32, esp32s3, rp2040); ``bytecode`` where it is empty (micro:bit);
- ``a``, ``b``: least squares per layer kind (conv, dense) over the measured layers of the four measured models;
  ``fixed``: the mean of what the measured inferences spent outside the prunable layers (pooling, flatten, the
  input copy: LeNet's operators, so a model without pooling is over-estimated by that part).

ms = instructions / the profile's ``clock_hz``. This is an estimate, not a measurement: the counts are a
Cortex-M3's (MicroPython 1.28 under QEMU ``-icount``), and an Xtensa LX6/LX7 or a Cortex-M0+ needs a different
number of instructions and cycles per instruction for the same code. TFLite Micro boards and the Jetson run
other engines, which were not measured: their latency stays "not measured".

The figures live in ``latency_constants.json`` next to this file, written by
``python -m toolchain.boards.latency bench/results/engine_speed.json`` (never typed by hand).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.boards.profiles import BoardProfile

CONSTANTS = Path(__file__).with_name("latency_constants.json")
METHOD = "estimate (Cortex-M3 instruction counts x clock; Xtensa/M0+ CPI differ)"
NOT_MEASURED = "not measured"
NATIVE, BYTECODE = "viper auto", "bytecode"
# engine_speed.json operator names -> layer_table's "type"
KINDS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "conv", "FULLY_CONNECTED": "dense"}


def fit(speed: dict[str, Any], source: str) -> dict[str, Any]:
    """The constants from an engine_speed.json: per engine, ``fixed`` and per kind ``per_kept_mac``,
    ``per_output`` (features as :func:`toolchain.pipelines.report.layer_table` counts them: kept weights x output
    pixels, out channels x output pixels, so that the estimate sees the same numbers it was fitted on)."""
    engines: dict[str, Any] = {}
    for engine in (NATIVE, BYTECODE):
        rows: dict[str, tuple[list[list[float]], list[float]]] = {}
        fixed = []
        for model in speed["models"]:
            run = model["engines"][engine]
            weighted = run["weighted_layers"]
            if len(weighted) != len(model["layers"]):
                raise ValueError(f"{source}: {model['model']} / {engine} has {len(weighted)} timed layers for "
                                 f"{len(model['layers'])} layers")
            for layer, timed in zip(model["layers"], weighted, strict=True):
                pixels = layer["outputs"] / layer["shape"][0]
                x, y = rows.setdefault(KINDS[layer["name"]], ([], []))
                x.append([layer["kept_weights"] * pixels, layer["outputs"]])
                y.append(timed["instructions"])
            fixed.append(run["instructions_per_inference"] - sum(t["instructions"] for t in weighted))
        kinds = {}
        for kind, (x, y) in rows.items():
            xa, ya = np.asarray(x, float), np.asarray(y, float)
            coef = np.linalg.lstsq(xa, ya, rcond=None)[0]
            if (coef < 0).any():  # a negative cost would make more work look faster
                raise ValueError(f"{source}: fit for {engine} {kind} has a negative coefficient {coef.tolist()}")
            kinds[kind] = {"per_kept_mac": round(float(coef[0]), 2), "per_output": round(float(coef[1]), 2),
                           "layers": len(y),
                           "max_rel_error": round(float(np.max(np.abs(xa @ coef / ya - 1))), 2)}
        engines[engine] = {"fixed": round(float(np.mean(fixed))), "kinds": kinds}
    return {"source": source, "runtime": speed["runtime"], "models": [m["model"] for m in speed["models"]],
            "method": METHOD, "engines": engines}


def load_constants(path: Path = CONSTANTS) -> dict[str, Any]:
    return json.loads(path.read_text())


def engine_for(profile: BoardProfile) -> str | None:
    """The ``.smf`` kernels the board runs, or None when it does not run the ``.smf`` engine."""
    if profile.runtime != "micropython":
        return None
    # write_bundle compiles smf_viper for mpy_march; without one the port gets .py and no native code
    return NATIVE if profile.mpy_march else BYTECODE


def layer_instructions(layers: list[dict[str, Any]], engine: str,
                       constants: dict[str, Any] | None = None) -> list[float]:
    """Estimated instructions per prunable layer (rows of :func:`toolchain.pipelines.report.layer_table`)."""
    kinds = (constants or load_constants())["engines"][engine]["kinds"]
    out = []
    for ly in layers:
        k = kinds[ly["type"]]
        outputs = ly["macs_dense"] * ly["shape"][0] / ly["weights"]  # out channels x output pixels
        out.append(k["per_kept_mac"] * ly["macs_sparse"] + k["per_output"] * outputs)
    return out


def estimate(profile: BoardProfile, layers: list[dict[str, Any]],
             constants: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"latency_ms", "instructions", "engine", "clock_hz", "method", "layer_instructions"}``;
    ``latency_ms`` is the string "not measured" (and ``method`` says why) when no estimate applies."""
    engine = engine_for(profile)
    if engine is None:
        return {"latency_ms": NOT_MEASURED, "method": f"{profile.runtime} engine not measured"}
    if not layers:
        return {"latency_ms": NOT_MEASURED, "method": "no per-layer table"}
    c = constants or load_constants()
    per_layer = layer_instructions(layers, engine, c)
    instructions = c["engines"][engine]["fixed"] + sum(per_layer)
    if not profile.clock_hz:
        return {"latency_ms": NOT_MEASURED, "engine": engine, "instructions": round(instructions),
                "method": "no clock_hz in the board profile", "layer_instructions": [round(x) for x in per_layer]}
    return {"latency_ms": round(1000 * instructions / profile.clock_hz, 2), "engine": engine,
            "instructions": round(instructions), "clock_hz": profile.clock_hz, "method": METHOD,
            "layer_instructions": [round(x) for x in per_layer]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m toolchain.boards.latency bench/results/engine_speed.json", file=sys.stderr)
        return 2
    src = Path(argv[0])
    CONSTANTS.write_text(json.dumps(fit(json.loads(src.read_text()), src.as_posix()), indent=2) + "\n")
    print(f"wrote {CONSTANTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
