"""Our strategies as a Flower ``ServerApp`` and their client side as a ``ClientApp`` (Message API, flwr 1.41).

Payloads travel as Flower records: the weights (and masks, when they change) as one ``ArrayRecord``
"arrays" with one array per tensor (the kept values of a sparse tensor; toolchain/learning/flower/records.py), the
metrics as a ``MetricRecord``, and round, seed, payload class and layout as scalars of one ``ConfigRecord``
"config". That is the shape Flower's client mods expect, so a run can switch them on (``RunSpec.extra
["mods"]``, e.g. ``fixedclipping``). The receiver rebuilds the exact payload bytes of the in-process engine
from the records, so the engines stay bit-identical. The client's last masks live in ``context.state``
(the SuperNode keeps it between the messages of a run), so only changed masks travel.

Message types: ``query`` (which partition does this node hold), ``train`` (one round of local
training), ``train.setup`` (a strategy's optional setup exchange before training).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.flower import make_spec, records
from toolchain.learning.flower.driver import (
    TRAIN,
    Incoming,
    NeedMasks,
    NodeExchange,
    Outgoing,
    RunSpec,
    build_server,
    client_runtime,
    client_step,
    resolve_type,
    server_loop,
)
from toolchain.learning.flower.polling import send_and_receive
from toolchain.learning.flower.secagg import MAX_WEIGHT, SECAGG, SecAggExchange, check_secagg, secagg_mod
from toolchain.learning.options import TRAIN_DEFAULTS, FederatedOptions
from toolchain.learning.run_output import write_run

SPEC_KEY = "spec"  # run-config key holding RunSpec JSON (deployment engine)
MASKS_KEY = "toolchain.masks"  # context.state key: the masks this node last received
STATE_KEY = "toolchain.client"  # context.state key: this node's client-side strategy object (never sent)
SETUP_TYPE = f"{MessageType.TRAIN}.setup"
CLIPPING_NORM = "clipping_norm"  # the key Flower's clipping mods read from the instruction's ConfigRecord


def _mod_table() -> dict[str, Callable]:
    from flwr.clientapp.mod import adaptiveclipping_mod, arrays_size_mod, fixedclipping_mod, message_size_mod

    return {"fixedclipping": fixedclipping_mod, "adaptiveclipping": adaptiveclipping_mod,
            "arrays_size": arrays_size_mod, "message_size": message_size_mod, SECAGG: secagg_mod}


def check_mods(names: list[str], algo: str | None = None, per_round: int | None = None) -> None:
    """Known mods, in an order that works; with ``algo``/``per_round``, also whether the run can use them."""
    unknown = sorted(set(names) - set(_mod_table()))
    if unknown:
        raise ToolchainError(f"unknown Flower mod(s) {unknown}; choose from {sorted(_mod_table())}")
    if SECAGG in names:
        if names[0] != SECAGG:  # it masks the update the inner mods (e.g. clipping) leave
            raise ToolchainError(f"list {SECAGG} first in mods (outermost): {','.join(names)}")
        if algo is not None and per_round is not None:
            check_secagg(algo, per_round)


# ---- records <-> driver objects -----------------------------------------------------------------
def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _arrays(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in rec.items()}


def ins_record(o: Outgoing, clipping_norm: float | None = None, float_masks: bool = False) -> RecordDict:
    arrays, layout = records.split(o.payload, resolve_type(o.ins_type), o.masks, float_masks)
    config = ConfigRecord({"cid": o.cid, "kind": o.kind, "round": o.rnd, "step": o.step, "ins-type": o.ins_type,
                           "seed": o.seed, "mask-travels": o.mask_travels, "layout": layout})
    if clipping_norm is not None:
        config[CLIPPING_NORM] = float(clipping_norm)
    return RecordDict({"arrays": _array_record(arrays), "config": config})


def outgoing_from(msg: Message) -> Outgoing:
    c = msg.content["config"]
    payload = records.join(_arrays(msg.content["arrays"]), str(c["layout"]))
    return Outgoing(int(c["cid"]), str(c["kind"]), int(c["round"]), int(c["step"]), payload,
                    str(c["ins-type"]), int(c["seed"]), bool(c["mask-travels"]))


def res_record(reply: Incoming, ins_arrays: dict[str, np.ndarray] | None) -> RecordDict:
    """The node's reply. With ``ins_arrays`` (a mod that compares arrays is on), the reply carries the
    instruction's keys in its order: Flower's clipping mods require that; echoed masks are ignored."""

    arrays, layout = records.split(reply.payload, resolve_type(reply.res_type), reply.masks)
    if ins_arrays is not None:
        arrays = {**{k: arrays.get(k, v) for k, v in ins_arrays.items()}, **arrays}
    return RecordDict({"arrays": _array_record(arrays),
                       "metrics": MetricRecord(records.metrics_of(layout)),
                       "config": ConfigRecord({"cid": reply.cid, "res-type": reply.res_type, "layout": layout})})


def incoming_from(msg: Message) -> Incoming:
    c = msg.content["config"]
    if c.get("need-masks"):
        return Incoming(int(c["cid"]), b"", "", need_masks=True)
    return Incoming(int(c["cid"]), records.join(_arrays(msg.content["arrays"]), str(c["layout"])),
                    str(c["res-type"]))


# ---- ClientApp ------------------------------------------------------------------------------------
def _node_partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ToolchainError('start the SuperNode with --node-config "partition-id=I num-partitions=N"')
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


# run-config keys of a Flower app (flower_app/pyproject.toml) -> FederatedOptions fields (and the output folder); 0 / "" mean "unset"
RUN_CONFIG_KEYS = {"algo": "algo", "model": "model", "dataset": "dataset", "data": "data", "density": "density",
                   "clients": "clients", "per-round": "per_round", "rounds": "rounds", "local-epochs": "local_epochs",
                   "batch-size": "batch_size", "lr": "lr", "optimizer": "optimizer", "partition": "partition",
                   "alpha": "alpha", "seed": "seed", "eval-samples": "eval_samples", "budget": "budget", "out": "out"}


def spec_from_run_config(run_config: dict) -> str:
    """The run's RunSpec JSON: the ``spec`` key (``toolchain train`` writes it) or, for the checked-in app
    (``flwr run flower_app``), its flat keys (``--run-config "rounds=2 algo='gmp'"``)."""
    if SPEC_KEY in run_config:
        return str(run_config[SPEC_KEY])
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS) - {"train-limit", "test-limit", "mods", "clipping-norm",
                                                                "node-timeout", "algo-options", "secagg-max-weight"})
    if unknown:
        raise ToolchainError(f"unknown run-config key(s) {unknown}; see flower_app/pyproject.toml")
    kw = {RUN_CONFIG_KEYS[k]: v for k, v in run_config.items() if k in RUN_CONFIG_KEYS and v not in ("", 0)}
    out = str(Path(str(kw.pop("out", "runs/flower-app"))).expanduser().resolve())
    kw.setdefault("model", TRAIN_DEFAULTS["model"])  # the app trains like `toolchain train`
    opts = FederatedOptions(**kw, algo_options=json.loads(str(run_config.get("algo-options") or "{}")), quiet=True)
    spec = make_spec(opts, int(run_config.get("train-limit", 0)) or None, int(run_config.get("test-limit", 0)) or None,
                     float(run_config.get("node-timeout", 300.0)), out=out, engine="flower-app")
    mods = [m for m in str(run_config.get("mods", "")).split(",") if m]
    check_mods(mods, opts.algo, spec.config().per_round)
    if mods:
        spec.extra["mods"] = mods
    if float(run_config.get("clipping-norm", 0.0)) > 0:
        spec.extra[CLIPPING_NORM] = float(run_config["clipping-norm"])
    if float(run_config.get("secagg-max-weight", 0)) > 0:
        spec.extra[MAX_WEIGHT] = float(run_config["secagg-max-weight"])
    return spec.to_json()


def _spec_json(spec_json: str | None, context: Context) -> str:
    return spec_json if spec_json is not None else spec_from_run_config(dict(context.run_config))


def make_client_app(spec_json: str | None = None) -> ClientApp:
    """``spec_json`` set: simulation (the spec rides in the closure); None: read it from the run config."""
    app = ClientApp()

    def handle(msg: Message, context: Context, echo: bool = False) -> Message:
        spec = _spec_json(spec_json, context)
        o = outgoing_from(msg)
        run = RunSpec.from_json(spec)
        if simulated(run):  # the server chose this virtual node to play client o.cid (see assign_nodes)
            pid, nparts = o.cid, run.config().clients
        else:
            pid, nparts = _node_partition(context)
        data_dir, local = context.node_config.get("data-dir"), context.node_config.get("local-data")
        rt = client_runtime(spec, pid, nparts, str(data_dir) if data_dir is not None else None,
                            str(local) if local is not None else None)
        if o.cid != pid:
            raise ToolchainError(f"message for client {o.cid} reached the node holding partition {pid}")
        held = context.state[MASKS_KEY].to_torch_state_dict() if MASKS_KEY in context.state else None
        state = bytes(context.state[STATE_KEY]["strategy"]) if STATE_KEY in context.state else None
        try:
            reply, masks, state = client_step(rt, o, held, state)
        except NeedMasks:
            return Message(RecordDict({"config": ConfigRecord({"cid": o.cid, "need-masks": True})}), reply_to=msg)
        if masks is not None and o.kind == TRAIN:
            context.state[MASKS_KEY] = ArrayRecord(masks)
        context.state[STATE_KEY] = ConfigRecord({"strategy": state})
        return Message(res_record(reply, _arrays(msg.content["arrays"]) if echo else None), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # the run's mods come from its spec (one installed ClientApp serves every run); Flower's own mod
        # functions run unchanged around our handler, outermost first, as ClientApp(mods=[...]) would
        names = list(RunSpec.from_json(_spec_json(spec_json, context)).extra.get("mods", []))
        check_mods(names)
        table = _mod_table()

        def inner(m: Message, c: Context) -> Message:
            return handle(m, c, echo=bool(names))

        fn: Callable[[Message, Context], Message] = inner
        for name in reversed(names):
            fn = (lambda mod, nxt: lambda m, c: mod(m, c, nxt))(table[name], fn)
        return fn(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid, nparts = _node_partition(context)
        return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": nparts})}),
                       reply_to=msg)

    app.train("setup")(handle)  # setup exchanges carry scores, not model updates: no mods
    return app


# ---- ServerApp ------------------------------------------------------------------------------------
def _check(reply: Message, what: str) -> None:
    if reply.has_error():
        raise ToolchainError(f"a SuperNode failed during {what}: {reply.error.reason}")


def simulated(spec: RunSpec) -> bool:
    """A ``--engine flower-sim`` run: every virtual SuperNode is on this machine with the whole dataset, so
    which node plays which client is the server's choice, not a node's ``partition-id``."""
    return spec.options.get("engine") == "flower-sim"


def wait_for_nodes(grid: Grid, n: int, timeout: float,
                   hint: str = "the run has --clients {n}; start one SuperNode per partition") -> list[int]:
    """The ids of the first ``n`` connected SuperNodes in id order, waiting up to ``timeout`` s for them;
    ``hint`` (``{n}`` filled in) ends the error when too few came."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < n and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < n:
        raise ToolchainError(f"only {len(nodes)} SuperNodes connected within {timeout:.0f} s; " + hint.format(n=n))
    return nodes[:n]


