"""The hardware-in-the-loop conformance suite: checks a flashed board against the host reference.

Each check returns a :class:`CheckResult` (``pass`` / ``fail`` / ``skip`` with the reason). Used by
``toolchain hil --port P`` (``toolchain/cli/hil.py``) and ``pytest -m hil --board PORT|emulated``
(``tests/hil_plugin.py``). The checks (docs/hil.md):

1. ``identity``: board platform and firmware version match the build's target;
2. ``bundle``: every bundle file on the board has the sha256 of the host's bundle;
3. ``inference``: the engine on the board gives the int8 outputs of TFLite Micro on a fixed vector set;
4. ``zo_round``: one zeroth-order round equals the host reference (needs ``ft.py``);
5. ``heap``: heap held by the loaded model + one inference is within the board profile's RAM budget;
6. ``protocol``: malformed frames are rejected by ``proto.py`` on the board and the heap is unchanged.

Checks that load code run after a soft reset (a fresh heap), so one does not starve the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.boards.profiles import BoardProfile
from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.paths import MICROPYTHON_ENGINE as ENGINE_DIR
from toolchain.contracts.wire.framing import Frame, encode_frame
from toolchain.contracts.wire.messages import Ping, encode
from toolchain.deploy.flash import check_board, resolve_build, select_for_board
from toolchain.deploy.flash_board import BoardInfo, board_sha256, connect, identify, list_files, soft_reset
from toolchain.deploy.hil import CHECKS
from toolchain.deploy.repl import DeviceError, RawRepl, ReplError
from toolchain.package.load import Bundle, load_bundle
from toolchain.package.microbit import minify_source
from toolchain.verify.reference import engine_features, head_from_smf, reference_probe, scalar_tolerance

N_VECTORS = 8
# The fixed vectors: a 16-bit LCG, s <- (s * 75 + 74) % 65537, byte (s & 255) - 128, from VECTOR_SEED, continued
# from one vector to the next. Small ints on every port (1.9.2 included), so the board generates them itself and
# nothing is transferred (the micro:bit's heap and flash have no room for a vector file next to the engine).
VECTOR_SEED = 1121
SMC = "model.smc"  # the micro:bit engine's decoded model (smf_mbc.convert; docs/sparse-model-format.md)


@dataclass
class CheckResult:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():<4}  {self.name:<10} {self.detail}"


@dataclass
class Context:
    port: str
    repl: RawRepl
    info: BoardInfo
    build_dir: Path
    manifest: dict
    profile: BoardProfile
    bundle: Bundle
    files: dict[str, bytes]  # the bundle as selected for this board
    state: dict


def fixed_vectors(manifest: dict, n: int = N_VECTORS) -> np.ndarray:
    """The fixed input set: ``n`` int8 vectors of the model's input shape from the LCG above (as the board makes them)."""
    shape = [int(v) for v in manifest.get("input", {}).get("shape", [1, 28, 28, 1])][1:]
    out = np.empty(n * int(np.prod(shape)), np.int8)
    s = VECTOR_SEED
    for i in range(out.size):
        s = (s * 75 + 74) % 65537
        out[i] = (s & 255) - 128
    return out.reshape(n, *shape)


def _engine(files: dict[str, bytes]) -> str | None:
    """Which sparse engine the bundle carries: ``smf`` (MicroPython 1.12+, reads model.smf), ``smf_mb`` (micro:bit
    v1, reads model.smc) or None."""
    for kind, model in (("smf_mb", SMC), ("smf", "model.smf")):
        if model in files and (f"{kind}.py" in files or f"{kind}.mpy" in files):
            return kind
    return None


