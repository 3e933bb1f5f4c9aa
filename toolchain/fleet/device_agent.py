"""A fleet device in Python (docs/fleet.md): an MQTT endpoint (paho-mqtt, QoS 1, last will) around a fine-tuner
with the ``FineTuner`` API (``probe``, ``update``). Used by the Jetson agent (``device_runtime/jetson/agent.py``,
``JetsonFineTuner``) and by the raw-REPL proxy for boards too small for the protocol stack (micro:bit v1).

Same behaviour as the MicroPython app (``device_runtime/micropython/app.py``): HELLO with capabilities,
ROUND_START -> ``probe`` -> ROUND_RESULT, ROUND_UPDATE -> ``update`` (in round order, acked), STATUS heartbeat,
PING -> HELLO + STATUS, ERROR for what it rejects (out-of-range rounds, rounds at the wrong model version).
Models arrive signed (``Verifier``: Ed25519 on Jetsons); unsigned ones are never accepted.
"""

from __future__ import annotations

import queue
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from toolchain.contracts.wire.messages import (
    CAP_SIGNED,
    E_AUTH,
    E_BAD_MESSAGE,
    E_INTERNAL,
    E_NO_MODEL,
    E_SEQUENCE,
    E_UNSUPPORTED,
    FMT_ONNX,
    MAX_ERROR_TEXT,
    ST_IDLE,
    ST_TRAINING,
    T_ROUND_UPDATE,
    T_SIGNED,
    Ack,
    Error,
    Hello,
    Message,
    ModelBegin,
    ModelChunk,
    ModelCommit,
    Ping,
    RoundResult,
    RoundStart,
    RoundUpdate,
    Signed,
    Status,
    decode,
    encode,
)
from toolchain.contracts.wire.security import ModelReceiver, RoundLimits, Verifier, check_round, check_update, unseal
from toolchain.fleet.mqtt_link import MqttConfig, RawMqttDevice

RUNTIME_VERSION = (0, 2, 0)


def _text(s: str) -> str:
    """An ERROR text: printable ASCII, at most MAX_ERROR_TEXT bytes, never empty."""
    t = "".join(c if " " <= c <= "~" else "?" for c in s)[:MAX_ERROR_TEXT].strip()
    return t or "error"


