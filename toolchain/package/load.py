"""A build's bundle read back: the files a board receives, and the Jetson archive (docs/ondevice.md).

The engine's sources as shipped: :func:`engine_source` (the opcode and encoding tables of ``toolchain.contracts.smf``
written in, :func:`engine_tables`), :func:`engine_modules` (those a model needs), :func:`microbit_engine_files` (the
micro:bit engine under its short names). :func:`load_bundle` reads ``<build>/bundle`` (written by
:mod:`toolchain.package.bundle`) or, for a build without one, assembles the default set: the engine modules the model
needs, ``model.smf`` and ``config.json``. :func:`stored_size` is what a file costs on the board's file system (the budget gate and
``toolchain flash`` count the same way); :func:`jetson_archive` packs a Jetson build for copying.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from toolchain.boards.profiles import BoardProfile
from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.paths import MICROPYTHON_ENGINE
from toolchain.contracts.smf import (
    CONV_2D,
    DECODERS,
    DEPTHWISE_CONV_2D,
    ENCODING_NAMES,
    KERNELS,
    OP_NAMES,
    SmfError,
    read_smf,
)
from toolchain.package.jetson import jetson_code
from toolchain.package.microbit import microbit_source

ENGINE_DIR = MICROPYTHON_ENGINE
# the sparse engine's loaders, which every model needs (smf.load runs them; device_runtime/micropython/README.md)
LOADERS = ("smf_reader", "smf_check", "smf_tables", "smf_bodies", "smf_params", "smf_const_rows", "smf_requant")
_ENGINE_CORE = ("smf", *LOADERS)
CLAMP_LIMITS = "smf_clamp_limits"  # the convolutions' loader part (smf.Model)

# --- the opcode and encoding tables, generated into the engine from toolchain.contracts.smf ------------------------

_TABLE_HEAD = "# -- generated from toolchain/contracts/smf.py {name} by toolchain.package.load.engine_tables: edit it there --"
_TABLE_TAIL = "# -- end of generated {name} --"


def _table(name: str, what: str, items: list[tuple[str, str]]) -> str:
    lines = [_TABLE_HEAD.format(name=name), f"# {what}", f"{name} = ("]
    lines += [f"    {value},  # {comment}" for value, comment in items]
    return "\n".join([*lines, ")", _TABLE_TAIL.format(name=name)])


_TABLES = {"smf_tables": "KERNELS", "smf_bodies": "DECODERS"}  # engine module -> the table it carries


def engine_tables() -> dict[str, str]:
    """The generated block of each engine module that carries a table of ``toolchain.contracts.smf``: the opcode ->
    kernel table in ``smf_tables`` (index = opcode, None: no kernel) and the encoding -> decoder table in
    ``smf_bodies`` (index = encoding). The bundle writes them into the shipped sources (:func:`engine_source`); the
    repository's copies are the same (a test checks), so that the engine also runs from the repository."""
    kernels = [(repr(KERNELS.get(code)), f"{code} {OP_NAMES.get(code, '(none)')}") for code in range(max(OP_NAMES) + 1)]
    decoders = [(repr(DECODERS[e]), f"{e} {ENCODING_NAMES[e]}") for e in range(len(ENCODING_NAMES))]
    return {"smf_tables": _table("KERNELS", "opcode -> (module, function) of its kernel; None: no kernel (RESHAPE: "
                                 "the writer aliases its buffers)", kernels),
            "smf_bodies": _table("DECODERS", "weight encoding -> the module whose load(d, p, rows, cols) decodes it",
                                 decoders)}


def engine_source(name: str) -> str:
    """``device_runtime/micropython/<name>.py`` as shipped: its generated table (:func:`engine_tables`) written in."""
    src = (ENGINE_DIR / f"{name}.py").read_text()
    if name not in _TABLES:
        return src
    head, tail = _TABLE_HEAD.format(name=_TABLES[name]), _TABLE_TAIL.format(name=_TABLES[name])
    start = src.find(head)
    end = src.find(tail, start)
    if start < 0 or end < 0:
        raise ToolchainError(f"{ENGINE_DIR / name}.py lost its generated {_TABLES[name]} block (from '{head}' to "
                             f"'{tail}'); put it back: toolchain.package.load.engine_tables()['{name}']")
    return src[:start] + engine_tables()[name] + src[end + len(tail):]


