"""micro:bit packaging: the sources shrunk for a device that compiles them itself, and the firmware hex.

The micro:bit v1 runs MicroPython 1.9.2, which cannot import ``.mpy``: every shipped module is compiled on the
device, so every identifier becomes a heap qstr and every character costs lexer heap. :func:`minify_source`
shrinks a module; :func:`build_hex_with_script` embeds a ``main.py`` into the Debian firmware (uflash 1.3.0).
"""

from __future__ import annotations

import ast
import builtins
import io
import symtable
import tokenize
from pathlib import Path

DEFAULT_FIRMWARE = Path("/usr/share/firmware-microbit-micropython/firmware.hex")


def build_hex_with_script(script: str, out: Path, firmware: Path = DEFAULT_FIRMWARE) -> Path:
    """Write a hex of ``firmware`` with ``script`` embedded as main.py (runs at boot); needs uflash 1.x."""
    import uflash  # uflash 1.3.0: 2.x cannot embed into the Debian firmware

    runtime = Path(firmware).read_text()
    out = Path(out)
    out.write_text(uflash.embed_hex(runtime, uflash.hexlify(script.encode())))
    return out


_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_SHORT = _LETTERS + [c + d for c in _LETTERS for d in "0123456789"]


def _local_renames(src: str, keep: frozenset[str]) -> dict[tuple[int, int], dict[str, str]]:
    """Per function (line span): its local names and parameters -> short names not used otherwise there."""
    tree = ast.parse(src)
    table = symtable.symtable(src, "<device>", "exec")
    spans: dict[str, list[tuple[int, int]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            spans.setdefault(node.name, []).append((node.lineno, node.end_lineno or node.lineno))
    out: dict[tuple[int, int], dict[str, str]] = {}

    def visit(t: symtable.SymbolTable) -> None:
        for child in t.get_children():
            if child.get_type() == "function" and child.get_name() in spans:
                syms = child.get_symbols()
                local = [x.get_name() for x in syms if x.is_local() and not x.is_global() and not x.is_imported()
                         and x.get_name() not in keep and not x.get_name().startswith("__")]
                taken = {x.get_name() for x in syms} | set(dir(builtins))
                names = iter(n for n in _SHORT if n not in taken)
                span = spans[child.get_name()].pop(0)
                out[span] = {n: next(names) for n in sorted(local, key=len, reverse=True) if len(n) > 1}
            visit(child)

    visit(table)
    return out


def minify_source(src: str, rename: bool = True, keep: frozenset[str] = frozenset({"self", "dense"})) -> str:
    """Drop comments and blank lines, indent by one space per level and give function locals short names.

    The micro:bit compiles ``.py`` files on the device (1.9.2 cannot import ``.mpy``): every identifier
    becomes a heap-allocated qstr and every character costs lexer/parser heap, so shipped modules should
    be as small as possible. Assumes 4-space indentation; parameters named in ``keep`` are not renamed
    (they are passed by keyword).
    """
    renames = _local_renames(src, keep) if rename else {}
    lines = src.splitlines()
    edits: list[tuple[int, int, int, str]] = []  # row, start col, end col, replacement
    prev = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            edits.append((tok.start[0], tok.start[1], len(lines[tok.start[0] - 1]), ""))
        elif tok.type == tokenize.NAME and not (prev is not None and prev.string == "."):
            row = tok.start[0]
            spans = [sp for sp in renames if sp[0] <= row <= sp[1]]
            if spans:
                inner = max(spans, key=lambda sp: sp[0])
                new = renames[inner].get(tok.string)
                if new:
                    edits.append((row, tok.start[1], tok.end[1], new))
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            prev = tok
    for row, a, b, new in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = (line[:a] + new + line[b:]).rstrip() if new == "" else line[:a] + new + line[b:]
    out = []
    for line in lines:
        if line.strip():
            n = len(line) - len(line.lstrip(" "))
            out.append(" " * (n // 4) + line.lstrip(" "))
    return "\n".join(out) + "\n"