def host_reference(build_dir: Path, files: dict[str, bytes], x: np.ndarray) -> tuple[np.ndarray, str]:
    """int8 outputs of the host reference: TFLite Micro on model.tflite (else the engine under CPython)."""
    tfl = build_dir / "model.tflite"
    if tfl.is_file():
        try:
            from tflite_micro.python.tflite_micro import runtime

            interp = runtime.Interpreter.from_file(str(tfl))
            outs = []
            for xi in x:
                interp.set_input(xi[None], 0)
                interp.invoke()
                outs.append(interp.get_output(0).reshape(-1).copy())
            return np.stack(outs).astype(np.int8), "TFLite Micro"
        except ImportError:
            pass
    import importlib
    import sys

    sys.path.insert(0, str(ENGINE_DIR))
    try:
        smf = importlib.import_module("smf")
        model = smf.Model(files["model.smf"])
        outs = [np.frombuffer(bytes(model.infer(xi.reshape(-1).tobytes())), np.int8).copy() for xi in x]
    finally:
        sys.path.remove(str(ENGINE_DIR))
    return np.stack(outs), "the engine under CPython (tflite-micro not installed)"


def check_identity(ctx: Context) -> CheckResult:
    notes = check_board(ctx.info, ctx.profile)  # raises ToolchainError on the wrong firmware
    extra = f" ({'; '.join(notes)})" if notes else ""
    return CheckResult("identity", "pass", ctx.info.describe() + extra)


def check_bundle(ctx: Context) -> CheckResult:
    on_board = list_files(ctx.repl)
    missing = [n for n in ctx.files if n not in on_board]
    if missing:
        return CheckResult("bundle", "fail", f"missing on the board: {', '.join(missing)}; run `toolchain flash`")
    bad = [n for n, d in ctx.files.items() if board_sha256(ctx.repl, n, ctx.info) != hashlib.sha256(d).hexdigest()]
    if bad:
        return CheckResult("bundle", "fail", f"sha256 differs: {', '.join(bad)}; run `toolchain flash` again")
    where = "on the board" if ctx.info.has_sha256 else "read back"
    return CheckResult("bundle", "pass", f"{len(ctx.files)} files, {sum(map(len, ctx.files.values()))} B, "
                                         f"sha256 equal ({where})")


# a0: the heap before the model; smf: before the engine's import too (its .mpy code is part of what the model costs
# there); smf_mb: after it (1.9.2 compiles the runtime into the heap; the profile's ram_bytes is model + activations)
_LOAD = {"smf": ("import gc\ngc.collect()\na0=gc.mem_alloc()\nfrom smf import Model\nm=Model('model.smf')\n"
                 "b=m.input_buffer()\ngc.collect()\nprint('LOAD',gc.mem_alloc()-a0,gc.mem_free())\n"),
         "smf_mb": ("import gc\ngc.collect()\nc0=gc.mem_alloc()\nimport smf_mbk\nimport smf_mb\ngc.collect()\n"
                    "a0=gc.mem_alloc()\nprint('CODE',a0-c0)\n",
                    f"m=smf_mb.Model({SMC!r})\nb=m.input_buffer()\ngc.collect()\n"
                    "print('LOAD',gc.mem_alloc()-a0,gc.mem_free())\n")}


def _load_model(ctx: Context) -> tuple[int, int] | CheckResult:
    """Load the engine on a fresh heap; (held bytes, free) or a skip/fail result.

    A MemoryError is retried once from a fresh heap (1.9.2 compiles on the board and its ~9 KB heap fragments
    differently from run to run)."""
    kind = _engine(ctx.files)
    if kind is None:
        return CheckResult("inference", "skip", "the bundle has no sparse engine (smf + model.smf, or smf_mb + "
                                                "model.smc); rebuild the bundle with `toolchain build`")
    step = "loading the model"
    for attempt in range(2):
        soft_reset(ctx.repl)
        try:
            if kind == "smf_mb":
                step = "importing smf_mbk, smf_mb"
                code = ctx.repl.exec(_LOAD[kind][0], timeout=300)
                ctx.state["code"] = int(next(ln for ln in code.splitlines() if ln.startswith("CODE")).split()[1])
                step = "loading the model"
                out = ctx.repl.exec(_LOAD[kind][1], timeout=300)
            else:
                out = ctx.repl.exec(_LOAD[kind], timeout=300)
            break
        except DeviceError as exc:
            last = exc.traceback.strip().splitlines()[-1]
            if "MemoryError" in last and attempt == 0:
                continue
            return CheckResult("inference", "fail", f"{step} raised {last}")
    line = next(ln for ln in out.splitlines() if ln.startswith("LOAD"))
    _, held, free = line.split()
    return int(held), int(free)


