"""The fleet on Flower (docs/flower.md "The fleet on Flower"): on-device ZO fine-tuning rounds run by ``flwr run``.

* :data:`fleet_server_app` (ServerApp) owns the round logic: round ``t``'s seed and learning rate
  (``round_seed`` / ``round_lr`` of a :class:`RoundConfig`) and the server step (``server_step``: the robust
  aggregate in device-id order), the same functions ``toolchain serve``'s :class:`Coordinator` uses.
* :data:`fleet_client_app` (ClientApp, a "fleet node") drives the devices named in its SuperNode's node config
  (serial ports or an MQTT broker's fleet) through the existing :class:`Coordinator` with ``defer_close``: per
  Flower round it brings its devices to the current global version (ROUND_UPDATE of the previous aggregates,
  sealed with the HMAC key), sends ROUND_START, collects each device's ROUND_RESULT under the coordinator's rules
  and replies with them, one entry per device. A final ``train.sync`` message delivers the last update.

Flower's deployment engine starts a fresh ClientApp process for every message, so a node cannot keep its serial
ports or MQTT session open between messages: each message opens the transport again (the devices keep their
state, and a PING tells the new host who is where), and the node's coordinator state lives in its write-ahead log
in the node's state folder (``state-dir``), replayed by the next message's process. Every instruction carries all
the closed rounds' updates (``4k + 36`` bytes of arrays per round), so a node that lost that folder catches up.

Only seeds and scalars travel: server -> node the round's parameters and the updates, node -> server the
devices' scalar vectors (an ``ArrayRecord``, one float32 array per device id), their loss and sample count (a
``MetricRecord``, lists in device order) and the device ids (a ``ConfigRecord``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.staging import staged
from toolchain.contracts.wire.messages import U30, RoundResult, RoundUpdate
from toolchain.contracts.wire.security import RoundLimits, device_key
from toolchain.fleet import Signer
from toolchain.fleet.coordinator import (
    AGGREGATORS,
    Coordinator,
    RoundConfig,
    check_result,
    round_lr,
    round_seed,
    server_step,
)
from toolchain.fleet.mqtt_link import auth_from_args
from toolchain.fleet.transports import OnlyDevices
from toolchain.learning.flower.apps import wait_for_nodes
from toolchain.learning.flower.launch import (
    CONNECTION,
    flwr_bin,
    offline_env,
    wait_for_run,
    write_flower_app,
    write_flwr_home,
)
from toolchain.learning.flower.polling import send_and_receive
from toolchain.pipelines.serve import check_topic_level, open_fleet

ROUND = MessageType.TRAIN  # one Flower round = one fleet round on every node's devices
SYNC = f"{MessageType.TRAIN}.sync"  # after the last round: deliver the last update, report who has not applied it
APP_MODULE = "toolchain_fleet_app"


# ---- the run (ServerApp side) ---------------------------------------------------------------------------------
# run-config keys (flwr run --run-config / the generated app's pyproject) -> RoundConfig fields
RUN_KEYS = {"rounds": "rounds", "k": "k", "mu": "mu", "lr": "lr", "schedule": "schedule", "batch": "batch",
            "seed": "master_seed", "aggregator": "aggregator", "clip": "clip"}


@dataclass
class FleetRun:
    cfg: RoundConfig
    out: Path
    nodes: int = 1  # fleet nodes (SuperNodes) to wait for; each round asks all of them
    node_timeout: float = 300.0  # wait this long for the SuperNodes to connect
    round_timeout: float = 900.0  # a node's reply to one round (it waits for its devices within this)


def fleet_run(run_config: dict[str, Any]) -> FleetRun:
    """The run from Flower's run config; unknown keys and out-of-range values are one ToolchainError line."""
    known = {*RUN_KEYS, "out", "nodes", "node-timeout", "round-timeout"}
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ToolchainError(f"unknown run-config key(s) {unknown}; use {sorted(known)}")
    cfg = RoundConfig(**{RUN_KEYS[k]: v for k, v in run_config.items() if k in RUN_KEYS})
    cfg.rounds, cfg.k, cfg.batch, cfg.master_seed = int(cfg.rounds), int(cfg.k), int(cfg.batch), int(cfg.master_seed)
    cfg.mu, cfg.lr, cfg.clip = float(cfg.mu), float(cfg.lr), float(cfg.clip)
    if not 1 <= cfg.rounds < U30 or not 1 <= cfg.k <= 256 or not 1 <= cfg.batch <= 1024:
        raise ToolchainError(f"rounds {cfg.rounds} / k {cfg.k} / batch {cfg.batch} out of range (1..2^30-1, 1..256, "
                             "1..1024)")
    lim = RoundLimits()  # what devices accept: outside it every device answers ERROR(RANGE) to every round
    if not (lim.mu_min <= cfg.mu <= lim.mu_max and 0 < cfg.lr <= lim.lr_max):
        raise ToolchainError(f"mu {cfg.mu:g} / lr {cfg.lr:g} out of range ([{lim.mu_min:g}, {lim.mu_max:g}], "
                             f"(0, {lim.lr_max:g}])")
    if cfg.aggregator not in AGGREGATORS:
        raise ToolchainError(f"aggregator '{cfg.aggregator}': use one of {', '.join(AGGREGATORS)}")
    if not str(run_config.get("out", "")):
        raise ToolchainError("the fleet run needs out = a folder (the ServerApp writes it; relative: to its "
                             "working directory)")
    out = Path(str(run_config["out"])).expanduser().resolve()
    return FleetRun(cfg, out, int(run_config.get("nodes", 1)), float(run_config.get("node-timeout", 300.0)),
                    float(run_config.get("round-timeout", 900.0)))


