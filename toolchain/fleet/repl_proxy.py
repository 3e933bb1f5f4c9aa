"""A board too small for the protocol stack as a fleet device, through its raw REPL (docs/fleet.md).

The micro:bit v1 (MicroPython 1.9.2, ~9.4 KB heap) runs the on-device fine-tuner of the bundle (``zo.py`` +
``ft.py``, ``FineTuner(None, spec)`` on its head's precomputed int8 inputs: the sparse engine does not fit), but
not ``proto.py`` + ``zo.py`` + an app at once (measured in QEMU: proto.py keeps 2.9 KB, zo.py 1.5 KB, and the
smallest app split into ~0.7 KB modules leaves no contiguous block to compile the third one). So the host side
of the link speaks the fleet protocol for it: :class:`ReplTuner` calls ``tuner.probe`` / ``tuner.update`` on the
board over the raw REPL (the ZO arithmetic runs on the board, only seeds and scalars cross the UART as text) and
:class:`toolchain.fleet.device_agent.Agent` puts it on MQTT like any device. The board's files: the bundle's
``zo.py``, ``ft.py``, ``spec.py``, ``head.bin``, plus its data set ``d.bin`` (n x cols int8) and ``y.bin`` (labels).
:class:`MicrobitProxy` does all of it for a board on a serial port (``toolchain gateway --microbit PORT``).
"""

from __future__ import annotations

import ast
import threading
from collections.abc import Callable, Sequence

from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.wire.errors import ProtocolError
from toolchain.deploy.flash_board import board_sha256, connect, identify, read_file, run, soft_reset
from toolchain.deploy.repl import DeviceError, RawRepl, ReplError
from toolchain.fleet.device_agent import Agent
from toolchain.fleet.mqtt_link import MqttConfig, check_device_id

BOARD_FILES = ("zo.py", "ft.py", "spec.py", "head.bin", "d.bin", "y.bin")

# separate exec()s: the code of each one is compiled on the board too, and ft.py needs the heap in one piece
IMPORTS = ("import gc\nimport zo\ngc.collect()", "import ft\ngc.collect()")
BOOT = """g = {{}}
exec(open('spec.py').read(), g)
tuner = ft.FineTuner(None, g['SPEC'])
del g
gc.collect()
f = open('d.bin', 'rb')
X = [f.read({cols}) for i in range({n})]
f.close()
f = open('y.bin', 'rb')
Y = f.read()
f.close()
U = -1
gc.collect()
print(gc.mem_free())
"""


