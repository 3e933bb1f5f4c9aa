"""The emulated WebAssembly board's network, and the MQTT client the device app runs on it.

``WasmBoard(..., net=True)`` (``wasm_stream.py``) gives the board ``socket``/``usocket`` (``wasm_socket.py``, the
board's network driver) on real TCP sockets opened by Node.js (``wasm_net.mjs`` + ``wasm_net_worker.mjs``).

``umqtt.simple`` is micropython-lib's MQTT client, unmodified. It is not copied into this repository: the test
setup (``scripts/setup_system.sh`` -> ``python3 -m toolchain.deploy.emulators.wasm_net``) fetches the pinned sdist from PyPI,
checks its sha256 and keeps ``umqtt/simple.py`` in ``.cache/umqtt/`` (ignored by git). Real boards install it
with ``mpremote mip install umqtt.simple``. This module uses the standard library only (it runs before the venv).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

from toolchain.contracts import paths

UMQTT_VERSION = "1.3.4"
UMQTT_URL = ("https://files.pythonhosted.org/packages/bd/cf/697e3418b2f44222b3e848078b1e33ee76aedca9b6c2430ca1b1aec1ce1d/"
             "micropython-umqtt.simple-1.3.4.tar.gz")
UMQTT_SHA256 = "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"
CACHE = paths.CACHE / "umqtt"


def umqtt_simple() -> Path | None:
    """``umqtt/simple.py`` (``$TOOLCHAIN_UMQTT`` or the cache), or ``None`` if it was not fetched."""
    env = os.environ.get("TOOLCHAIN_UMQTT")
    path = Path(env) if env else CACHE / "umqtt" / "simple.py"
    return path if path.is_file() else None


def umqtt_missing() -> str | None:
    """A pytest skip reason when umqtt.simple is not there, else ``None``."""
    if umqtt_simple() is None:
        return (f"umqtt.simple {UMQTT_VERSION} not fetched: run `bash scripts/setup_system.sh` "
                f"(or `python3 -m toolchain.deploy.emulators.wasm_net`), which puts it in {CACHE}")
    return None


def board_files() -> dict[str, bytes]:
    """What a WebAssembly board needs on its file system to import ``umqtt.simple``."""
    path = umqtt_simple()
    if path is None:
        raise FileNotFoundError(umqtt_missing())
    return {"/lib/umqtt/simple.py": path.read_bytes()}


def fetch_umqtt(dest: Path = CACHE, url: str = UMQTT_URL, timeout: float = 60.0) -> Path:
    """Download the pinned sdist, check its sha256, extract ``umqtt/simple.py`` into ``dest``; return its path."""
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed https URL
        blob = r.read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != UMQTT_SHA256:
        raise ValueError(f"umqtt.simple sdist sha256 {digest} != pinned {UMQTT_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.isfile() and m.name.endswith("/umqtt/simple.py"))
        src = tar.extractfile(member)
        assert src is not None
        code = src.read()
    out = dest / "umqtt" / "simple.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(code)
    tmp.replace(out)
    (dest / "SOURCE").write_text(f"micropython-umqtt.simple=={UMQTT_VERSION}\n{url}\nsha256 {UMQTT_SHA256}\n")
    return out


def main() -> int:
    out = CACHE / "umqtt" / "simple.py"
    if out.is_file() and (CACHE / "SOURCE").is_file() and UMQTT_SHA256 in (CACHE / "SOURCE").read_text():
        return 0
    try:
        print(f"fetching umqtt.simple {UMQTT_VERSION} (sha256-pinned) into {CACHE}")
        fetch_umqtt()
    except ValueError as exc:  # a different file behind the pinned URL: never use it
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"warning: could not fetch umqtt.simple ({exc}); the device MQTT tests will be skipped",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
