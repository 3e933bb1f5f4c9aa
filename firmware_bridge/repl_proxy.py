"""A board too small for the protocol stack as a fleet device, through its raw REPL (docs/fleet.md).

The micro:bit v1 (MicroPython 1.9.2, ~9.4 KB heap) runs the on-device fine-tuner of the bundle (``zo.py`` +
``ft.py``, ``FineTuner(None, spec)`` on its head's precomputed int8 inputs: the sparse engine does not fit), but
not ``proto.py`` + ``zo.py`` + an app at once (measured in QEMU: proto.py keeps 2.9 KB, zo.py 1.5 KB, and the
smallest app split into ~0.7 KB modules leaves no contiguous block to compile the third one). So the host side
of the link speaks the fleet protocol for it: :class:`ReplTuner` calls ``tuner.probe`` / ``tuner.update`` on the
board over the raw REPL (the ZO arithmetic runs on the board, only seeds and scalars cross the UART as text) and
:class:`firmware_bridge.device_agent.Agent` puts it on MQTT like any device. The board's files: the bundle's
``zo.py``, ``ft.py``, ``spec.py``, ``head.bin``, plus its data set ``d.bin`` (n x cols int8) and ``y.bin`` (labels).
"""

from __future__ import annotations

from collections.abc import Sequence

from hw.repl import DeviceError, RawRepl

from .device_agent import Agent
from .mqtt_link import MqttConfig

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

    def _seed(self, round_seed: int) -> None:
        self._x("gc.collect()")  # the parser needs contiguous blocks
        self._x(f"S={round_seed >> 16}<<16|{round_seed & 0xFFFF}")  # small ints

    def probe(self, round_seed: int, k: int, mu: float, xs: Sequence[int], ys: Sequence[int]
              ) -> tuple[list[float], float, int]:
        idx = list(xs)
        self._seed(round_seed)
        if idx == list(range(self.n)):
            self._x(f"g,l,n=tuner.probe(S,{k},{mu:.9g},X,Y)")
        else:
            self._x(f"I={idx}")
            self._x(f"g,l,n=tuner.probe(S,{k},{mu:.9g},[X[i] for i in I],[Y[i] for i in I])")
        self._x("gc.collect()")
        vals = self._x("for x in g:print(repr(x))").split()
        loss, n = self._x("print(repr(l),n)\ndel g").split()
        return [float(v) for v in vals], float(loss), int(n)

    def update(self, round_seed: int, gbar_list: Sequence[float], lr: float) -> None:
        self._seed(round_seed)
        self._x("G=[]")
        for g in gbar_list:
            self._x(f"G.append({float(g):.9g})")
        self._x("gc.collect()")
        self._x(f"tuner.update(S,G,{float(lr):.9g})")
        self._x("del G\ngc.collect()")


def repl_agent(cfg: MqttConfig, device_id: str, repl: RawRepl, labels: Sequence[int], cols: int, *,
               board: str = "microbit", firmware: str = "micropython 1.9.2", model_id: int = 1,
               heartbeat_s: float = 30.0, k_max: int = 16) -> Agent:
    """An MQTT fleet device for the board behind ``repl`` (already holding its files; see the module doc)."""
    tuner = ReplTuner(repl, len(labels))
    tuner.boot(cols)
    return Agent(cfg, device_id, tuner, list(range(len(labels))), list(labels), model_id=model_id, caps=0,
                 board=board, firmware=firmware + " (raw REPL)", heartbeat_s=heartbeat_s, k_max=k_max)