def check_inference(ctx: Context) -> CheckResult:
    x = fixed_vectors(ctx.manifest)
    n = int(np.prod(x.shape[1:]))
    loaded = _load_model(ctx)
    ctx.state["load"] = loaded
    if isinstance(loaded, CheckResult):
        return loaded
    ref, ref_name = host_reference(ctx.build_dir, ctx.files, x)
    ctx.repl.exec(f"s={VECTOR_SEED}", timeout=120)
    got = []
    for _ in range(len(x)):  # one short command per vector: the board compiles each (a micro:bit has ~4 KB left)
        out = ctx.repl.exec(f"gc.collect()\nfor i in range({n}):\n s=(s*75+74)%65537\n b[i]=(s&255)-128\n"
                         "print(list(m.infer()))", timeout=120)
        got.append([int(v) for v in out.strip().strip("[]").split(",")])
    heap = ctx.repl.exec("gc.collect()\nprint(gc.mem_alloc()-a0)", timeout=120).strip()
    ctx.state["after_inference"] = int(heap.splitlines()[-1])
    got_a = np.array(got, np.int8)
    if got_a.shape != ref.shape or (got_a != ref).any():
        bad = np.flatnonzero((got_a != ref).any(axis=1)) if got_a.shape == ref.shape else list(range(len(x)))
        return CheckResult("inference", "fail", f"{len(bad)} of {len(x)} vectors differ from {ref_name} "
                                                f"(first: vector {bad[0]})")
    return CheckResult("inference", "pass", f"{len(x)} fixed vectors (seed {VECTOR_SEED}) bit-exact with {ref_name}")


def check_zo_round(ctx: Context) -> CheckResult:
    if "ft.py" not in ctx.files and "ft.mpy" not in ctx.files:
        return CheckResult("zo_round", "skip", "ft.py is not part of the flashed bundle")
    return _zo_round(ctx)


ZO_SEED, ZO_K, ZO_MU = 0x2026_1121, 4, 1e-3
ZO_FILE = "hil_zo.bin"  # scratch file, removed after its check


def _zo_round(ctx: Context) -> CheckResult:
    """One ``FineTuner.probe`` on the board vs ``toolchain.verify.reference.reference_probe``.

    A MemoryError on the micro:bit is retried once from a fresh heap (1.9.2 compiles the modules on the board
    and the ~9 KB heap fragments differently from run to run)."""
    result = _zo_round_once(ctx)
    if result.status == "skip" and "MemoryError" in result.detail:
        result = _zo_round_once(ctx)
    return result


