"""A build's bundle read back: the files a board receives, and the Jetson archive (docs/ondevice.md).

:func:`load_bundle` reads ``<build>/bundle`` (written by :mod:`toolchain.package.bundle`) or, for a build without
one, assembles the default set: the engine modules the model needs (:func:`engine_modules`), ``model.smf`` and
``config.json``. :func:`stored_size` is what a file costs on the board's file system (the budget gate and
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
from toolchain.contracts.smf import SmfError, read_smf
from toolchain.package.jetson import jetson_code
from toolchain.package.microbit import minify_source

ENGINE_DIR = MICROPYTHON_ENGINE
# modules of the sparse engine every model needs (docs/sparse-model-format.md, "Modules")
_ENGINE_CORE = ("smf", "smf_u", "smf_chk", "smf_ld", "smf_wl", "smf_w", "smf_k", "smf_q")
_KERNELS = {1: "smf_conv", 2: "smf_conv", 3: "smf_fc", 4: "smf_maxpool", 5: "smf_avgpool", 6: "smf_mean",
            7: "smf_ew", 8: "smf_ew", 10: "smf_ew"}

Log = Callable[[str], None]


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


def engine_modules(smf: bytes) -> list[str]:
    """The engine modules a model needs (core loaders, its weight decoders and kernels)."""

    try:
        model = read_smf(smf)
    except SmfError as exc:
        raise ToolchainError(f"model.smf is invalid ({exc}); rebuild with `toolchain build`") from None
    mods = list(_ENGINE_CORE)
    for op in model.ops:
        if op.encoding is not None:
            mods.append(f"smf_e{op.encoding}")
        if op.opcode in (1, 2):
            mods.append("smf_thr")
        if op.opcode in _KERNELS:
            mods.append(_KERNELS[op.opcode])
    return list(dict.fromkeys(mods))


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
    minify = profile.name == "microbit"
    for mod in engine_modules(smf):
        src = (ENGINE_DIR / f"{mod}.py").read_text()
        if minify:

            src = minify_source(src)
        files[f"{mod}.py"] = src.encode()
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