def engine_modules(smf: bytes) -> list[str]:
    """The engine modules a model needs (core loaders, its weight decoders and kernels)."""

    try:
        model = read_smf(smf)
    except SmfError as exc:
        raise ToolchainError(f"model.smf is invalid ({exc}); rebuild with `toolchain build`") from None
    mods = list(_ENGINE_CORE)
    for op in model.ops:
        if op.encoding is not None:
            mods.append(DECODERS[op.encoding])
        if op.opcode in (CONV_2D, DEPTHWISE_CONV_2D):
            mods.append(CLAMP_LIMITS)
        if op.opcode in KERNELS:
            mods.append(KERNELS[op.opcode][0])
    return list(dict.fromkeys(mods))


# --- the micro:bit engine (docs/sparse-model-format.md) -------------------------------------------------------------

# its runtime, kernels first (the bigger compile on the cleaner heap), and the converter of a first boot (the bundle
# runs it on the host instead) with its weight decoders
MICROBIT_ENGINE = ("microbit_kernels", "microbit_engine")
MICROBIT_CONVERTER = ("microbit_convert", "microbit_check", "microbit_tables", "microbit_channels", "microbit_weights")
MICROBIT_DECODERS = ("microbit_dec_dense", "microbit_dec_bitmap", "microbit_dec_csr", "microbit_dec_rle")

Log = Callable[[str], None]


def microbit_converter_modules(smf: bytes) -> list[str]:
    """The modules the micro:bit's converter (``smf_mbc.convert``) imports for ``smf``: readable names."""
    model = read_smf(smf)
    encodings = sorted({op.encoding for op in model.ops if op.encoding is not None})
    return [*MICROBIT_CONVERTER, *(MICROBIT_DECODERS[e] for e in encodings)]


def microbit_engine_files(smf: bytes, converter: bool = False, runtime: bool = True) -> dict[str, bytes]:
    """The micro:bit engine's files as the micro:bit gets them (short names, minified: microbit_source): the
    runtime (``smf_mbk``, ``smf_mb``) and, with ``converter``, the first-boot converter for ``smf``."""
    mods = [*(microbit_converter_modules(smf) if converter else ()), *(MICROBIT_ENGINE if runtime else ())]
    return dict(microbit_source(m, engine_source) for m in mods)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Bundle:
    """Files to put on the board: name on the board -> bytes. ``.mpy`` alternatives are resolved per board."""

    files: dict[str, bytes]
    source: str  # where the files came from (for messages)
    notes: list[str] = field(default_factory=list)

    def total(self) -> int:
        return sum(len(b) for b in self.files.values())

    def sha256(self) -> dict[str, str]:
        return {n: hashlib.sha256(b).hexdigest() for n, b in self.files.items()}


def _config(manifest: dict) -> bytes:
    keys = ("target", "input", "output", "toolchain_version", "manifest_version")
    return json.dumps({k: manifest[k] for k in keys if k in manifest}, sort_keys=True, separators=(",", ":")).encode()


def load_bundle(build_dir: Path, manifest: dict, profile: BoardProfile, log: Log = _stderr) -> Bundle:
    """The bundle in ``build_dir/bundle`` (toolchain.package.bundle), else the default set from the build."""
    bundle_dir = build_dir / "bundle"
    if bundle_dir.is_dir():
        files = {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*"))
                 if p.is_file() and p.suffix not in (".hex", ".md")}
        if not files:
            raise ToolchainError(f"{bundle_dir} is empty; rebuild the bundle with `toolchain build`")
        return Bundle(files, str(bundle_dir))
    smf_path = build_dir / "model.smf"
    if not smf_path.is_file():
        raise ToolchainError(f"{build_dir} has no model.smf (nor bundle/); rebuild with `toolchain build --target "
                             f"{profile.name}` (MicroPython targets export model.smf)")
    smf = smf_path.read_bytes()
    files: dict[str, bytes] = {}
    for mod in engine_modules(smf):
        if profile.name == "microbit":  # minified, under its short name (device_runtime/micropython/README.md)
            files.update([microbit_source(mod, engine_source)])
        else:
            files[f"{mod}.py"] = engine_source(mod).encode()
    files["model.smf"] = smf
    files["config.json"] = _config(manifest)
    return Bundle(files, f"{build_dir} (default set: {build_dir}/bundle not found)",
                  notes=[f"{bundle_dir} not found: flashing the engine modules the model needs, model.smf, config.json"])