def _zo_round_once(ctx: Context) -> CheckResult:
    import json

    smf = ctx.files.get("model.smf")
    if smf is None or "config.json" not in ctx.files:
        return CheckResult("zo_round", "skip", "the bundle has no model.smf / config.json")
    spec = json.loads(ctx.files["config.json"])
    head = head_from_smf(smf)
    x = fixed_vectors(ctx.manifest)
    ys = [i % head.rows for i in range(len(x))]
    feats = engine_features(smf, x, head)
    with_engine = "smf.py" in ctx.files or "smf.mpy" in ctx.files
    if with_engine:
        setup = ("import json\nspec=json.loads(open('config.json').read())\nfrom smf import Model\n"
                 "m=Model('model.smf')\nt=ft.FineTuner(m,spec)\n")
        rows = [xi.reshape(-1).tobytes() for xi in x]
    else:  # micro:bit: the fine-tuner takes the head's int8 inputs (FineTuner(None, spec), see bundle.py)
        setup = "g={}\nexec(open('spec.py').read(),g)\nt=ft.FineTuner(None,g['SPEC'])\ndel g\n"
        rows = [f.tobytes() for f in feats]
    w0 = np.frombuffer(ctx.files["head.bin"], "<f4", head.nnz + head.rows).copy() if "head.bin" in ctx.files else None
    # The samples go to a scratch file first (on a fresh heap), so nothing big is parsed once the runtime is loaded.
    soft_reset(ctx.repl)
    ctx.repl.put_file(ZO_FILE, b"".join(rows))
    soft_reset(ctx.repl)
    step = "import zo"
    try:  # the runtime modules first, one at a time on the fresh heap (as the bundle's main.py does)
        ctx.repl.exec("import gc\ngc.collect()\nimport zo\ngc.collect()", timeout=120)
        step = "import ft"
        ctx.repl.exec("import ft\ngc.collect()\nzo0=gc.mem_alloc()", timeout=120)
        step = "FineTuner()"
        ctx.repl.exec(setup, timeout=300)
        step = "reading the samples"
        ctx.repl.exec(f"f=open({ZO_FILE!r},'rb')\nxs=[f.read({len(rows[0])}) for i in range({len(rows)})]\nf.close()\n"
                   "del f\ngc.collect()", timeout=60)
        step = "probe"
        out = ctx.repl.exec(f"g,loss,n=t.probe({ZO_SEED},{ZO_K},{ZO_MU!r},xs,{ys!r})\n"
                         "print('ZO',' '.join(repr(v) for v in g),'|',repr(loss),n)\ndel g\ngc.collect()\n"
                         "print('ZOHEAP',gc.mem_alloc()-zo0)", timeout=300)
    except DeviceError as exc:
        last = exc.traceback.strip().splitlines()[-1]
        if "MemoryError" in last and ctx.info.platform == "microbit":
            return CheckResult("zo_round", "skip", f"the fine-tuner does not fit the micro:bit heap here ({step}: {last})")
        return CheckResult("zo_round", "fail", f"{step} raised {last}")
    finally:
        try:
            soft_reset(ctx.repl)
        except (ToolchainError, ReplError):
            pass
        _remove(ctx, ZO_FILE)
    line = next(ln for ln in out.splitlines() if ln.startswith("ZO "))
    ctx.state["zo_heap"] = int(next(ln for ln in out.splitlines() if ln.startswith("ZOHEAP")).split()[1])
    scal_text, _, rest = line[2:].partition("|")
    got = np.array([float(v) for v in scal_text.split()], np.float64)
    loss_text, n_text = rest.split()
    if w0 is None:
        return CheckResult("zo_round", "skip", "head.bin is not in the bundle; no host weights to compare with")
    ref = reference_probe(head, w0, feats, ys, ZO_SEED, ZO_K, ZO_MU, spec.get("estimator", "forward"))
    tol = scalar_tolerance(float(ref.loss), ZO_MU, ctx.profile.float_bits)
    err = float(np.max(np.abs(got - np.asarray(ref.scalars, np.float64)))) if len(got) == len(ref.scalars) else np.inf
    loss_err = abs(float(loss_text) - float(ref.loss))
    if int(n_text) != ref.n or err > tol or loss_err > tol * ZO_MU:
        return CheckResult("zo_round", "fail", f"probe differs from the host reference: max scalar error {err:.3g} "
                                               f"(tolerance {tol:.3g}), loss {loss_text} vs {ref.loss:.6g}, n {n_text}")
    return CheckResult("zo_round", "pass", f"K={ZO_K} probe on {len(rows)} fixed samples equals the host reference "
                                           f"(max scalar error {err:.2g} <= {tol:.2g}, docs/zo.md section 9)")