class ReplTuner:
    """The ``FineTuner`` API for a fine-tuner living on a board (``tuner``, data ``X``/``Y``) behind a raw REPL.

    ``xs`` passed to :meth:`probe` are indices into the board's data set (the data never crosses the link).
    """

    def __init__(self, repl: RawRepl, n: int, timeout: float = 120.0) -> None:
        self.repl, self.n, self.timeout = repl, n, timeout
        self.free_heap = 0

    def boot(self, cols: int) -> int:
        """Import the runtime on the board (fresh heap: soft-reset before) and load its data; returns free heap."""
        for code in IMPORTS:
            self.repl.exec(code, timeout=self.timeout)
        self.free_heap = int(self.repl.exec(BOOT.format(cols=cols, n=self.n), timeout=self.timeout).split()[-1])
        return self.free_heap

    # Each call is a few tiny exec()s: the board compiles every one in the ~2 KB its heap has left. When the
    # parser finds no block (fragmentation), nothing ran: collect and try again.
    def _x(self, code: str) -> str:
        for attempt in range(4):
            try:
                return self.repl.exec(code, timeout=self.timeout)
            except DeviceError as exc:
                if "parser could not allocate" not in exc.traceback or attempt == 3:
                    raise
                self.repl.exec("gc.collect()", timeout=self.timeout)
        raise AssertionError("unreachable")

    # A dropped byte can also leave a valid literal with another value (a lost digit, two numbers run together),
    # which would train the board's copy away from the host's without an error. So every number the host sends is
    # assigned on its own and read back; only commands made of names touch the model.
    def _let(self, name: str, value: int | float | list[int]) -> None:
        lit = f"{value:.9g}" if isinstance(value, float) else repr(value)
        for _ in range(4):
            self._x("gc.collect()")  # the parser needs contiguous blocks
            if _same(self._x(f"{name}={lit}\nprint(repr({name}))").strip(), value):
                return
        raise ReplError(f"the board keeps reading {name}={lit[:40]} differently (bytes lost on the serial line)")

    def _seed(self, round_seed: int) -> None:
        self._x("gc.collect()")
        self._x(f"S={round_seed >> 16}<<16|{round_seed & 0xFFFF}")  # small ints
        for _ in range(4):
            if self._x("print(S)").strip() == str(round_seed):
                return
            self._x(f"S={round_seed >> 16}<<16|{round_seed & 0xFFFF}")
        raise ReplError("the board keeps reading the round seed differently (bytes lost on the serial line)")

    def probe(self, round_seed: int, k: int, mu: float, xs: Sequence[int], ys: Sequence[int]
              ) -> tuple[list[float], float, int]:
        idx = list(xs)
        self._seed(round_seed)
        self._let("K", k)
        self._let("M", float(mu))
        if idx == list(range(self.n)):
            self._x("g,l,n=tuner.probe(S,K,M,X,Y)")
        else:
            self._let("I", idx)
            self._x("g,l,n=tuner.probe(S,K,M,[X[i] for i in I],[Y[i] for i in I])")
        self._x("gc.collect()")
        vals = self._x("for x in g:print(repr(x))").split()
        loss, n = self._x("print(repr(l),n)\ndel g").split()
        if len(vals) != k:
            raise ReplError(f"the board answered {len(vals)} scalars for k={k}")
        return [float(v) for v in vals], float(loss), int(n)

    def update(self, round_seed: int, gbar_list: Sequence[float], lr: float) -> None:
        gbar = [float(g) for g in gbar_list]
        self._seed(round_seed)
        self._let("L", float(lr))
        for _ in range(4):
            self._x("G=[]")
            for g in gbar:
                self._x(f"G.append({g:.9g})")
            self._x("gc.collect()")
            if len(got := self._x("for x in G:print(repr(x))").split()) == len(gbar) and all(
                    _same(v, g) for v, g in zip(got, gbar, strict=True)):
                break
        else:
            raise ReplError("the board keeps reading the update's scalars differently (bytes lost on the serial line)")
        # U: the seed of the last update applied, so that an update asked again (its ACK lost, or a link error
        # after it ran) is not applied twice
        self._x("if U!=S:\n tuner.update(S,G,L)\n U=S")
        try:
            self._x("del G\ngc.collect()")
        except DeviceError:
            pass  # (the update is in: a failed clean-up must not make the host ask for it again)


def _same(echo: str, value: int | float | list[int]) -> bool:
    """Whether the board's ``repr`` of a number (list) is ``value``: ints exactly, floats to 1e-5 relative (the
    micro:bit's floats have 22 significant bits; a lost digit moves a value far more)."""
    if isinstance(value, float):
        try:
            got = float(echo)
        except ValueError:
            return False
        return abs(got - value) <= 1e-5 * abs(value)
    return echo == repr(value)


def repl_agent(cfg: MqttConfig, device_id: str, repl: RawRepl, labels: Sequence[int], cols: int, *,
               board: str = "microbit", firmware: str = "micropython 1.9.2", model_id: int = 1,
               heartbeat_s: float = 30.0, k_max: int = 16, round_key: bytes | None = None) -> Agent:
    """An MQTT fleet device for the board behind ``repl`` (already holding its files; see the module doc).
    ``round_key``: the device's own key; the proxy (the trusted host next to the board, which cannot hash in its
    heap) then takes ROUND_START / ROUND_UPDATE for it only signed (docs/protocol.md SIGNED)."""
    tuner = ReplTuner(repl, len(labels))
    tuner.boot(cols)
    return Agent(cfg, device_id, tuner, list(range(len(labels))), list(labels), model_id=model_id, caps=0,
                 board=board, firmware=firmware + " (raw REPL)", heartbeat_s=heartbeat_s, k_max=k_max,
                 round_key=round_key)


_SIZES = "import os\nL=os.listdir()\nfor n in {names!r}:\n print(n,os.size(n) if n in L else -1)\ndel L\n"