# --- .mpy compatibility ------------------------------------------------------------------------------

def mpy_header(data: bytes) -> tuple[int, int, int] | None:
    """(version, sub-version, arch) of a ``.mpy`` file, or None if it is not one."""
    if len(data) < 4 or data[0] != ord("M"):
        return None
    return data[1], data[2] & 3, data[2] >> 2


def mpy_compatible(data: bytes, board_mpy: int) -> bool:
    """Whether a board with ``sys.implementation._mpy == board_mpy`` imports this ``.mpy``.

    MicroPython's loader (py/persistentcode.c) requires the same bytecode version, and the same sub-version
    when the file names an architecture; the architecture itself only matters for native code, which the
    toolchain's bundles do not contain (plain ``mpy-cross -march=...`` of bytecode modules).
    """
    head = mpy_header(data)
    if head is None or not board_mpy:
        return False
    version, sub, arch = head
    if version != board_mpy & 0xFF:
        return False
    return arch == 0 or sub == (board_mpy >> 8) & 3


MICROBIT_CHUNK = 126  # data bytes per 128-byte chunk of the micro:bit file system; a file's first chunk holds its name


def stored_size(name: str, data: bytes, profile: BoardProfile) -> int:
    """Bytes a file takes on the board: on the micro:bit whole chunks (2 + len(name) header bytes first)."""
    if profile.name != "microbit":
        return len(data)
    return -(-(len(data) + 2 + len(name)) // MICROBIT_CHUNK) * MICROBIT_CHUNK


# --- Jetson ------------------------------------------------------------------------------------------

_INSTALL_SH = """#!/bin/sh
# Install the TinyML bundle on a Jetson (JetPack 6: Python 3.10, onnxruntime-gpu from NVIDIA's Jetson wheels).
set -eu
DEST="${1:-/opt/tinyml/%(target)s}"
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"
sha256sum -c SHA256SUMS
mkdir -p "$DEST"
cp -r . "$DEST"/
python3 -m venv "$DEST/.venv"
"$DEST/.venv/bin/pip" install --upgrade pip >/dev/null
sed 's/^onnxruntime$/onnxruntime-gpu/' requirements.txt > "$DEST/requirements-gpu.txt"
"$DEST/.venv/bin/pip" install -r "$DEST/requirements-gpu.txt" || "$DEST/.venv/bin/pip" install -r requirements.txt
cd "$DEST" && PYTHONPATH="$DEST" "$DEST/.venv/bin/python" -c 'import agent, runtime; print("jetson bundle ok")'
echo "installed in $DEST; run: PYTHON=$DEST/.venv/bin/python $DEST/run_agent.sh --help"
"""


def jetson_archive(build_dir: Path, manifest: dict, profile: BoardProfile, out: Path | None, log: Log) -> Path:
    """``<target>-bundle.tar.gz``: the build's on-device bundle (model, config, the agent with the toolchain.fleet
    part it imports: toolchain.package.jetson) + manifest.json, install.sh and SHA256SUMS."""

    bundle = build_dir / "bundle"
    if (bundle / "config.json").is_file():  # written by `toolchain build` (toolchain.package.bundle)
        files = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}
    else:
        files = {n: (build_dir / n).read_bytes() for n in ("model.onnx", "model_int8.onnx") if (build_dir / n).is_file()}
        files["config.json"] = _config(manifest)
        files.update(jetson_code())
    if "model.onnx" not in files:
        raise ToolchainError(f"{build_dir} has no model.onnx; rebuild with `toolchain build --target {profile.name}`")
    if (build_dir / "manifest.json").is_file():
        files["manifest.json"] = (build_dir / "manifest.json").read_bytes()
    files["install.sh"] = (_INSTALL_SH % {"target": profile.name}).encode()
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files.items()).encode()
    out = out or build_dir / f"{profile.name}-bundle.tar.gz"
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"tinyml-{profile.name}/{name}")
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size} B, {len(files)} files)")
    return out