def check_heap(ctx: Context) -> CheckResult:
    loaded = ctx.state.get("load")
    if loaded is None:
        loaded = _load_model(ctx)
    budget = ctx.profile.ram_bytes
    if isinstance(loaded, CheckResult):
        zo_heap = ctx.state.get("zo_heap")
        if zo_heap is None:
            return CheckResult("heap", loaded.status, "no model load to measure: " + loaded.detail)
        if zo_heap > budget:
            return CheckResult("heap", "fail", f"the fine-tuner (FineTuner + one probe) holds {zo_heap} B of heap, "
                                               f"profile allows {budget} B")
        return CheckResult("heap", "pass", f"fine-tuner state + one probe hold {zo_heap} B <= {budget} B "
                                           f"({ctx.profile.name} profile; measured on the fine-tuner: this bundle "
                                           "has no engine)")
    held, _free = loaded
    peak = max(held, ctx.state.get("after_inference", held))
    note = " (WebAssembly: gc.mem_alloc is approximate; the heap itself is bounded)" if ctx.info.emulated else ""
    if "code" in ctx.state:
        note += f" (plus the runtime's code, compiled into the heap by 1.9.2: {ctx.state['code']} B)"
    if peak > budget:
        return CheckResult("heap", "fail", f"model + inference hold {peak} B of heap, profile allows {budget} B{note}")
    return CheckResult("heap", "pass", f"model + inference hold {peak} B <= {budget} B ({ctx.profile.name} profile){note}")


def _malformed_frames() -> list[bytes]:
    good = encode_frame(Frame(5, encode(Ping())))
    flipped = bytearray(good)
    flipped[3] ^= 0x40
    return [
        flipped,                                  # bad CRC
        good[:4] + b"\x00",                       # truncated
        b"\x05\x01\x02\x03\x04\x00",             # COBS ok, too short / bad CRC
        bytes([0xFF] * 40) + b"\x00",             # COBS overrun
        encode_frame(Frame(6, b"\x02\x21")),   # version 2
        encode_frame(Frame(7, b"\x01\x7e")),   # unknown type
        encode_frame(Frame(8, b"\x01\x21\x00")),  # PING with a trailing byte
        good,                                     # control: a valid PING must still be accepted after all that
    ]


def _remove(ctx: Context, name: str) -> None:
    """Remove a scratch file, asked until the listing confirms it (a byte lost on the micro:bit's UART must not
    leave it filling the ~15 KB file system for the next check); a board that no longer answers keeps it."""
    for _ in range(3):
        try:
            out = ctx.repl.exec(f"import os\nif {name!r} in os.listdir():os.remove({name!r})\nprint({name!r} in os.listdir())")
        except ReplError:
            continue
        if out.strip() == "False":
            return