@dataclass
class Closed:
    """A closed round as the nodes need it: its ROUND_UPDATE and the aggregate's loss, n and devices (node logs)."""

    update: RoundUpdate
    loss: float
    n: int
    devices: list[str]
    clipped: list[str] = field(default_factory=list)


def instruction(cfg: RoundConfig, t: int, closed: list[Closed]) -> RecordDict:
    """Round ``t`` (``t = cfg.rounds + 1``: the final sync) for a node: the round's parameters (``ConfigRecord``)
    and every closed round's update (``ArrayRecord`` "updates": round, seed, lr, gbar [m, k], loss, n)."""
    conf = {"round": t, "rounds": cfg.rounds, "k": cfg.k, "mu": cfg.mu, "batch": cfg.batch,
            "closed": json.dumps([[c.devices, c.clipped] for c in closed])}
    if t <= cfg.rounds:
        conf.update({"seed": round_seed(cfg, t), "lr": round_lr(cfg, t)})
    rec: dict[str, Any] = {"config": ConfigRecord(conf)}
    if closed:
        rec["updates"] = ArrayRecord({
            "round": Array(np.array([c.update.round_id for c in closed], np.int64)),
            "seed": Array(np.array([c.update.seed for c in closed], np.int64)),
            "lr": Array(np.array([c.update.lr for c in closed], np.float32)),
            "gbar": Array(np.array([c.update.gbar for c in closed], np.float32).reshape(len(closed), cfg.k)),
            "loss": Array(np.array([c.loss for c in closed], np.float64)),
            "n": Array(np.array([c.n for c in closed], np.int64)),
        })
    return RecordDict(rec)


def closed_from(content: RecordDict) -> list[Closed]:
    c = content["config"]
    if "updates" not in content:
        return []
    a = {k: v.numpy() for k, v in content["updates"].items()}
    extra = json.loads(str(c["closed"]))
    # (float32 -> Python float is exact: the update is bit for bit the one the ServerApp computed)
    return [Closed(RoundUpdate(int(a["round"][i]), int(a["seed"][i]), float(a["lr"][i]),
                               tuple(float(v) for v in a["gbar"][i])), float(a["loss"][i]), int(a["n"][i]),
                   list(extra[i][0]), list(extra[i][1])) for i in range(len(a["round"]))]


def results_record(t: int, results: dict[str, RoundResult], refused: dict[str, int]) -> RecordDict:
    """A node's reply to round ``t``: per device (device-id order) its scalars, loss and n."""
    order = sorted(results)
    return RecordDict({
        "scalars": ArrayRecord({d: Array(np.asarray(results[d].scalars, np.float32)) for d in order}),
        "metrics": MetricRecord({"loss": [float(results[d].loss) for d in order],
                                 "n": [int(results[d].n_samples) for d in order]}),
        "config": ConfigRecord({"round": t, "devices": json.dumps(order), "refused": json.dumps(refused)}),
    })


def results_from(msg: Message, t: int) -> tuple[dict[str, RoundResult], dict[str, int]]:
    c = msg.content["config"]
    order = list(json.loads(str(c["devices"])))
    m = msg.content["metrics"]
    scalars = msg.content["scalars"]
    if int(c["round"]) != t or len(order) != len(m["loss"]) or len(order) != len(m["n"]):
        raise ToolchainError(f"round {t}: a fleet node's reply does not add up (round {c['round']}, "
                             f"{len(order)} devices)")
    out = {d: RoundResult(t, tuple(float(v) for v in scalars[d].numpy()), float(m["loss"][i]), int(m["n"][i]))
           for i, d in enumerate(order)}
    return out, dict(json.loads(str(c["refused"])))


