"""Run code on the MicroPython 1.28 unix port (x64, native/viper emitter) built by scripts/build_micropython.sh.

The port's heap is fixed at start (``-X heapsize=N``): an allocation beyond it raises ``MemoryError``, so
heap figures measured here are real bounds, unlike the WebAssembly board whose heap grows on demand.
Files are written into a fresh folder that is the script's working directory and its import path.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from toolchain.contracts import paths

CACHE = paths.CACHE / "micropython"
BINARY = CACHE / "unix" / "micropython"
MPY_CROSS = CACHE / "mpy-cross"
MISSING = ("MicroPython unix port not built: run scripts/build_micropython.sh "
           "(needs ../shared/vendor/micropython-1.28.0-src.tar.gz and a C compiler)")


class MicroPythonError(RuntimeError):
    """The MicroPython program raised; the message holds its traceback."""


def available() -> bool:
    return BINARY.is_file() and os.access(BINARY, os.X_OK)


def mpy_cross_available() -> bool:
    return MPY_CROSS.is_file() and os.access(MPY_CROSS, os.X_OK)


def mpy_cross(source: bytes, name: str, march: str | None = None) -> bytes:
    """``source`` compiled to ``.mpy`` by the mpy-cross built from the same 1.28 source.

    ``march`` selects the native code architecture (x64, armv6m, armv7m, armv7emsp, xtensawin, ...) for
    ``@micropython.viper``/``native`` functions; without it a file holding them is rejected.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.write_bytes(source)
        out = src.with_suffix(".mpy")
        cmd = [str(MPY_CROSS), "-o", str(out)] + ([f"-march={march}"] if march else []) + [str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mpy-cross {name}: {proc.stderr.strip()}")
        return out.read_bytes()


def run_micropython(
    code: str,
    *,
    files: dict[str, bytes] | None = None,
    heap_bytes: int = 256 * 1024,
    stdin: bytes = b"",
    timeout: float = 600.0,
) -> str:
    """Run ``code`` on the unix port with a ``heap_bytes`` heap; return what it printed.

    ``files`` maps names relative to the working directory (modules, ``.mpy`` files, model files) to their
    bytes; ``stdin`` is fed to ``sys.stdin``. Raises :class:`MicroPythonError` if the program raised.
    """
    if not available():
        raise RuntimeError(MISSING)
    with tempfile.TemporaryDirectory(prefix="mpunix") as tmp:
        for name, data in (files or {}).items():
            p = Path(tmp) / name.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        (Path(tmp) / "__main_job.py").write_text(code)
        # MICROPYPATH: only the job folder (and frozen modules), so nothing on the host leaks into imports
        env = dict(os.environ, MICROPYPATH=f"{tmp}:.frozen")
        proc = subprocess.run([str(BINARY), "-X", f"heapsize={int(heap_bytes)}", "__main_job.py"], input=stdin,
                              capture_output=True, timeout=timeout, cwd=tmp, env=env)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise MicroPythonError((proc.stderr.decode(errors="replace") + out[-2000:]).strip()
                               or f"micropython exited {proc.returncode}")
    return out