def assign_nodes(grid: Grid, clients: int, timeout: float) -> dict[int, int]:
    """Simulation: client ``i`` is played by the ``i``-th virtual node in id order, for the whole run (its
    ``context.state`` is that client's state). No discovery message: at 1000 virtual nodes, asking each
    for its partition cost about a minute of start-up (bench/results/flower_overhead.md)."""
    return dict(enumerate(wait_for_nodes(grid, clients, timeout)))


def discover(grid: Grid, clients: int, timeout: float) -> dict[int, int]:
    """Deployment: wait for the SuperNodes, ask each for its ``partition-id`` (each node holds its own data);
    returns partition -> node id."""
    wait_for_nodes(grid, clients, timeout)
    nodes = list(grid.get_node_ids())  # ask every node: two holding one partition is an error
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    node_of: dict[int, int] = {}
    for reply in send_and_receive(grid, msgs, timeout=timeout):
        _check(reply, "discovery")
        pid = int(reply.content["node"]["partition-id"])
        if pid in node_of:
            raise ToolchainError(f"two SuperNodes hold partition-id={pid}; give each node its own partition")
        node_of[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(clients)) - set(node_of))
    if missing:
        raise ToolchainError(f"no SuperNode holds partition(s) {missing}; start them with "
                             f'--node-config "partition-id=I num-partitions={clients}"')
    return node_of


