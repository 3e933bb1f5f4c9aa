"""Where the parts of the project that are not host Python live, computed once.

The device code (``device_runtime/``) is data for the host: it is read and copied to boards, never imported by
host layers. In an editable install these are the repository's folders; in a wheel, ``device_runtime`` is
installed beside ``toolchain``.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEVICE_RUNTIME = REPO / "device_runtime"
MICROPYTHON_ENGINE = DEVICE_RUNTIME / "micropython"  # the MicroPython engine and runtime sources
JETSON_RUNTIME = DEVICE_RUNTIME / "jetson"
CACHE = REPO / ".cache"  # built MicroPython ports, fetched umqtt (scripts/build_micropython.sh)
NODE_MODULES = REPO / "node_modules"  # MicroPython WebAssembly (npm)
