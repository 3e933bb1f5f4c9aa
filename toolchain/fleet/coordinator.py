"""Federated ZO rounds over a fleet (docs/fleet.md): partial participation, deadlines, stragglers, dropouts,
a write-ahead log and resume after a host restart.

Round ``t`` (ids from 1): pick participants among the devices that are *ready* (run the current model at
version ``t - 1``), send ``ROUND_START`` (round seed ``S_t = derive(master_seed, t)``), collect ``ROUND_RESULT``
until every participant answered or the deadline passed with at least ``min_results``; aggregate n-weighted in
device-id order (``toolchain.contracts.zo.aggregate``), log, and broadcast ``ROUND_UPDATE`` to every device. Devices that
missed updates (offline, rebooted, late) are brought to the current version by replaying the logged updates;
a device without the model gets it (signed) first.

Durability: every counted result and every round start/close is appended to ``wal.jsonl`` and fsync'ed *before*
it takes effect, so a restarted coordinator rebuilds the exact state: results are keyed by (round, device) and
a repeat is counted once, however many times it arrives (QoS 1 redelivery, a re-sent ROUND_START, a
restarted host asking again). ``rounds.jsonl`` has one line per closed round.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np

from toolchain.contracts.wire.errors import ProtocolError
from toolchain.contracts.wire.messages import (
    CAP_HMAC,
    CAP_SIGNED,
    E_BAD_MESSAGE,
    E_NO_MODEL,
    E_RANGE,
    E_SEQUENCE,
    E_UNSUPPORTED,
    FMT_SMF,
    T_MODEL_COMMIT,
    T_ROUND_START,
    T_ROUND_UPDATE,
    Ack,
    Error,
    Hello,
    Message,
    Ping,
    RoundResult,
    RoundStart,
    RoundUpdate,
    Status,
    encode,
)
from toolchain.contracts.wire.security import Signer, model_transfer, seal
from toolchain.contracts.zo import ClientReply, aggregate, derive, learning_rate

AGGREGATORS = ("clip", "median", "mean")


def robust_aggregate(replies: list[ClientReply], how: str = "clip", clip: float = 3.0) -> tuple[ClientReply, list[int]]:
    """The server step over one round's replies: ``(aggregate, indices of replies that were clipped)``.

    ``clip``: a reply whose scalar vector is longer than ``clip`` x the *lower* median of the round's norms is
    scaled down to that length, then the n-weighted mean (``toolchain.contracts.zo.aggregate``). The lower median (the
    ``(m-1)//2``-th smallest of m norms) is an honest norm as long as fewer than half of the replies are bad, also
    with two replies, where the plain median would be half the attacker's. ``median``: coordinate-wise median
    (unweighted), loss and n as the mean. ``mean``: no bound (the old step).
    """
    if how == "mean":
        return aggregate(replies), []
    if how == "median":
        mean = aggregate(replies)
        med = np.median(np.stack([r.scalars.astype(np.float64) for r in replies]), axis=0)
        return ClientReply(med.astype(np.float32), mean.loss, mean.n), []
    if how != "clip":
        raise ValueError(f"unknown aggregator '{how}'; use one of {', '.join(AGGREGATORS)}")
    norms = [float(np.linalg.norm(r.scalars.astype(np.float64))) for r in replies]
    bound = clip * sorted(norms)[(len(norms) - 1) // 2]
    out, clipped = [], []
    for i, (r, nrm) in enumerate(zip(replies, norms, strict=True)):
        if nrm > bound:
            clipped.append(i)
            scale = bound / nrm if nrm > 0 else 0.0
            r = ClientReply((r.scalars.astype(np.float64) * scale).astype(np.float32), r.loss, r.n)
        out.append(r)
    return aggregate(out), clipped


def check_result(msg: RoundResult, k: int, batch: int) -> str | None:
    """Why a ROUND_RESULT cannot count (None: it can): the wrong K, a non-finite scalar or loss, a negative loss, or
    ``n`` outside ``1..batch``. A device takes ``batch`` samples a round, or all it has if fewer (docs/fleet.md),
    so ``n`` can be no larger, and the weight of one device in the mean is bounded by it. The coordinator checks
    every result with it; a server that aggregates results relayed by others (the Flower fleet node) checks
    them again with the same rules."""
    if len(msg.scalars) != k or not all(np.isfinite(msg.scalars)) or not np.isfinite(msg.loss) or msg.loss < 0:
        return f"malformed ({len(msg.scalars)} scalars, loss {msg.loss})"
    if not 1 <= msg.n_samples <= batch:
        return f"n {msg.n_samples} outside 1..{batch} (the batch asked)"
    return None


def server_step(r: int, seed: int, lr: float, results: dict[str, RoundResult], aggregator: str = "clip",
                clip: float = 3.0, batch: int = 1024) -> tuple[RoundUpdate, ClientReply, list[str]]:
    """Round ``r``'s server step: ``(ROUND_UPDATE, the aggregate, devices whose update was clipped)``.

    The replies are aggregated in device-id order (float sums depend on the order, and this one does not depend
    on who answered first), ``n`` capped at ``batch`` again (results recovered from a WAL written before the
    bound was checked). ``Coordinator`` closes its rounds with it, and so does the Flower fleet ServerApp
    (docs/flower.md "The fleet on Flower"): one function, so both give bit-identical updates."""
    order = sorted(results)
    agg, clipped_ix = robust_aggregate(
        [ClientReply(np.asarray(results[d].scalars, np.float32), float(results[d].loss),
                     min(results[d].n_samples, batch)) for d in order], aggregator, clip)
    upd = RoundUpdate(r, seed, float(np.float32(lr)), tuple(float(v) for v in np.asarray(agg.scalars, np.float32)))
    return upd, agg, [order[i] for i in clipped_ix]


class Fleet(Protocol):
    def send(self, device: str, raw: bytes) -> None: ...
    def recv(self, timeout: float) -> tuple[str, Message | RoundUpdate] | None: ...
    def devices(self) -> list[str]: ...


@dataclass
class RoundConfig:
    rounds: int = 5
    k: int = 8
    mu: float = 1e-3
    lr: float = 0.5
    schedule: str = "constant"
    batch: int = 32
    master_seed: int = 2024
    per_round: float = 1.0  # fraction of ready devices asked each round (partial participation)
    min_results: int = 1  # a round closes at the deadline only with at least this many results
    min_devices: int = 1  # wait for this many ready devices before opening a round (up to start_timeout)
    deadline_s: float = 60.0  # results after this are stragglers (if min_results arrived)
    start_timeout_s: float = 120.0
    resend_s: float = 10.0  # re-send ROUND_START to silent participants, PING silent devices
    model_id: int = 1
    chunk_size: int = 128
    # Server step (docs/fleet.md "Only what was asked counts"): "clip" scales each result's scalar vector down
    # to at most ``clip`` x the lower median of that round's norms, then n-weighted mean; "median" is the
    # coordinate-wise median; "mean" the plain n-weighted mean (one bad client can move the model anywhere).
    aggregator: str = "clip"
    clip: float = 3.0
    max_devices: int = 256  # tracked device ids; an id flood evicts ids that are not ready, not the round's devices
    final_wait_s: float = 30.0  # after the last round: wait this long for online devices to ack the last update


def round_seed(cfg: RoundConfig, r: int) -> int:
    """``S_r = derive(master_seed, r)`` (docs/zo.md): round ``r``'s seed."""
    return derive(cfg.master_seed, r)


def round_lr(cfg: RoundConfig, r: int) -> float:
    """Round ``r``'s learning rate under ``cfg.schedule`` (ROUND_START carries it; ROUND_UPDATE its float32)."""
    return learning_rate(r - 1, cfg.lr, cfg.schedule, total=cfg.rounds)  # type: ignore[arg-type]


@dataclass
class DeviceState:
    device_id: str
    session: int | None = None
    caps: int = 0
    max_message: int = 160
    model_id: int | None = None  # None: unknown (ask with PING)
    applied: int | None = None  # last round update applied
    boots: int = 0
    last_seen: float = 0.0
    asked: float = 0.0  # when we last PINGed / sent a round
    transfer: int = 0  # model transfers sent
    synced: float = -1e9  # when we last sent it a model or updates
    no_update: bool = False  # answered ROUND_UPDATE with BAD_MESSAGE: a protocol 1.0 device, never ready again
    refuses: str = ""  # answered ROUND_START with ERROR(RANGE / UNSUPPORTED): its text; left out until it reboots
    info: dict = field(default_factory=dict)


class Wal:
    """Append-only JSON lines, flushed and fsync'ed per record; replayed at start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: everything before it is valid
        self._f = open(path, "a")  # noqa: SIM115 - held for the coordinator's life

    def append(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.append(rec)

    def close(self) -> None:
        self._f.close()


class Coordinator:
    def __init__(self, fleet: Fleet, cfg: RoundConfig, out_dir: Path, *, model: bytes | None = None,
                 signer: Signer | None = None, progress: TextIO | None = sys.stderr,
                 now: Callable[[], float] = time.monotonic, key_for: Callable[[str], bytes] | None = None,
                 defer_close: bool = False) -> None:
        self.fleet, self.cfg, self.now = fleet, cfg, now
        # defer_close: the server step happens elsewhere (a Flower ServerApp aggregates several nodes' devices).
        # A round whose results are in stops there (``awaiting``) until close_round() brings its update.
        self.defer_close = defer_close
        self.awaiting: int | None = None
        # round -> (seed, lr) decided outside (the Flower ServerApp owns them); other rounds: from cfg
        self.given: dict[int, tuple[int, float]] = {}
        self.model, self.signer = model, signer
        # per-device keys (security.device_key of a master): models are signed, and ROUND_START / ROUND_UPDATE
        # sealed, with the receiving device's own key; without it, with the signer's (fleet-wide) HMAC key
        self.key_for = key_for
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.devices: dict[str, DeviceState] = {}
        self.updates: dict[int, RoundUpdate] = {}  # closed rounds
        self.results: dict[int, dict[str, RoundResult]] = {}
        self.participants: dict[int, list[str]] = {}
        self.started: dict[int, float] = {}
        self.duplicates = 0
        self.late: list[tuple[int, str]] = []
        self.errors: list[tuple[str, Error]] = []
        self.rejected: list[tuple[int, str, str]] = []  # (round, device, why): results that did not count
        self.evicted = 0  # device ids (not ready, not asked) dropped to stay within cfg.max_devices
        self._said: dict[str, int] = {}
        self.wal = Wal(self.out / "wal.jsonl")
        self.round = 1
        self._open = False
        self._deadline = 0.0
        self._last_resend = 0.0
        self._aborted = False
        self.fatal: str | None = None  # why run() gave up on its own (every device refuses the rounds)
        self._recover()
        self.rounds_log = open(self.out / "rounds.jsonl", "a")  # noqa: SIM115

    # -- recovery ---------------------------------------------------------------------------------------------
    def _recover(self) -> None:
        for rec in self.wal.records:
            r = rec["round"]
            if rec["t"] == "start":
                self.participants[r] = list(rec["participants"])
                self.results.setdefault(r, {})
            elif rec["t"] == "result":
                self.results.setdefault(r, {})[rec["device"]] = RoundResult(
                    r, tuple(rec["scalars"]), rec["loss"], rec["n"])
            elif rec["t"] == "close":
                self.updates[r] = RoundUpdate(r, rec["seed"], rec["lr"], tuple(rec["gbar"]))
        self.round = max(self.updates, default=0) + 1
        if self.round in self.participants:
            self._open = True  # resume the open round: its counted results stay counted
            self._deadline = self.now() + self.cfg.deadline_s
            self.started[self.round] = self.now()
            self._log(f"resumed round {self.round} with {len(self.results.get(self.round, {}))} result(s) "
                      f"from the write-ahead log")
        elif self.updates:
            self._log(f"resumed after round {self.round - 1}")

    # -- helpers ----------------------------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        if self.progress is not None:
            print(f"[coordinator] {text}", file=self.progress, flush=True)

    def seed(self, r: int) -> int:
        return self.given[r][0] if r in self.given else round_seed(self.cfg, r)

    def lr(self, r: int) -> float:
        return self.given[r][1] if r in self.given else round_lr(self.cfg, r)

    def _say(self, kind: str, text: str) -> None:
        """Log a line of a kind that a flood can repeat: the first 10, then every power of two (with the count)."""
        n = self._said[kind] = self._said.get(kind, 0) + 1
        if n <= 10 or n & (n - 1) == 0:
            self._log(text if n <= 10 else f"{text} ({n} so far)")

    def _dev(self, d: str) -> DeviceState:
        if d not in self.devices:
            self.devices[d] = DeviceState(d)
        return self.devices[d]

    def _admit(self, d: str) -> bool:
        """Whether to track device ``d``: known ids always; a new one if there is room, or room can be made by
        dropping the least recently seen id that is not ready and not asked in the open round (an id flood from a
        stranger must neither grow memory without bound nor push out the devices in the round)."""
        if d in self.devices or len(self.devices) < self.cfg.max_devices:
            return True
        asked = set(self.participants.get(self.round, ())) if self._open else set()
        stale = [s for s in self.devices.values() if s.device_id not in asked and not self.ready(s.device_id)]
        if not stale:
            self._say("full", f"{d}: ignored, {len(self.devices)} devices tracked (--max-devices)")
            return False
        victim = min(stale, key=lambda s: s.last_seen)
        del self.devices[victim.device_id]
        self.evicted += 1
        self._say("evict", f"{victim.device_id}: dropped (not ready, not asked) to make room for {d}")
        return True

    def _key(self, d: str) -> bytes | None:
        if self.key_for is not None:
            return self.key_for(d)
        return self.signer.hmac_key if self.signer is not None else None

    def _send(self, d: str, msg: Message | RoundUpdate) -> None:
        s = self.devices.get(d)
        if isinstance(msg, RoundStart | RoundUpdate) and s is not None and s.caps & CAP_SIGNED:
            key = self._key(d)
            if key is None:  # it would refuse an unsealed one (ERROR AUTH) and we cannot seal it
                if not s.refuses:
                    s.refuses = "takes only signed rounds and serve has no key (--hmac-key)"
                    self._log(f"{d}: {s.refuses}; left out")
                return
            msg = seal(key, d, s.session or 0, msg)
        self.fleet.send(d, encode(msg))

    def ready(self, d: str) -> bool:
        s = self.devices.get(d)
        return (s is not None and s.session is not None and s.model_id == self.cfg.model_id
                and s.applied == self.round - 1 and not s.no_update and not s.refuses)

    # -- device sync ------------------------------------------------------------------------------------------
    def _sync(self, s: DeviceState, force: bool = False) -> None:
        """Bring a device to model ``cfg.model_id`` at version ``round - 1`` (at most once per resend_s unless forced)."""
        if s.model_id is None or s.applied is None:
            return
        if not force and self.now() - s.synced < self.cfg.resend_s:
            return
        s.synced = self.now()
        if s.model_id != self.cfg.model_id:
            if self.model is None or (self.signer is None and self.key_for is None) or not s.caps & CAP_HMAC:
                s.info["sync"] = "cannot receive the model (flash it)"
                return
            s.transfer += 1
            self._log(f"{s.device_id}: sending model {self.cfg.model_id} ({len(self.model)} bytes)")
            chunk = max(16, min(self.cfg.chunk_size, s.max_message - 8))
            signer = Signer(hmac_key=self.key_for(s.device_id)) if self.key_for is not None else self.signer
            for m in model_transfer(self.model, self.cfg.model_id, signer, chunk_size=chunk, fmt=FMT_SMF):
                self._send(s.device_id, m)
            # ... and a PING: its STATUS confirms the install even if MQTT dedupe drops an ACK equal to an
            # older one (a rebooted device repeats ACK(0x04, id) and ACK(0x12, r) payloads it sent before)
            self._send(s.device_id, Ping())
            s.model_id = None  # until ACK(MODEL_COMMIT) or STATUS
            return
        if s.applied < self.round - 1:
            missing = range(s.applied + 1, self.round)
            self._log(f"{s.device_id}: replaying updates {missing.start}..{missing.stop - 1}")
            for r in missing:
                self._send(s.device_id, self.updates[r])
            self._send(s.device_id, Ping())  # (see above)

    def _ping(self, d: str) -> None:
        self._dev(d).asked = self.now()
        self._send(d, Ping())

    # -- events -----------------------------------------------------------------------------------------------
    def handle(self, d: str, msg: Message | RoundUpdate) -> None:
        if not self._admit(d):
            return
        s = self._dev(d)
        s.last_seen = self.now()
        if isinstance(msg, Hello):
            if msg.session != s.session:
                if s.session is not None:
                    s.boots += 1
                    self._log(f"{d}: rebooted (session {s.session} -> {msg.session})")
                s.session, s.caps, s.max_message = msg.session, msg.caps, msg.max_message
                s.model_id = s.applied = None
                s.no_update = False  # (new firmware, perhaps: a replayed update tells again)
                s.refuses = ""
                self._ping(d)
        elif isinstance(msg, Status):
            if msg.state == 0:
                return
            before = (s.model_id, s.applied)
            s.model_id, s.applied = msg.model_id, msg.round_id
            if s.session is None:
                # a STATUS without its HELLO: we subscribed after the device's HELLO (started or restarted
                # while it runs; its next STATUS, or the one right after its HELLO, is the first we hear). Its
                # caps (SIGNED, HMAC) and session are unknown until it says HELLO again, and rounds sent blind
                # would be unsigned (refused with ERROR AUTH, forever): ask, do not start.
                if self.now() - s.asked > self.cfg.resend_s:
                    self._ping(d)
                return
            if before != (s.model_id, s.applied) or not self.ready(d):
                self._sync(s, force=before != (s.model_id, s.applied))
            if self._open and self.ready(d) and d in self.participants[self.round] \
                    and d not in self.results[self.round]:
                self._start_on(d)
        elif isinstance(msg, Ack):
            if msg.ref_type == T_MODEL_COMMIT and msg.ref_id == self.cfg.model_id:
                s.model_id, s.applied = msg.ref_id, 0
                self._log(f"{d}: model {msg.ref_id} installed")
                self._sync(s, force=True)
            elif msg.ref_type == T_ROUND_UPDATE:
                if s.applied is not None and msg.ref_id == s.applied + 1:
                    s.applied = msg.ref_id
                if self._open and self.ready(d) and d in self.participants[self.round] \
                        and d not in self.results[self.round]:
                    self._start_on(d)
        elif isinstance(msg, RoundResult):
            self._result(d, msg)
        elif isinstance(msg, Error):
            self.errors.append((d, msg))
            if msg.code in (E_RANGE, E_UNSUPPORTED) and msg.ref_type == T_ROUND_START:
                # its limits are narrower than the fleet's (e.g. k above its k_max): asking again cannot help
                s.refuses = msg.text or f"error {msg.code}"
                self._log(f"{d}: refuses round {msg.ref_id} ({s.refuses}); left out until it reboots")
                if self._open and d in self.participants[self.round]:
                    self.participants[self.round].remove(d)
                # (uplink messages are as authentic as the broker's ACL makes them: only before the first close,
                # where it is the parameters' fault, does serve give up on its own)
                known = [x for x in self.devices.values() if x.model_id is not None]
                if known and all(x.refuses for x in known) and not self.updates:
                    self.fatal = (f"every device refuses the round parameters ({s.refuses}); "
                                  "change --k/--mu/--lr/--batch")
                    self._log(self.fatal)
                    self.abort()
            elif msg.code == E_BAD_MESSAGE and msg.ref_type == T_ROUND_UPDATE and not s.no_update:
                s.no_update = True  # we never send a malformed one: its decoder lacks 0x12 (docs/protocol.md)
                self._log(f"{d}: does not know ROUND_UPDATE (protocol 1.0); left out of further rounds")
            elif msg.code in (E_SEQUENCE, E_NO_MODEL):
                self._ping(d)  # out of step: its STATUS tells what to replay or send
            else:
                self._log(f"{d}: ERROR {msg.code} about 0x{msg.ref_type:02x} {msg.ref_id} {msg.text!r}")

    def _reject(self, r: int, d: str, why: str) -> None:
        self.rejected.append((r, d, why))
        del self.rejected[:-1000]  # (a flood of forgeries must not grow this without bound)
        self._say("reject", f"{d}: result for round {r} rejected: {why}")

    def _result(self, d: str, msg: RoundResult) -> None:
        r = msg.round_id
        if r in self.results and d in self.results[r]:
            self.duplicates += 1  # idempotent by (round, device)
            return
        # only what was asked counts: a device sampled for round r, answering round r (docs/fleet.md)
        if d not in self.participants.get(r, ()):
            self._reject(r, d, "not asked for that round" if r in self.participants else "no such round asked")
            return
        if r != self.round or not self._open:
            self.late.append((r, d))  # a straggler after its round closed
            self._log(f"{d}: late result for round {r} ignored")
            return
        why = check_result(msg, self.cfg.k, self.cfg.batch)
        if why is not None:
            self._reject(r, d, why)
            return
        self.wal.append({"t": "result", "round": r, "device": d, "n": msg.n_samples, "loss": msg.loss,
                         "scalars": list(msg.scalars)})
        self.results[r][d] = msg
        self._log(f"round {r}: {d} loss {msg.loss:.4f} n {msg.n_samples} "
                  f"({len(self.results[r])}/{len(self.participants[r])})")

    # -- rounds -----------------------------------------------------------------------------------------------
    def _start_on(self, d: str) -> None:
        c = self.cfg
        self._dev(d).asked = self.now()
        self._send(d, RoundStart(self.round, c.k, c.mu, self.lr(self.round), 1, c.batch,
                                 round_seed=self.seed(self.round)))

    def _open_round(self) -> None:
        ready = sorted(d for d in self.devices if self.ready(d))
        rng = random.Random(self.cfg.master_seed * 1000003 + self.round)
        n = max(1, min(len(ready), round(self.cfg.per_round * len(ready))))
        chosen = sorted(rng.sample(ready, n))
        self.wal.append({"t": "start", "round": self.round, "seed": self.seed(self.round), "participants": chosen,
                         "k": self.cfg.k, "mu": self.cfg.mu, "lr": self.lr(self.round)})
        self.participants[self.round] = chosen
        self.results[self.round] = {}
        self.started[self.round] = self.now()
        self._deadline = self.now() + self.cfg.deadline_s
        self._open = True
        self._log(f"round {self.round}/{self.cfg.rounds} started: {', '.join(chosen)}")
        for d in chosen:
            self._start_on(d)

    def _extend(self) -> None:
        """Deadline passed with too few results: invite every other ready device too and wait again."""
        extra = sorted(d for d in self.devices if self.ready(d) and d not in self.participants[self.round])
        if extra:
            self.participants[self.round] += extra
            self.wal.append({"t": "start", "round": self.round, "seed": self.seed(self.round),
                             "participants": self.participants[self.round], "k": self.cfg.k, "mu": self.cfg.mu,
                             "lr": self.lr(self.round)})
            for d in extra:
                self._start_on(d)
        self._deadline = self.now() + self.cfg.deadline_s
        self._log(f"round {self.round}: deadline passed with {len(self.results[self.round])} result(s); "
                  f"waiting longer{' with ' + ', '.join(extra) if extra else ''}")

    def _close_round(self) -> None:
        """All results in (or the deadline passed with enough): the server step here, or, with ``defer_close``,
        wait for close_round() from outside."""
        r = self.round
        if self.defer_close:
            self._open = False  # (a result arriving now is a straggler, as after a close)
            self.awaiting = r
            self._log(f"round {r}: {len(self.results[r])} result(s) collected; waiting for the server's update")
            return
        upd, agg, clipped = server_step(r, self.seed(r), self.lr(r), self.results[r], self.cfg.aggregator,
                                        self.cfg.clip, self.cfg.batch)
        if clipped:
            self._log(f"round {r}: clipped the update of {', '.join(clipped)} (norm above {self.cfg.clip:g} x "
                      "the round's lower median)")
        self.close_round(upd, float(agg.loss), int(agg.n), sorted(self.results[r]), clipped)

    def close_round(self, upd: RoundUpdate, loss: float, n: int, devices: list[str],
                    clipped: list[str] | None = None) -> None:
        """Close round ``upd.round_id`` (the open one, or one never started here) with ``upd``: write-ahead log,
        ``rounds.jsonl``, ROUND_UPDATE to every device at the version before it (the others are synced).
        ``loss``/``n``/``devices``: the aggregate's, over every device that counted (with a Flower fleet node,
        devices of other nodes too); ``per_device`` lists the results counted here."""
        r = upd.round_id
        if r != self.round:
            raise ValueError(f"round {r} cannot close: round {self.round} is the next one to close")
        res = self.results.get(r, {})
        self.wal.append({"t": "close", "round": r, "seed": upd.seed, "lr": upd.lr, "gbar": list(upd.gbar),
                         "loss": float(loss), "n": int(n), "devices": list(devices)})
        self.updates[r] = upd
        asked = self.participants.get(r, [])
        missing = [d for d in asked if d not in res]
        entry = {
            "round": r, "loss": float(loss), "n": int(n), "devices": list(devices), "participants": asked,
            "stragglers": [d for d in missing if self._dev(d).session is not None],
            "duration_s": round(self.now() - self.started.get(r, self.now()), 3), "lr": upd.lr,
            "duplicates_total": self.duplicates, "late_total": len(self.late),
            "per_device": {d: {"loss": float(res[d].loss), "n": res[d].n_samples} for d in sorted(res)},
            "clipped": list(clipped or []), "rejected_total": len(self.rejected),
        }
        self.rounds_log.write(json.dumps(entry) + "\n")
        self.rounds_log.flush()
        self._open = False
        self.awaiting = None
        self._log(f"round {r} closed: loss {loss:.4f} from {len(devices)} device(s) "
                  f"{'(stragglers: ' + ', '.join(missing) + ')' if missing else ''}")
        self.round = r + 1
        for d, s in self.devices.items():
            if s.applied == r - 1 and s.model_id == self.cfg.model_id:
                self._send(d, upd)
                s.synced = self.now()  # (re-sent by _sync after resend_s until its ACK or STATUS says applied)
            else:
                self._sync(s, force=True)

    def step(self, timeout: float = 0.2) -> None:
        """Handle one incoming message (or time out), then advance the round state machine."""
        got = self.fleet.recv(timeout)
        if got is not None:
            try:
                self.handle(*got)
            except ProtocolError as exc:
                self._log(f"{got[0]}: {exc}")
        now = self.now()
        for d in self.fleet.devices():
            if d not in self.devices and len(self.devices) >= self.cfg.max_devices:
                continue  # (no eviction here: the fleet's online list may hold a flood, evicting would churn)
            s = self._dev(d)
            if (s.session is None or s.model_id is None or s.applied is None) and now - s.asked > self.cfg.resend_s:
                self._ping(d)
        if not self._open:
            if self.awaiting == self.round:
                return  # (defer_close: the server's update for it comes through close_round)
            if self.round > self.cfg.rounds:
                for d in self.unsynced():  # the last update (or a replay) until its ACK / STATUS arrives
                    self._sync(self.devices[d])
                return
            n_ready = sum(1 for d in self.devices if self.ready(d))
            first = self.started.get(-1)
            if first is None:
                self.started[-1] = first = now
            if n_ready >= self.cfg.min_devices or (n_ready and now - first > self.cfg.start_timeout_s):
                self._open_round()
                self.started.pop(-1, None)
            return
        r = self.round
        res, asked = self.results[r], self.participants[r]
        if all(d in res for d in asked) and res:
            self._close_round()
        elif now > self._deadline:
            if len(res) >= self.cfg.min_results:
                self._close_round()
            else:
                self._extend()
        elif now - self._last_resend > self.cfg.resend_s:
            self._last_resend = now
            for d in asked:
                if d not in res:
                    if self.ready(d):
                        self._start_on(d)
                    else:
                        self._ping(d)

    def unsynced(self, unknown: bool = False) -> list[str]:
        """Online devices that do not run the final version yet: at the model but behind (updates re-sent) and,
        with ``unknown``, those whose state is not known yet (PINGed). Devices that cannot get there (another
        model and no transfer possible, a protocol 1.0 decoder) are not waited for."""
        out = []
        for d in self.fleet.devices():
            s = self.devices.get(d)
            if s is None or s.no_update:
                continue
            if s.model_id is None or s.applied is None:
                if unknown:
                    out.append(d)
            elif s.model_id == self.cfg.model_id and s.applied < self.round - 1:
                out.append(d)
        return out

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Run until every round is closed (True), ``until()`` holds, :meth:`abort` or ``timeout`` (False).

        After the last close it keeps going up to ``final_wait_s`` until every online device acknowledged the
        last update (a process that exits at once loses it for the devices whose copy was still in flight);
        devices offline then get it when they are back and serve runs again (resume replays it)."""
        end = None if timeout is None else self.now() + timeout
        while self.round <= self.cfg.rounds and not self._aborted:
            if until is not None and until():
                return False
            if end is not None and self.now() > end:
                return False
            self.step()
        if self.round > self.cfg.rounds:
            drain = self.now() + self.cfg.final_wait_s
            if end is not None:
                drain = min(drain, end)
            # Devices whose state is unknown (rebooted, or all of them on a resume) get one resend_s to answer
            # their PING; after that only devices known to be behind are waited for (an id flood's silent ids
            # must not hold serve up). A coordinator that knows no device yet (started again after the last
            # round) listens for that whole grace: HELLO / STATUS (queued for its persistent session, or answers
            # to its PINGs) take a moment to arrive.
            grace = min(self.now() + self.cfg.resend_s, drain)
            while self.now() < drain and not self._aborted:
                if not self.unsynced(unknown=self.now() < grace) and (self.devices or self.now() >= grace):
                    break
                self.step()
            left = self.unsynced()
            if left:
                self._log(f"final update not acknowledged by {', '.join(left)} (re-sent when serve runs again)")
        return self.round > self.cfg.rounds

    def abort(self) -> None:
        self._aborted = True

    def close(self) -> None:
        self.wal.close()
        self.rounds_log.close()

    # -- inspection -------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"round": self.round, "closed": sorted(self.updates), "duplicates": self.duplicates,
                "late": self.late, "rejected": self.rejected[-20:], "evicted": self.evicted,
                "devices": {d: asdict(s) for d, s in self.devices.items()}}


def read_rounds(out_dir: Path) -> list[dict]:
    p = Path(out_dir) / "rounds.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def counted_results(out_dir: Path) -> list[tuple[int, str]]:
    """Every (round, device) whose result was counted, from the write-ahead log (for audits and tests)."""
    p = Path(out_dir) / "wal.jsonl"
    out = []
    for line in p.read_text().splitlines():
        rec = json.loads(line)
        if rec["t"] == "result":
            out.append((rec["round"], rec["device"]))
    return out