class GridExchange:
    """Sends a round's ``Outgoing`` list over a Flower ``Grid``: one message per sampled client, all in
    flight at once (used as ``NodeExchange.send``)."""

    def __init__(self, grid: Grid, node_of: dict[int, int], timeout: float | None = None,
                 clipping_norm: float | None = None, mods: bool = False) -> None:
        self.grid, self.node_of, self.timeout, self.clipping_norm = grid, node_of, timeout, clipping_norm
        self.mods = mods  # client mods are on: masks travel as float arrays (see records.split)

    def record(self, o: Outgoing) -> RecordDict:
        """Instruction ``o`` as this run's records (the SecAgg+ exchange sends them in its own stage)."""
        return ins_record(o, self.clipping_norm if o.kind == TRAIN else None, self.mods)

    def __call__(self, out: list[Outgoing]) -> dict[int, Incoming]:
        msgs = [Message(self.record(o), dst_node_id=self.node_of[o.cid],
                        message_type=SETUP_TYPE if o.kind == "setup" else MessageType.TRAIN,
                        group_id=str(o.rnd)) for o in out]
        got: dict[int, Incoming] = {}
        for reply in send_and_receive(self.grid, msgs, timeout=self.timeout):
            _check(reply, f"round {out[0].rnd}")
            inc = incoming_from(reply)
            got[inc.cid] = inc
        if len(got) != len(out):
            raise ToolchainError(f"round {out[0].rnd}: {len(out) - len(got)} SuperNode(s) did not reply")
        return got