class Agent:
    """``tuner``: ``probe(seed, k, mu, xs, ys)`` / ``update(seed, gbar, lr)``; ``xs``/``ys``: the local data set."""

    def __init__(self, cfg: MqttConfig, device_id: str, tuner: Any, xs: Sequence[Any], ys: Sequence[int], *,
                 model_id: int = 1, caps: int = 0, board: str = "python", firmware: str = "",
                 verifier: Verifier | None = None, heartbeat_s: float = 30.0, k_max: int = 128,
                 load: Callable[[bytes], Any] | None = None, model_fmt: int = FMT_ONNX,
                 round_key: bytes | None = None) -> None:
        self.tuner, self.xs, self.ys = tuner, list(xs), list(ys)
        self.model_id = model_id if tuner is not None else 0
        self.applied = 0
        self.state = ST_IDLE
        # with a (per-device) key, ROUND_START / ROUND_UPDATE count only inside a SIGNED whose tag verifies
        self.round_key = round_key
        self.caps = caps | (CAP_SIGNED if round_key else 0)
        self.heartbeat_s = heartbeat_s
        self.board = board
        self.firmware = firmware or f"python {sys.version.split()[0]}"
        self.session = random.randrange(1 << 16)
        self.t0 = time.monotonic()
        self.limits = RoundLimits(max_k=k_max)
        self.receiver = ModelReceiver(verifier or Verifier())
        self.load, self.model_fmt = load, model_fmt
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.dev = RawMqttDevice(cfg, device_id, self.inbox.put)
        self.device_id = device_id
        self.rounds_done = 0
        self.errors: list[str] = []

    # -- sending
    def send(self, msg: Message) -> None:
        self.dev.publish_up(encode(msg))

    def hello(self) -> None:
        self.send(Hello(self.device_id, self.board, self.firmware[:32], RUNTIME_VERSION, 0, 4096, self.caps,
                        self.session))

    def status(self) -> None:
        self.send(Status(self.state, int(time.monotonic() - self.t0), 0, self.applied, self.model_id))

    # -- receiving
    def handle(self, raw: bytes) -> None:
        try:
            msg = decode(raw)
        except Exception:  # noqa: BLE001 - ProtocolError and anything a hostile payload triggers
            self.send(Error(E_BAD_MESSAGE, raw[1] if len(raw) > 1 else 0, 0, "malformed"))
            return
        signed = False
        if isinstance(msg, Signed):
            inner = unseal(self.round_key, self.device_id, self.session, msg) if self.round_key else None
            if inner is None:
                self.send(Error(E_AUTH, T_SIGNED, 0, "bad signature" if self.round_key else "no key"))
                return
            try:
                msg = decode(inner)
            except Exception:  # noqa: BLE001 - signed by the host, but still checked like any payload
                self.send(Error(E_BAD_MESSAGE, T_SIGNED, 0, "malformed inner message"))
                return
            if not isinstance(msg, RoundStart | RoundUpdate):
                self.send(Error(E_BAD_MESSAGE, T_SIGNED, 0, "SIGNED carries rounds only"))
                return
            signed = True
        if self.round_key and isinstance(msg, RoundStart | RoundUpdate) and not signed:
            self.send(Error(E_AUTH, msg.TYPE, msg.round_id, "unsigned; this device takes signed rounds"))
            return
        if isinstance(msg, Ping):
            self.hello()
            self.status()
        elif isinstance(msg, RoundStart):
            self.round(msg)
        elif isinstance(msg, RoundUpdate):
            self.update(msg)
        elif isinstance(msg, ModelBegin | ModelChunk | ModelCommit):
            if self.load is None or isinstance(msg, ModelBegin) and msg.fmt != self.model_fmt:
                self.send(Error(E_UNSUPPORTED, msg.TYPE, msg.model_id, "model format not supported"))
                return
            answer = self.receiver.handle(msg)
            if isinstance(answer, Ack) and self.receiver.model is not None:
                try:
                    tuner = self.load(self.receiver.model)
                except Exception as exc:  # noqa: BLE001 - signed but does not load (a corrupt or foreign model)
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    self.send(Error(E_INTERNAL, msg.TYPE, answer.ref_id, _text(f"model does not load: {first}")))
                    return  # the previous model stays
                self.tuner = tuner
                self.model_id, self.applied = answer.ref_id, 0
            if answer is not None:
                self.send(answer)
        else:
            self.send(Error(E_BAD_MESSAGE, getattr(msg, "TYPE", 0), 0, "not a downlink message"))

    def round(self, msg: RoundStart) -> None:
        bad = check_round(msg, self.limits)
        if bad is not None:
            self.send(bad)
        elif self.tuner is None:
            self.send(Error(E_NO_MODEL, msg.TYPE, msg.round_id, "no model"))
        elif msg.round_seed is None or msg.steps != 1:
            self.send(Error(E_UNSUPPORTED, msg.TYPE, msg.round_id, "explicit seeds / steps"))
        elif msg.round_id != self.applied + 1:
            self.send(Error(E_SEQUENCE, msg.TYPE, msg.round_id, f"at version {self.applied}"))
        else:
            self.state = ST_TRAINING
            n = len(self.xs)
            if msg.batch >= n:
                xs, ys = self.xs, self.ys
            else:
                b = ((msg.round_id - 1) * msg.batch) % n
                ix = [(b + i) % n for i in range(msg.batch)]
                xs, ys = [self.xs[i] for i in ix], [self.ys[i] for i in ix]
            g, loss, cnt = self.tuner.probe(msg.round_seed, msg.k, msg.mu, xs, ys)
            self.state = ST_IDLE
            self.rounds_done += 1
            self.send(RoundResult(msg.round_id, tuple(g), float(loss), int(cnt)))

    def update(self, u: RoundUpdate) -> None:
        # docs/protocol.md ROUND_UPDATE: RANGE, then a repeat is acked, then SEQUENCE (gap or no model), then apply
        bad = check_update(u, self.limits)
        if bad is not None:
            self.send(bad)
        elif u.round_id <= self.applied:
            self.send(Ack(T_ROUND_UPDATE, u.round_id))
        elif self.tuner is None or u.round_id != self.applied + 1:
            self.send(Error(E_SEQUENCE, T_ROUND_UPDATE, u.round_id,
                            "no model" if self.tuner is None else f"at version {self.applied}"))
        else:
            self.tuner.update(u.seed, list(u.gbar), u.lr)
            self.applied = u.round_id
            self.send(Ack(T_ROUND_UPDATE, u.round_id))

    def run(self, stop: Any = None) -> None:
        self.dev.start(timeout=30)
        self.hello()
        self.status()
        last = time.monotonic()
        while stop is None or not stop.is_set():
            try:
                raw = self.inbox.get(timeout=0.2)
            except queue.Empty:
                raw = None
            if raw is not None:
                try:
                    self.handle(raw)
                except Exception as exc:  # noqa: BLE001 - the device stays up and says what went wrong
                    self.state = ST_IDLE
                    self.errors.append(repr(exc))
                    self.send(Error(E_INTERNAL, raw[1] if len(raw) > 1 else 0, 0,
                                    _text(f"{type(exc).__name__}: {exc}")))
            if time.monotonic() - last > self.heartbeat_s:
                last = time.monotonic()
                self.status()
        self.dev.stop()
