"""Output folders of ``build`` and ``train``: checked before any work, replaced only when it is ours.

A run assembles its outputs in a staging folder next to ``--out`` and swaps it in at the end. Before the
first second of training, :func:`check_out` decides whether that swap would be allowed:

* ``--out`` does not exist, or is an empty folder: fine.
* ``--out`` is an earlier output of the same command: fine, it is replaced. An earlier build is recognised
  by its ``manifest.json`` (a JSON object with ``manifest_version``, ``toolchain_version`` and ``artifacts``),
  an earlier training run by ``summary.json`` (with ``algorithm`` and ``config``) next to ``metrics.jsonl``;
  and every file in the folder must be one such a run writes. A stray ``notes.txt`` inside an old build
  therefore still refuses: replacing the folder would delete a file we did not make.
* anything else needs ``--force``.

The parent must be a folder we can create entries in; this is probed by creating (and removing) a
temporary folder in the nearest existing ancestor, which is the only test that holds for root, read-only
mounts and pseudo file systems (``/proc``) alike. Nothing is left behind when a check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolchain.contracts.errors import ToolchainError

# Files `toolchain build` writes besides those its manifest lists in `artifacts`.
BUILD_EXTRA = ("manifest.json", "report.md")
BUILD_EXTRA_DIRS = ("plots",)  # report figures (PNG), re-rendered by `toolchain report`
BUILD_EXTRA_SUFFIXES = ("-bundle.tar.gz",)  # `toolchain flash --target jetson` writes <target>-bundle.tar.gz here
TRAIN_FILES = ("summary.json", "metrics.jsonl", "model.pt")
TRAIN_SUFFIXES = (".png",)  # plots of a training run


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def build_owned(folder: Path) -> tuple[bool, list[str]]:
    """(folder is an earlier `toolchain build` output, files in it that build did not write)."""
    m = _load_json(folder / "manifest.json")
    if not (isinstance(m, dict) and isinstance(m.get("manifest_version"), int) and "toolchain_version" in m
            and isinstance(m.get("artifacts"), dict)):
        return False, []
    ours = set(BUILD_EXTRA) | {str(a.get("path")) for a in m["artifacts"].values() if isinstance(a, dict)}
    strays = [f for f in _files(folder) if f not in ours and f.split("/")[0] not in BUILD_EXTRA_DIRS
              and not ("/" not in f and f.endswith(BUILD_EXTRA_SUFFIXES))]
    return True, strays


def train_owned(folder: Path) -> tuple[bool, list[str]]:
    """(folder is an earlier `toolchain train` output, files in it that train did not write)."""
    s = _load_json(folder / "summary.json")
    if not (isinstance(s, dict) and "algorithm" in s and "config" in s and (folder / "metrics.jsonl").is_file()):
        return False, []
    strays = [f for f in _files(folder) if f not in TRAIN_FILES and not ("/" not in f and f.endswith(TRAIN_SUFFIXES))]
    return True, strays


def _probe_writable(folder: Path) -> None:
    """Raise unless entries can be created under ``folder`` (created if missing, like the run would)."""
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ToolchainError(f"cannot write {folder}: {anc} is a file, not a folder; pass --out somewhere else")
    try:
        probe = tempfile.mkdtemp(prefix=".toolchain-probe.", dir=anc)
    except OSError as exc:
        raise ToolchainError(f"cannot write under {anc} ({exc.strerror or exc}); pass a writable --out") from None
    os.rmdir(probe)


def _dangerous(out: Path, protect: list[Path]) -> str | None:
    """Why ``--force`` must not delete ``out`` (the root, home, the working folder or one above it, the data)."""
    res = out.resolve()
    cwd = Path.cwd().resolve()
    if res == Path(res.anchor) or res == Path.home().resolve():
        return f"{out} is the file-system root or your home folder"
    if res == cwd or res in cwd.parents:
        return f"{out} holds the current folder"
    for p in protect:
        pr = p.resolve()
        if pr == res or res in pr.parents:
            return f"{out} holds the input {p}"
    return None


def check_out(out: Path, command: str, force: bool = False, protect: list[Path] | None = None) -> None:
    """One-line refusal (exit 2) unless ``command`` ("build" or "train") may write ``out``; writes nothing."""
    flag = "--out"
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ToolchainError(f"{flag} {out} is a file, not a folder; remove it or pass another {flag}")
        why = _dangerous(out, protect or [])
        if why:
            raise ToolchainError(f"refusing to replace {out}: {why}; pass another {flag}")
        entries = list(out.iterdir())
        if entries and not force:
            owned, strays = (build_owned if command == "build" else train_owned)(out)
            if not owned:
                raise ToolchainError(f"{flag} {out} is not empty and is not an earlier `toolchain {command}` output; "
                                     f"pass an empty or new folder, or --force to replace it")
            if strays:
                more = f" and {len(strays) - 1} more" if len(strays) > 1 else ""
                raise ToolchainError(f"{flag} {out} is an earlier {command} output but also holds {strays[0]}{more}, "
                                     f"which {command} did not write; move it away, or pass --force to replace "
                                     "the folder")
    _probe_writable(out.parent)


def staging_dir(out: Path) -> Path:
    """A fresh folder next to ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def replace_dir(staging: Path, out: Path) -> None:
    """Put ``staging`` at ``out``. An existing ``out`` is first renamed aside, so that ``out`` is at every
    moment either the whole old folder or the whole new one, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.rmdir(old)
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """The one way a command writes its output folder: files go into the yielded staging folder, which
    replaces ``out`` only when the block finishes; on any error (Ctrl-C included) it is deleted and ``out``
    is untouched."""
    staging = staging_dir(out)
    try:
        yield staging
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
