"""The house plan (docs/architecture.md) holds: layers import only downward, no import cycle, no hidden imports.

The layer contracts live in pyproject.toml ([tool.importlinter]) and list no exceptions; ``make lint`` runs them too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolchain", "device_runtime")


def test_import_contracts_hold_with_no_exceptions() -> None:
    config = (ROOT / "pyproject.toml").read_text()
    assert "ignore_imports" not in config and "unmatched_ignore" not in config  # no exceptions listed
    proc = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_circular_import_anywhere() -> None:
    # TYPE_CHECKING imports never run; everything else, package __init__ re-exports included, counts
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_no_project_import_hides_inside_a_function() -> None:
    """An import inside a function is how a cycle hides from the contracts; third-party lazy imports are fine."""
    hidden = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "micropython" in path.parts:  # device code: runs on boards, not part of the host graph
                continue
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                    if isinstance(node, ast.ImportFrom) and node.level:
                        names = ["(relative)"]
                    hidden += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                               if n.split(".")[0] in (*PACKAGES, "(relative)")]
    assert hidden == []


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """``from toolchain.x import _name`` or ``module._name`` on an imported project module: a private reach-in."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "micropython" in path.parts:
                continue
            tree = ast.parse(path.read_text())
            modules = set()  # local names bound to project modules
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in PACKAGES:
                    for a in node.names:
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}")
                        modules.add(a.asname or a.name)
                elif isinstance(node, ast.Import):
                    modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith(PACKAGES))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                        and node.attr.startswith("_") and not node.attr.startswith("__")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert found == []
