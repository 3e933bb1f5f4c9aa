"""The Jetson bundle's code: runnable on a machine with Python and the agent's packages only (docs/jetson.md).

``device_runtime/jetson/agent.py`` imports the device side of the fleet protocol: ``toolchain.contracts.wire``
(messages, errors, security) and ``toolchain.fleet`` (device agent, MQTT link). The bundle carries exactly those
modules under their own names, in a skeleton ``toolchain/`` package whose every ``__init__.py`` imports nothing
(the repository's ``toolchain.fleet`` also imports the serial link, which needs pyserial), plus
``requirements.txt``, ``install.sh`` and ``run_agent.sh``. :func:`jetson_code` finds the modules by walking the
imports of the bundle's entry points (``ast``, nothing is imported) and refuses an import that is neither in the
bundle, nor in the standard library, nor one of :data:`AGENT_PACKAGES`: the bundle's import closure is checked each
time a bundle is written.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.paths import JETSON_RUNTIME, REPO

JETSON_DIR = JETSON_RUNTIME
PACKAGE = "toolchain"
# the host packages whose modules the agent may import (device side of the protocol only)
CARRIED = ("toolchain.contracts.wire", "toolchain.fleet")
ENTRY_POINTS = ("agent", "runtime", "zo_np")
PYTHON_MIN = (3, 10)  # the carried modules use `X | Y` unions at run time; runtime.py alone runs on 3.8
# top-level import name -> pip requirement
AGENT_PACKAGES = {"numpy": "numpy", "onnx": "onnx", "onnxruntime": "onnxruntime", "paho": "paho-mqtt>=2",
                  "cryptography": "cryptography"}

INIT = '''"""Part of the toolchain package: the modules the Jetson agent imports (copied by toolchain.package.jetson).

This __init__ imports nothing, so no module outside the bundle's requirements loads.
"""
'''
REQUIREMENTS = f"""# The Jetson agent of this bundle (docs/jetson.md): Python >= {PYTHON_MIN[0]}.{PYTHON_MIN[1]} and these packages.
# On a Jetson, install onnxruntime-gpu from NVIDIA's wheels for your JetPack instead of onnxruntime.
""" + "".join(f"{req}\n" for req in AGENT_PACKAGES.values())
INSTALL = f"""#!/bin/sh
# Install the agent's packages (requirements.txt) and check that the bundle imports. PYTHON: the interpreter.
set -e
here=$(cd "$(dirname "$0")" && pwd)
py=${{PYTHON:-python3}}
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= {PYTHON_MIN} else "Python >= {PYTHON_MIN[0]}.{PYTHON_MIN[1]} needed")'
"$py" -m pip install -r "$here/requirements.txt"
cd "$here" && PYTHONPATH="$here" "$py" -c 'import agent, runtime; print("jetson bundle ok")'
"""
RUN = """#!/bin/sh
# The Jetson fleet agent from this bundle folder: ./run_agent.sh --broker HOST:PORT --fleet F --device ID --local DIR
# (more: ./run_agent.sh --help). PYTHON: the interpreter (default python3).
here=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m agent --bundle "$here" "$@"
"""


def _sources() -> dict[str, Path]:
    """Module name -> source for everything the bundle may carry: the flat Jetson files and the package."""
    mods = {p.stem: p for p in sorted(JETSON_DIR.glob("*.py")) if p.stem != "__init__"}
    for package in CARRIED:
        folder = REPO.joinpath(*package.split("."))
        mods.update({f"{package}.{p.stem}": p for p in sorted(folder.glob("*.py")) if p.stem != "__init__"})
    return mods


def _is_package(name: str) -> bool:
    """``toolchain`` or a package on the way to a carried one (their bundle ``__init__`` is :data:`INIT`)."""
    return any(c == name or c.startswith(name + ".") for c in CARRIED)


def _imports(name: str, source: str) -> list[str]:
    """Absolute names of what module ``name`` imports (``from a import b`` gives ``a.b`` and ``a``)."""
    package = name.rpartition(".")[0]  # "" for the flat files: a relative import there names a sibling file
    out = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = ".".join(p for p in (parent, base) if p)
            out += [f"{base}.{a.name}" if base else a.name for a in node.names] + ([base] if base else [])
    return out


def import_closure(entries: tuple[str, ...] = ENTRY_POINTS) -> tuple[dict[str, Path], set[str]]:
    """The bundle modules reachable from ``entries`` and the top-level packages they need from outside.

    Raises :class:`ToolchainError` for an import that the bundle cannot satisfy.
    """
    sources = _sources()
    needed: dict[str, Path] = {}
    external: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed[name] = sources[name]
        for imp in _imports(name, sources[name].read_text()):
            top = imp.split(".")[0]
            if imp in sources:
                todo.append(imp)
            elif _is_package(imp) or top in sources:
                continue  # the package itself, or ``from module import name`` (the module is listed as well)
            elif top == PACKAGE:
                if imp.rpartition(".")[0] not in sources:  # not just a name from a module we carry
                    raise ToolchainError(f"{name} imports {imp}, which is not one of the modules the bundle carries ({', '.join(CARRIED)})")
            elif top in sys.stdlib_module_names:
                continue
            elif top in AGENT_PACKAGES:
                external.add(top)
            else:
                raise ToolchainError(f"the Jetson bundle's {name} imports '{imp}', which the bundle cannot carry (allowed:"
                                     f" the standard library and {', '.join(sorted(AGENT_PACKAGES))}); remove the "
                                     "import or make it lazy in a module the agent does not use")
    return needed, external


def jetson_code() -> dict[str, bytes]:
    """Bundle-relative name -> bytes of the Jetson code: flat runtime + agent, the carried ``toolchain`` modules, scripts."""
    needed, _ = import_closure()
    files = {src.name: src.read_bytes() for src in sorted(JETSON_DIR.glob("*.py"))}
    for name, src in sorted(needed.items()):
        if name.startswith(PACKAGE + "."):
            parts = name.split(".")
            for depth in range(1, len(parts)):
                files["/".join(parts[:depth]) + "/__init__.py"] = INIT.encode()
            files["/".join(parts) + ".py"] = src.read_bytes()
    files["requirements.txt"] = REQUIREMENTS.encode()
    files["install.sh"] = INSTALL.encode()
    files["run_agent.sh"] = RUN.encode()
    return files


def agent_info() -> dict[str, object]:
    """What ``config.json`` says about the agent (``"agent"`` key)."""
    needed, external = import_closure()
    return {"run": "run_agent.sh", "install": "install.sh", "python": f">={PYTHON_MIN[0]}.{PYTHON_MIN[1]}",
            "requires": [AGENT_PACKAGES[t] for t in sorted(external)],
            "modules": sorted(n for n in needed if n.startswith(PACKAGE + "."))}
