"""micro:bit packaging: the sources shrunk for a device that compiles them itself, and the firmware hex.

The micro:bit v1 runs MicroPython 1.9.2, which cannot import ``.mpy``: every shipped module is compiled on the
device, so every identifier becomes a heap qstr and every character costs lexer heap. :func:`microbit_source` ships
a module of ``device_runtime/micropython`` under its short name (:data:`MICROBIT_NAMES`, the glossary of the
directory's README.md) with the imports of the others rewritten to theirs, minified (:func:`minify_source`);
:func:`build_hex_with_script` embeds a ``main.py`` into the Debian firmware (uflash 1.3.0).
"""

from __future__ import annotations

import ast
import builtins
import io
import symtable
import tokenize
from pathlib import Path

from toolchain.contracts.paths import MICROPYTHON_ENGINE

DEFAULT_FIRMWARE = Path("/usr/share/firmware-microbit-micropython/firmware.hex")


def build_hex_with_script(script: str, out: Path, firmware: Path = DEFAULT_FIRMWARE) -> Path:
    """Write a hex of ``firmware`` with ``script`` embedded as main.py (runs at boot); needs uflash 1.x."""
    import uflash  # uflash 1.3.0: 2.x cannot embed into the Debian firmware

    runtime = Path(firmware).read_text()
    out = Path(out)
    out.write_text(uflash.embed_hex(runtime, uflash.hexlify(script.encode())))
    return out


# Readable name in the repository -> the module's name on the micro:bit (its flat file system holds 15120 B, and a
# module's name is a heap qstr there). Modules not listed keep their name. device_runtime/micropython/README.md
# lists the same (a test checks).
MICROBIT_NAMES = {
    # the micro:bit engine: runtime (boot 2) and the converter of a first boot
    "microbit_engine": "smf_mb", "microbit_kernels": "smf_mbk", "microbit_convert": "smf_mbc",
    "microbit_check": "smf_mb1", "microbit_tables": "smf_mb2", "microbit_channels": "smf_mb3",
    "microbit_weights": "smf_mb4", "microbit_dec_dense": "smf_mbe0", "microbit_dec_bitmap": "smf_mbe1",
    "microbit_dec_csr": "smf_mbe2", "microbit_dec_rle": "smf_mbe3",
    # the general engine
    "smf_reader": "smf_u", "smf_check": "smf_chk", "smf_tables": "smf_ld", "smf_bodies": "smf_wl",
    "smf_params": "smf_w", "smf_const_rows": "smf_k", "smf_requant": "smf_q", "smf_dec_dense": "smf_e0",
    "smf_dec_bitmap": "smf_e1", "smf_dec_csr": "smf_e2", "smf_dec_rle": "smf_e3", "smf_dense_baseline": "smf_dense",
    "smf_clamp_limits": "smf_thr", "smf_elementwise": "smf_ew", "smf_viper_prep": "smf_vp",
}


# Attributes (``self.<name>``) shipped to the micro:bit under short names, per module: ft.FineTuner's fields
# (README.md has the glossary; w, g and _loss keep theirs: host code reads them on the board)
MICROBIT_ATTRS = {
    "ft": {"model": "m", "head_op": "op", "cols": "nf", "in_zp": "zp", "in_scale": "s", "col_idx": "col",
           "logits": "z", "feat_buf": "fb", "batch": "n", "labels": "ys"},
}


def microbit_name(module: str) -> str:
    """The name ``module`` (a readable name of device_runtime/micropython) has on the micro:bit."""
    return MICROBIT_NAMES.get(module, module)


def _edit_tokens(src: str, edit) -> str:  # noqa: ANN001 - edit(token, previous token) -> replacement or None
    lines = src.splitlines(keepends=True)
    edits = []
    prev = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        new = edit(tok, prev)
        if new is not None:
            edits.append((tok.start, tok.end, new))
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            prev = tok
    for (r0, c0), (r1, c1), new in sorted(edits, reverse=True):
        if r0 != r1:
            raise ValueError(f"cannot rewrite a token spanning lines {r0}-{r1}")
        line = lines[r0 - 1]
        lines[r0 - 1] = line[:c0] + new + line[c1:]
    return "".join(lines)


def rename_modules(src: str, names: dict[str, str]) -> str:
    """``src`` with the modules in ``names`` renamed: names in imports and module references (``smf_check.load``),
    and string literals that are exactly a module's name (``drop('smf_check')``, tables of module names)."""

    def edit(tok: tokenize.TokenInfo, prev: tokenize.TokenInfo | None) -> str | None:
        if tok.type == tokenize.NAME and tok.string in names and not (prev is not None and prev.string == "."):
            return names[tok.string]
        if tok.type == tokenize.STRING and tok.string[:1] in "'\"":
            value = ast.literal_eval(tok.string)
            if value in names:
                return tok.string[0] + names[value] + tok.string[0]
        return None

    return _edit_tokens(src, edit)


# Modules the bundle links for the micro:bit: each of their ``from <engine module> import f`` becomes f's definition
# (and what f uses), so that functions of the general engine run there without the cost of their modules (each
# compiled module holds its dict, its other functions, its name; device_runtime/micropython/README.md has the numbers)
MICROBIT_LINKED = ("microbit_kernels",)
MICROBIT_LINE = "# microbit:"  # a line whose comment starts so is shipped to the micro:bit as the code after it


