"""A small but real build folder for the conformance suite in CI (no full `toolchain build` needed).

``make_build(tflite, target, out)`` writes what ``toolchain build`` writes for the flashing/HIL stages:
``manifest.json`` (the keys they read: target, input/output quantization, artifacts), ``model.tflite`` and
``model.smf`` (converted by the real exporter, ``toolchain.export.smf_writer.tflite_to_smf``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from toolchain import __version__
from toolchain.boards.profiles import get_profile
from toolchain.export.smf_writer import tflite_to_smf


def _io(detail: dict) -> dict:
    scale, zp = detail["quantization"]
    return {"shape": [int(v) for v in detail["shape"]], "layout": "NHWC", "dtype": "int8",
            "quantization": {"scale": float(scale), "zero_point": int(zp)}}


def make_build(tflite: bytes, target: str, out: Path) -> Path:
    from ai_edge_litert.interpreter import Interpreter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.tflite").write_bytes(tflite)
    smf = tflite_to_smf(tflite)
    (out / "model.smf").write_bytes(smf)
    interp = Interpreter(model_content=tflite)
    profile = get_profile(target)
    manifest = {
        "manifest_version": 1, "toolchain_version": __version__, "target": target,
        "input": _io(interp.get_input_details()[0]), "output": _io(interp.get_output_details()[0]),
        "artifacts": {n: {"path": n, "sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
                      for n, b in (("model.tflite", tflite), ("model.smf", smf))},
        "board": profile.as_dict(),
        "notes": ["test build written by toolchain.package.testbuild (not by `toolchain build`)"],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
