"""What the bench scripts share: where results go, the machine a result was measured on, the argument parser,
writing ``<stem>.json`` + ``<stem>.md`` and a headless pyplot.

The scripts run as ``.venv/bin/python bench/<name>.py`` (Python puts bench/ on the path, hence ``from common
import ...``); ``toolchain`` is installed (editable). Some benchmarks reuse the test suite's fixtures (the
mosquitto broker, the sparse test models, the emulated fleet boards) from ``tests/support``, which is not an
installed package: importing this module makes it importable as ``support`` (the one path entry the bench adds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _torch_version() -> str:
    import torch

    return torch.__version__


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


FACTS: dict[str, Callable[[], Any]] = {
    "host": platform.node,
    "platform": platform.platform,
    "python": platform.python_version,
    "cpu": _cpu_model,
    "cpus": os.cpu_count,
    "cpu_count": os.cpu_count,  # the same figure under the key older result files use
    "processor": lambda: platform.processor() or platform.machine(),
    "arch": platform.machine,
    "torch": _torch_version,
    "torch_threads": _torch_threads,
    "load_avg_at_start": os.getloadavg,
}


def machine(*facts: str, **extra: Any) -> dict[str, Any]:
    """The machine a result was measured on: the ``facts`` named (keys of ``FACTS``), in that order, then
    ``extra`` as given. Each benchmark names the keys its result files have always had."""
    return {**{k: FACTS[k]() for k in facts}, **extra}


def parser(doc: str | None, *, out: Path | None = None, out_help: str = "results folder") -> argparse.ArgumentParser:
    """An argument parser described by the first line of the script's docstring; with ``out``, an ``--out``
    option defaulting to it."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    if out is not None:
        ap.add_argument("--out", default=str(out), help=f"{out_help} (default: %(default)s)")
    return ap


def write_results(stem: Path, result: Any, markdown: str | None = None, *, indent: int = 2) -> None:
    """``<stem>.json`` (``indent``, newline at the end) and, when given, ``<stem>.md`` (written as is)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=indent) + "\n")
    if markdown is not None:
        stem.with_name(stem.name + ".md").write_text(markdown)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