def _reply_ok(reply: Message, what: str) -> None:
    if reply.has_error():
        raise ToolchainError(f"a fleet node failed during {what}: {reply.error.reason}")


def serve_fleet(grid: Grid, run: FleetRun) -> dict:
    """The server side: every round asks every node, checks and merges the devices' results, runs the server
    step, and finally syncs the devices; writes ``run.out`` (rounds.jsonl, summary.json) when all is done."""
    cfg = run.cfg
    nodes = wait_for_nodes(grid, run.nodes, run.node_timeout, "the run has nodes = {n}")
    log(INFO, "fleet: %d node(s), %d round(s), k %d", len(nodes), cfg.rounds, cfg.k)
    closed: list[Closed] = []
    rounds: list[dict] = []
    t0 = time.monotonic()
    for t in range(1, cfg.rounds + 1):
        tr = time.monotonic()
        seed, lr = round_seed(cfg, t), round_lr(cfg, t)
        msgs = [Message(instruction(cfg, t, closed), dst_node_id=n, message_type=ROUND, group_id=str(t))
                for n in nodes]
        results: dict[str, RoundResult] = {}
        refused: dict[str, dict[str, int]] = {}
        where: dict[str, int] = {}
        for reply in send_and_receive(grid, msgs, timeout=run.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():  # (like a node that did not answer: left out of this round; the next
                # instruction's updates bring its devices along)
                log(WARNING, "fleet: round %d: node %s failed: %s", t, node, reply.error.reason)
                continue
            got, refused[str(node)] = results_from(reply, t)
            for d, res in got.items():
                if d in where:  # one device id on two nodes: which one is the device? neither counts
                    raise ToolchainError(f"round {t}: device {d} answered through nodes {where[d]} and {node}")
                why = check_result(res, cfg.k, cfg.batch)  # (the node checked too: a node is not trusted blindly)
                if why is not None:
                    raise ToolchainError(f"round {t}: node {node} relayed an invalid result of {d}: {why}")
                where[d], results[d] = node, res
        if not results:
            raise ToolchainError(f"round {t}: no device results from the {len(nodes)} fleet node(s) within "
                                 f"{run.round_timeout:g} s")
        if len(refused) < len(nodes):
            log(WARNING, "fleet: round %d closes without %d node(s)", t, len(nodes) - len(refused))
        upd, agg, clipped = server_step(t, seed, lr, results, cfg.aggregator, cfg.clip, cfg.batch)
        order = sorted(results)
        closed.append(Closed(upd, float(agg.loss), int(agg.n), order, clipped))
        rounds.append({"round": t, "seed": upd.seed, "lr": upd.lr, "gbar": list(upd.gbar), "loss": float(agg.loss),
                       "n": int(agg.n), "devices": order, "clipped": clipped,
                       "per_device": {d: {"scalars": list(results[d].scalars), "loss": results[d].loss,
                                          "n": results[d].n_samples, "node": where[d]} for d in order},
                       "refused": refused, "duration_s": round(time.monotonic() - tr, 3)})
        log(INFO, "fleet: round %d closed: loss %.4f from %d device(s)%s", t, agg.loss, len(order),
            f" (clipped {', '.join(clipped)})" if clipped else "")
    unacked: list[str] = []
    msgs = [Message(instruction(cfg, cfg.rounds + 1, closed), dst_node_id=n, message_type=SYNC) for n in nodes]
    for reply in send_and_receive(grid, msgs, timeout=run.round_timeout):
        _reply_ok(reply, "the final sync")
        unacked += json.loads(str(reply.content["config"]["unacked"]))
    summary = {"rounds": len(rounds), "loss": [r["loss"] for r in rounds],
               "updates": [{k: r[k] for k in ("round", "seed", "lr", "gbar")} for r in rounds],
               "nodes": len(nodes), "unacked": sorted(unacked), "wall_s": round(time.monotonic() - t0, 1),
               "config": {"rounds": cfg.rounds, "k": cfg.k, "mu": cfg.mu, "lr": cfg.lr, "schedule": cfg.schedule,
                          "batch": cfg.batch, "seed": cfg.master_seed, "aggregator": cfg.aggregator,
                          "clip": cfg.clip}}
    with staged(run.out) as tmp:  # nothing in out unless the whole run succeeded
        (tmp / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def make_fleet_server_app() -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve_fleet(grid, fleet_run(dict(context.run_config)))

    return app


# ---- the fleet node (ClientApp side) --------------------------------------------------------------------------
@dataclass
class NodeSettings:
    """A fleet node's devices and keys, from its SuperNode's ``--node-config`` (docs/flower.md)."""

    transport: str  # serial (ports) | mqtt (broker + fleet)
    ports: list[str] = field(default_factory=list)
    baud: int = 115200
    broker: str = "127.0.0.1:1883"
    fleet: str = "default"
    prefix: str = "tinyml"
    auth: dict = field(default_factory=dict)  # MqttConfig username / password / tls (as serve's --mqtt-* / --tls-*)
    devices: list[str] = field(default_factory=list)  # the only device ids this node drives ([]: whoever answers)
    hmac_key: bytes | None = None
    per_device_keys: bool = False
    model: bytes | None = None
    model_id: int = 1
    min_devices: int = 1
    deadline: float = 60.0
    timeout: float = 600.0
    state_dir: Path | None = None


def _words(v: object) -> list[str]:
    return [w for w in str(v).replace(",", " ").split() if w]


def _read(name: str, path: str, limit: int) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ToolchainError(f"fleet node: cannot read {name} {path}: {exc.strerror or exc}") from None
    if not data or len(data) > limit:
        raise ToolchainError(f"fleet node: {name} {path} is {len(data)} bytes; expected 1..{limit}")
    return data


def node_settings(conf: dict[str, Any]) -> NodeSettings:
    """``ports`` (serial, comma- or space-separated) or ``broker`` (+ ``fleet``, ``prefix``, and the broker's
    ``mqtt-user`` / ``mqtt-password-file`` / ``tls-ca`` / ``tls-cert`` / ``tls-key``): the transport;
    ``devices``: the ids it may drive; ``hmac-key`` / ``per-device-keys``, ``model`` / ``model-id``; ``min-devices``
    (default: as many as ports or listed devices), ``deadline``, ``timeout`` (s); ``state-dir``."""
    ports, devices = _words(conf.get("ports", "")), _words(conf.get("devices", ""))
    if not ports and "broker" not in conf:
        raise ToolchainError("a fleet node needs ports='/dev/ttyACM0,...' or broker='HOST:PORT' in its node config")
    s = NodeSettings("serial" if ports else "mqtt", ports=ports, devices=devices)
    s.baud = int(conf.get("baud", s.baud))
    s.broker, s.fleet, s.prefix = (str(conf.get(k, getattr(s, k))) for k in ("broker", "fleet", "prefix"))
    if s.transport == "mqtt":
        check_topic_level(s.fleet, "fleet")
        check_topic_level(s.prefix, "prefix")
        # the broker's login and TLS: serve's options under the same names, checked by the same function
        names = ("mqtt-user", "mqtt-password-file", "tls-ca", "tls-cert", "tls-key")
        args = argparse.Namespace(**{k.replace("-", "_"): (str(conf[k]) if conf.get(k) else None) for k in names})
        try:
            s.auth = auth_from_args(args)
        except ValueError as exc:
            raise ToolchainError(f"fleet node: {exc}") from None
    if conf.get("hmac-key"):
        s.hmac_key = _read("hmac-key", str(conf["hmac-key"]), 4096).strip()
    s.per_device_keys = bool(conf.get("per-device-keys", False))
    if conf.get("model"):
        s.model = _read("model", str(conf["model"]), 1 << 24)
        if s.hmac_key is None:
            raise ToolchainError("fleet node: model needs hmac-key (devices never accept an unsigned model)")
    s.model_id = int(conf.get("model-id", 1))
    s.min_devices = int(conf.get("min-devices", len(devices) or len(ports) or 1))
    s.deadline, s.timeout = float(conf.get("deadline", s.deadline)), float(conf.get("timeout", s.timeout))
    if conf.get("state-dir"):
        s.state_dir = Path(str(conf["state-dir"])).expanduser()
    return s


def node_round(s: NodeSettings, state: Path, content: RecordDict, progress: Any = sys.stderr) -> RecordDict:
    """One instruction on this node's devices: apply the closed rounds' updates not applied yet, then run round
    ``t`` up to its results (or, after the last round, wait until the devices applied the last update)."""
    c = content["config"]
    t, rounds = int(c["round"]), int(c["rounds"])
    cfg = RoundConfig(rounds=rounds, k=int(c["k"]), mu=float(c["mu"]), batch=int(c["batch"]), per_round=1.0,
                      min_devices=s.min_devices, deadline_s=s.deadline, model_id=s.model_id)
    key_for = None
    if s.per_device_keys and s.hmac_key is not None:
        master = s.hmac_key
        key_for = (lambda d: device_key(master, d))  # noqa: E731
    signer = Signer(hmac_key=s.hmac_key) if s.hmac_key is not None and key_for is None else None
    fleet = open_fleet(s.transport, s.ports, s.baud, s.broker, s.prefix, s.fleet, s.auth)
    link = OnlyDevices(fleet, s.devices) if s.devices else fleet
    try:
        coord = Coordinator(link, cfg, state, model=s.model, signer=signer, key_for=key_for, progress=progress,
                            defer_close=True)
    except BaseException:
        link.close()
        raise
    try:
        for done in closed_from(content):
            if done.update.round_id >= coord.round:  # (rounds closed by an earlier message are in the WAL)
                coord.close_round(done.update, done.loss, done.n, done.devices, done.clipped)
        if t > rounds:
            coord.run(timeout=s.timeout)
            unacked = coord.unsynced()
            refused = dict(link.refused) if isinstance(link, OnlyDevices) else {}
            return RecordDict({"config": ConfigRecord({"unacked": json.dumps(unacked),
                                                       "refused": json.dumps(refused)})})
        coord.given[t] = (int(c["seed"]), float(c["lr"]))
        coord.run(until=lambda: coord.awaiting == t, timeout=s.timeout)
        if coord.awaiting != t:
            raise ToolchainError(f"round {t}: the node's devices gave too few results within {s.timeout:g} s")
        refused = dict(link.refused) if isinstance(link, OnlyDevices) else {}
        return results_record(t, dict(coord.results[t]), refused)
    finally:
        coord.close()
        link.close()


def state_dir(s: NodeSettings, context: Context) -> Path:
    """Where this node's coordinator keeps its write-ahead log for this run (replayed by every message)."""
    base = s.state_dir or Path(tempfile.gettempdir()) / "toolchain-fleetnode" / f"node-{context.node_id}"
    return base / f"run-{context.run_id}"


def make_fleet_client_app() -> ClientApp:
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        s = node_settings(dict(context.node_config))
        return Message(node_round(s, state_dir(s, context), msg.content), reply_to=msg)

    app.train()(handle)
    app.train("sync")(handle)
    return app


# The components the fleet app names (generated by write_fleet_app, or flower_app's pyproject).
fleet_server_app = make_fleet_server_app()
fleet_client_app = make_fleet_client_app()


# ---- submitting a fleet run ------------------------------------------------------------------------------------
def write_fleet_app(app_dir: Path, run_config: dict[str, Any]) -> None:
    """A Flower app folder naming the fleet components, with ``run_config`` as its run config."""
    write_flower_app(app_dir, "toolchain.pipelines.fleetnode", "fleet_server_app", "fleet_client_app", run_config,
                     "toolchain-fleet", "tinyml-toolchain: on-device ZO rounds on a fleet", APP_MODULE)


def run_fleet(superlink: str, run_config: dict[str, Any], *, env: dict[str, str] | None = None,
              insecure: bool = False, root_certificates: str | None = None, timeout: float | None = None,
              stream: bool = False) -> dict:
    """Submit a fleet run to the SuperLink at ``superlink`` (its fleet nodes already connected), wait for it and
    return its summary (``out/summary.json``, written by the ServerApp beside the SuperLink)."""
    fleet_run(run_config)  # one-line errors before anything is submitted
    if not insecure and not root_certificates:
        raise ToolchainError("the SuperLink connection needs TLS: give the SuperLink's CA certificate, or ask for "
                             "an insecure connection explicitly")
    with tempfile.TemporaryDirectory(prefix="toolchain-fleet-") as work:
        home = Path(work) / "home"
        write_flwr_home(home, superlink, insecure, root_certificates)
        write_fleet_app(Path(work) / "app", run_config)
        env = {**(env or {}), **offline_env(home)}
        sub = subprocess.run([flwr_bin("flwr"), "run", str(Path(work) / "app"), CONNECTION, "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=120)
        try:
            run_id = int(json.loads(sub.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise ToolchainError(f"`flwr run` could not submit the fleet run to {superlink}: "
                                 f"{(sub.stdout + sub.stderr).strip()[-600:]}") from None
        status = wait_for_run(run_id, env, timeout, stream)
        if status != "finished:completed":
            raise ToolchainError(f"Flower fleet run {run_id} ended as '{status}'; see the SuperLink's log")
    summary = fleet_run(run_config).out / "summary.json"
    if not summary.exists():
        raise ToolchainError(f"fleet run {run_id} completed but {summary} is not on this machine")
    return json.loads(summary.read_text())