class MicrobitProxy:
    """A micro:bit v1 on serial ``port`` as an MQTT fleet device, served by a thread until :meth:`close`.

    The board must hold :data:`BOARD_FILES` (the bundle's ``zo.py``, ``ft.py``, ``spec.py``, ``head.bin`` and its
    data set ``d.bin`` + ``y.bin``); its ``main.py`` must not import the fine-tuner (the heap is needed here).
    ``device_id`` defaults to ``microbit-<machine.unique_id() in hex>``. Every problem before the board is on MQTT
    (port, not a micro:bit, missing files, no heap) is a one-line :class:`toolchain.contracts.errors.ToolchainError`.
    """

    def __init__(self, cfg: MqttConfig, port: str, device_id: str | None = None, *, model_id: int = 1,
                 heartbeat_s: float = 30.0, log: Callable[[str], None] | None = None,
                 key_for: Callable[[str], bytes | None] | None = None, sums: dict[str, str] | None = None) -> None:

        log = log or (lambda _m: None)
        self.port = port
        self.repl = connect(port)
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        try:
            info = identify(self.repl)
            if info.platform != "microbit":
                raise ToolchainError(f"the board on {port} is {info.describe()}, not a micro:bit v1; --microbit is for "
                                     "micro:bits (boards that run app.py go with --port)")
            sizes = {}
            for line in run(self.repl, _SIZES.format(names=BOARD_FILES), "listing the micro:bit's files").splitlines():
                name, _, size = line.rpartition(" ")
                sizes[name] = int(size)
            missing = [n for n in BOARD_FILES if sizes.get(n, -1) < 0]
            if missing:
                raise ToolchainError(f"the micro:bit on {port} lacks {', '.join(missing)}; copy the bundle's zo.py, "
                                     "ft.py, spec.py, head.bin and its data set d.bin + y.bin onto it (docs/fleet.md)")
            # the flashed files before the fine-tuner is imported: sha256 against the SHA256SUMS of the flash
            # (``sums``), hashed here from the bytes read back (no hashlib on the board, the pure SHA-256 does
            # not fit its heap). It catches a corrupted or wrong flash; a board that lies is not in its reach.
            for name, want in sorted((sums or {}).items()):
                if name in BOARD_FILES and board_sha256(self.repl, name, info) != want.lower():
                    raise ToolchainError(f"{name} on the micro:bit on {port} does not match its SHA256SUMS line "
                                         "(corrupted or another build); flash the bundle again")
            n, cols = sizes["y.bin"], sizes["d.bin"] // max(1, sizes["y.bin"])
            if n < 1 or cols * n != sizes["d.bin"]:
                raise ToolchainError(f"the micro:bit on {port} has d.bin of {sizes['d.bin']} B for {n} labels in y.bin; "
                                     "d.bin must be n rows of the head's int8 inputs (docs/fleet.md)")
            if device_id is None:
                uid = ast.literal_eval(run(self.repl, "import machine\nprint(repr(machine.unique_id()))",
                                           "reading the board's id").strip())
                device_id = f"microbit-{bytes(uid).hex()}"[:32]
            try:
                check_device_id(device_id)
            except ProtocolError as exc:
                raise ToolchainError(f"--microbit {port}={device_id}: {exc}") from None
            labels = list(read_file(self.repl, "y.bin"))
            soft_reset(self.repl)  # a fresh heap for compiling zo.py and ft.py
            try:
                self.agent = repl_agent(cfg, device_id, self.repl, labels, cols, model_id=model_id,
                                        heartbeat_s=heartbeat_s, round_key=key_for(device_id) if key_for else None)
            except DeviceError as exc:
                last = exc.traceback.strip().splitlines()[-1] if exc.traceback.strip() else "error"
                raise ToolchainError(f"the micro:bit on {port} could not load its fine-tuner ({last}); reset it, "
                                     "check that main.py does not import it, and retry") from None
            except ReplError as exc:
                raise ToolchainError(f"the micro:bit on {port} stopped answering ({str(exc).splitlines()[0][:120]}); "
                                     "reset it and retry") from None
        except BaseException:
            self.repl.close()
            raise
        self.device_id = device_id
        log(f"{port}: {device_id} (micro:bit, {n} samples, {self.agent.tuner.free_heap} B heap free) on MQTT "
            "through the raw-REPL proxy")
        self.thread = threading.Thread(target=self.agent.run, args=(self._stop,), daemon=True,
                                       name=f"microbit-{port}")
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.repl.close()
