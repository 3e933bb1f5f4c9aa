"""Run code on MicroPython 1.29 compiled to WebAssembly, with a bounded heap.

The npm package ``@micropython/micropython-webassembly-pyscript`` is installed into the
repository's ``node_modules`` by the test setup (``scripts/setup_system.sh``). The heap size is
the board's budget: allocations beyond it raise ``MemoryError`` inside MicroPython, as on a board.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

from toolchain.contracts.paths import NODE_MODULES

RUNNER = Path(__file__).with_name("wasm_runner.mjs")
PACKAGE = "@micropython/micropython-webassembly-pyscript"


class MicroPythonError(RuntimeError):
    """The MicroPython program raised; the message holds its traceback."""


def node_modules_dir() -> Path | None:
    """The ``node_modules`` holding the MicroPython package, or ``None`` if it is not installed."""
    candidates = [Path(os.environ["TOOLCHAIN_NODE_MODULES"])] if "TOOLCHAIN_NODE_MODULES" in os.environ else []
    candidates.append(NODE_MODULES)
    for cand in candidates:
        if (cand / PACKAGE / "micropython.mjs").is_file():
            return cand
    return None


def available() -> bool:
    return shutil.which("node") is not None and node_modules_dir() is not None


def run_micropython(
    code: str,
    *,
    heap_bytes: int = 256 * 1024,
    files: dict[str, bytes] | None = None,
    timeout: float = 600.0,
) -> str:
    """Run ``code`` in a fresh MicroPython instance and return what it printed.

    ``files`` maps absolute paths in MicroPython's file system to their contents (modules to
    import, model files). Raises :class:`MicroPythonError` if the program raised.
    """
    nm = node_modules_dir()
    if nm is None or shutil.which("node") is None:
        raise RuntimeError(f"MicroPython WebAssembly is not installed: run `npm ci` in the repository root ({PACKAGE})")
    job = {
        "heap_bytes": int(heap_bytes),
        "files": {p: base64.b64encode(b).decode() for p, b in (files or {}).items()},
        "code": code,
    }
    env = dict(os.environ, NODE_PATH=str(nm))
    # The runner imports the package by name, so it must resolve from a folder next to node_modules.
    proc = subprocess.run(
        ["node", str(RUNNER)],
        input=json.dumps(job).encode(),
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=nm.parent,
    )
    if proc.returncode != 0:
        raise MicroPythonError(proc.stderr.decode(errors="replace").strip() or f"node exited {proc.returncode}")
    return proc.stdout.decode(errors="replace")