def check_protocol(ctx: Context) -> CheckResult:
    names = set(list_files(ctx.repl))
    if "proto.py" not in names and "proto.mpy" not in names:  # not in this bundle: bring it, remove it after
        soft_reset(ctx.repl)
        src = (ENGINE_DIR / "proto.py").read_text()
        if ctx.info.platform == "microbit":  # as flashed there: minified (~15 KB of flash, identifiers are heap)

            src = minify_source(src)
        ctx.repl.put_file("proto.py", src.encode())
        ctx.state["uploaded_proto"] = True
    soft_reset(ctx.repl)
    frames = _malformed_frames()
    try:  # compile proto first, on the fresh heap, as a device's main.py does (1.9.2 compiles .py on the board)
        ctx.repl.exec("import gc\ngc.collect()\nimport proto\ngc.collect()", timeout=120)
    except DeviceError as exc:
        ctx.state.pop("uploaded_proto", None)
        return CheckResult("protocol", "fail", f"importing proto.py raised {exc.traceback.strip().splitlines()[-1]}")
    # go() decodes every frame (msg() for the ones that pass framing) and lists the verdicts; spin() only feeds
    # the frames, as the device does for each byte it receives: that must allocate nothing at all (the
    # WebAssembly build never frees during a run, so any allocation would show; micro:bit/ESP32 collect).
    code = ("import gc\nimport proto\np=proto.Proto(160)\nF=[" + ",".join(repr(f) for f in frames) + "]\n"
            "def go():\n r=[]\n for d in F:\n  i=0\n  while i<len(d):\n   i=p.feed(d,i)\n   k=p.kind\n"
            "   if k==1:\n    r.append(p.msg()[0])\n   elif k<0:\n    r.append(k)\n return r\n"
            "r=go()\nd=F[0]\nj=0\nk=0\ni=0\na=0\nn=len(F)\ngc.collect()\na=gc.mem_alloc()\n"
            "while j<5*n:\n d=F[j%n]\n i=0\n while i<len(d):\n  i=p.feed(d,i)\n p.last=-1\n j+=1\n"
            "gc.collect()\n"
            "a=gc.mem_alloc()-a\nprint('PROTO',r,p.bad,a)\n")
    try:
        out = ctx.repl.exec(code, timeout=120)
    except DeviceError as exc:
        return CheckResult("protocol", "fail", f"proto.py raised {exc.traceback.strip().splitlines()[-1]}")
    finally:
        if ctx.state.pop("uploaded_proto", False):
            _remove(ctx, "proto.py")
    line = next(ln for ln in out.splitlines() if ln.startswith("PROTO"))
    body = line[len("PROTO"):].strip()
    kinds_text, _, rest = body.partition("]")
    kinds = [int(v) for v in kinds_text.strip("[ ").split(",") if v.strip()]
    bad, leak = (int(v) for v in rest.split())
    accepted = [k for k in kinds[:-1] if k > 1]
    if accepted:
        return CheckResult("protocol", "fail", f"a malformed frame was accepted (message type {accepted[0]})")
    if not kinds or kinds[-1] != 0x21:
        return CheckResult("protocol", "fail", f"a valid PING after the malformed frames was not decoded (got {kinds[-1:]})")
    if leak != 0:
        return CheckResult("protocol", "fail", f"feeding the frames 5 more times changed the heap by {leak} B")
    return CheckResult("protocol", "pass", f"{len(frames) - 1} malformed frames rejected, a valid PING accepted ({bad} framing "
                                           "drops counted over all passes), heap unchanged over 5 more passes")


_FUNCS: dict[str, Callable[[Context], CheckResult]] = {
    "identity": check_identity, "bundle": check_bundle, "inference": check_inference, "zo_round": check_zo_round,
    "heap": check_heap, "protocol": check_protocol,
}


def open_context(port: str, target: str | None = None, build: str | None = None) -> Context:
    build_dir, manifest, profile = resolve_build(target, build)
    if profile.runtime != "micropython":
        raise ToolchainError(f"the conformance suite runs on MicroPython boards; {profile.name} is checked by "
                             "its install script")
    bundle = load_bundle(build_dir, manifest, profile, log=lambda _m: None)
    repl = connect(port)
    try:
        info = identify(repl)
        if info.platform != "microbit":
            repl.chunk = 256  # as mpremote writes; only the micro:bit's UART needs 24-byte pieces
        files = select_for_board(bundle, info, log=lambda _m: None)
    except BaseException:
        repl.close()
        raise
    return Context(port, repl, info, build_dir, manifest, profile, bundle, files, {})


def run_check(ctx: Context, name: str) -> CheckResult:
    try:
        return _FUNCS[name](ctx)
    except ToolchainError as exc:
        return CheckResult(name, "fail", str(exc))
    except (ReplError, StopIteration, ValueError) as exc:
        return CheckResult(name, "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")


def run_suite(port: str, target: str | None = None, build: str | None = None, only: list[str] | None = None,
              log: Callable[[str], None] | None = None) -> list[CheckResult]:
    ctx = open_context(port, target, build)
    results = []
    try:
        for name in only or CHECKS:
            r = run_check(ctx, name)
            results.append(r)
            if log:
                log(r.line())
            if name == "identity" and r.status == "fail":
                break
    finally:
        try:
            soft_reset(ctx.repl)  # leave a fresh heap behind (the checks loaded the runtime)
        except ToolchainError:
            pass
        ctx.repl.close()
    return results