def _top_level(src: str) -> tuple[dict[str, ast.stmt], dict[str, tuple[str, str]], list[ast.stmt]]:
    """A module's top-level definitions (functions, classes, assigned names), its ``from M import`` names
    (name -> (M, name in M)) and its other import statements."""
    defs: dict[str, ast.stmt] = {}
    imported: dict[str, tuple[str, str]] = {}
    imports: list[ast.stmt] = []
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            if node.decorator_list:
                raise ValueError(f"cannot link the decorated {node.name}")
            defs[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                defs.update({n.id: node for n in ast.walk(t) if isinstance(n, ast.Name)})
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.update({a.asname or a.name: (node.module or "", a.name) for a in node.names})
            imports.append(node)
        elif isinstance(node, ast.Import):
            imports.append(node)
    return defs, imported, imports


def link_source(module: str, read, linkable) -> str:  # noqa: ANN001 - read(m) -> source; linkable(m) -> bool
    """``module``'s source with each top-level ``from M import f`` of a ``linkable`` M replaced by f's definition in
    M, preceded by the definitions f uses (from M, and from M's own linkable imports, recursively); the other
    imports those definitions need come first. Top-level code of M that f does not use is left out."""
    src = read(module)
    cache: dict[str, tuple[str, tuple]] = {}
    header: list[str] = []
    chunks: list[str] = []
    done: dict[str, str] = {}  # linked name -> its module

    def parts(m: str) -> tuple[str, tuple]:
        if m not in cache:
            text = read(m)
            cache[m] = (text, _top_level(text))
        return cache[m]

    def need(m: str, name: str) -> None:
        if name in done:
            if done[name] != m:
                raise ValueError(f"linking {module}: {name} of {m} clashes with {name} of {done[name]}")
            return
        text, (defs, imported, imports) = parts(m)
        if name in imported:
            src_mod, orig = imported[name]
            if orig != name:
                raise ValueError(f"linking {module}: {m} imports {orig} as {name}")
            if linkable(src_mod):
                need(src_mod, name)
                return
        if name not in defs:
            raise ValueError(f"linking {module}: {m} defines no {name}")
        done[name] = m
        node = defs[name]
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - {name}
        for dep in sorted(used):
            if dep in defs or (dep in imported and linkable(imported[dep][0])):
                need(m, dep)
            elif dep in imported:  # another import it needs (from array import array)
                for imp in imports:
                    line = ast.get_source_segment(text, imp) or ""
                    if isinstance(imp, ast.ImportFrom) and dep in {a.asname or a.name for a in imp.names} \
                            and line not in header:
                        header.append(line)
        chunks.append(ast.get_source_segment(text, node) or "")

    lines = src.splitlines()
    out: list[str] = []
    pos = 0
    for node in ast.parse(src).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and linkable(node.module or ""):
            out += lines[pos:node.lineno - 1]
            pos = node.end_lineno or node.lineno
            for a in node.names:
                if a.asname:
                    raise ValueError(f"linking {module}: {a.name} imported as {a.asname}")
                need(node.module or "", a.name)
            out += [c for chunk in chunks for c in (chunk, "", "")]
            chunks.clear()
    out += lines[pos:]
    own = set(lines)
    return "\n".join([h for h in header if h not in own] + out) + "\n"


def _linkable(module: str) -> bool:
    return (MICROPYTHON_ENGINE / f"{module}.py").is_file()


def rename_attributes(src: str, names: dict[str, str]) -> str:
    """``src`` with ``self.<name>`` renamed for the names in ``names``."""
    toks: list[tokenize.TokenInfo] = []

    def edit(tok: tokenize.TokenInfo, prev: tokenize.TokenInfo | None) -> str | None:
        toks.append(tok)
        if (tok.type == tokenize.NAME and tok.string in names and len(toks) >= 3 and toks[-2].string == "."
                and toks[-3].string == "self"):
            return names[tok.string]
        return None

    return _edit_tokens(src, edit)


def microbit_lines(src: str) -> str:
    """``src`` with each line whose comment starts with ``# microbit:`` replaced by the code after the marker (left
    out if there is none): where the micro:bit's heap needs a cheaper form than the readable one."""
    lines = src.splitlines(keepends=True)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(MICROBIT_LINE):
            row = tok.start[0] - 1
            line = lines[row]
            code = tok.string[len(MICROBIT_LINE):].strip()
            indent = line[:len(line) - len(line.lstrip())]
            lines[row] = indent + code + "\n" if code else ""
    return "".join(lines)


def microbit_source(module: str, read) -> tuple[str, bytes]:  # noqa: ANN001 - read(module) -> its source
    """``(file name on the micro:bit, contents)`` of the engine module ``module``: linked (:data:`MICROBIT_LINKED`),
    its ``# microbit:`` lines swapped in (:func:`microbit_lines`), modules and attributes renamed (:data:`MICROBIT_NAMES`,
    :data:`MICROBIT_ATTRS`) and minified."""
    src = link_source(module, read, _linkable) if module in MICROBIT_LINKED else read(module)
    src = rename_attributes(rename_modules(microbit_lines(src), MICROBIT_NAMES), MICROBIT_ATTRS.get(module, {}))
    return f"{microbit_name(module)}.py", minify_source(src).encode()


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