def serve(grid: Grid, spec: RunSpec) -> dict:
    """The whole server side of a run: build, discover nodes, run the rounds, write ``spec.out``."""

    mods = list(spec.extra.get("mods", []))
    check_mods(mods)  # before the data loads
    strategy, model, fed, cfg = build_server(spec)
    check_mods(mods, spec.options["algo"], cfg.per_round)
    find = assign_nodes if simulated(spec) else discover
    node_of = find(grid, cfg.clients, spec.node_timeout)
    log(INFO, "toolchain: %d SuperNodes hold partitions %s", len(node_of), sorted(node_of))
    clip = spec.extra.get(CLIPPING_NORM)
    plain = GridExchange(grid, node_of, clipping_norm=None if clip is None else float(clip), mods=bool(mods))
    if SECAGG in mods:  # training rounds through Flower's SecAgg+ (toolchain/learning/flower/secagg.py)
        weight = spec.extra.get(MAX_WEIGHT) or max(len(c.y) for c in fed.clients)
        exchange = NodeExchange(SecAggExchange(grid, node_of, plain, float(weight), spec.extra))
    else:
        exchange = NodeExchange(plain)

    def run(on_round: Callable) -> list:
        def report(rec) -> None:  # noqa: ANN001 - RoundRecord
            log(INFO, "toolchain: round %d accuracy %.4f density %.4f up %d B down %d B (%.2f s)", rec.round,
                rec.accuracy, rec.density, rec.bytes_up, rec.bytes_down, rec.seconds)
            on_round(rec)

        return server_loop(strategy, model, fed, cfg, exchange, report)

    opts = spec.options
    return write_run(Path(spec.out), opts, strategy, cfg, run,
                     f"{opts['algo']} / {opts['model']} / {opts['dataset']} ({opts.get('engine', 'flower')})",
                     {"train_limit": spec.train_limit, "test_limit": spec.test_limit})


def make_server_app(spec_json: str | None = None, sink: dict | None = None) -> ServerApp:
    """``spec_json`` set: simulation (``sink`` receives the summary); None: read the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = RunSpec.from_json(_spec_json(spec_json, context))
        summary = serve(grid, spec)
        if sink is not None:
            sink["summary"] = summary

    return app


# The components named in the generated app's pyproject (deployment engine).
server_app = make_server_app()
client_app = make_client_app()
