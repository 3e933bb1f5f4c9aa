"""Our strategies as a Flower ``ServerApp`` and their client side as a ``ClientApp`` (Message API, flwr 1.41).

Every payload travels as the exact bytes of the in-process engine (``TrainIns.to_bytes`` /
``TrainRes.to_bytes``: sparse weights, masks when they changed, config, top-K extras, seeds...) inside a
``ConfigRecord``; the per-client generator seed, round, payload classes and model arch ride beside it as
scalars; the client's last masks live in ``context.state`` as an ``ArrayRecord`` (the SuperNode keeps
it between the messages of a run), so only changed masks travel, as in the in-process engine.

Message types: ``query`` (which partition does this node hold), ``train`` (one round of local
training), ``train.setup`` (a strategy's optional setup exchange before training).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from toolchain.errors import ToolchainError

if TYPE_CHECKING:
    from toolchain.flower.driver import Incoming, Outgoing, RunSpec

# The driver (torch, models, strategies) is imported inside the handlers: every Flower message starts a
# fresh ClientApp process, and the discovery query needs none of it.

SPEC_KEY = "spec"  # run-config key holding RunSpec JSON (deployment engine)
MASKS_KEY = "toolchain.masks"  # context.state key: the masks this node last received
STATE_KEY = "toolchain.client"  # context.state key: this node's client-side strategy object (never sent)
SETUP_TYPE = f"{MessageType.TRAIN}.setup"


# ---- records <-> driver objects -----------------------------------------------------------------
def ins_record(o: Outgoing) -> RecordDict:
    return RecordDict({"ins": ConfigRecord({
        "cid": o.cid, "kind": o.kind, "round": o.rnd, "step": o.step, "payload": o.payload,
        "ins-type": o.ins_type, "seed": o.seed, "mask-travels": o.mask_travels})})


def outgoing_from(msg: Message) -> Outgoing:
    from toolchain.flower.driver import Outgoing

    c = msg.content["ins"]
    return Outgoing(int(c["cid"]), str(c["kind"]), int(c["round"]), int(c["step"]), bytes(c["payload"]),
                    str(c["ins-type"]), int(c["seed"]), bool(c["mask-travels"]))


# ---- ClientApp ------------------------------------------------------------------------------------
def _node_partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ToolchainError('start the SuperNode with --node-config "partition-id=I num-partitions=N"')
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def make_client_app(spec_json: str | None = None) -> ClientApp:
    """``spec_json`` set: simulation (the spec rides in the closure); None: read it from the run config."""
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        from toolchain.flower.driver import TRAIN, NeedMasks, client_runtime, client_step

        spec = spec_json if spec_json is not None else str(context.run_config[SPEC_KEY])
        pid, nparts = _node_partition(context)
        data_dir = context.node_config.get("data-dir")
        rt = client_runtime(spec, pid, nparts, str(data_dir) if data_dir is not None else None)
        o = outgoing_from(msg)
        if o.cid != pid:
            raise ToolchainError(f"message for client {o.cid} reached the node holding partition {pid}")
        held = context.state[MASKS_KEY].to_torch_state_dict() if MASKS_KEY in context.state else None
        state = bytes(context.state[STATE_KEY]["strategy"]) if STATE_KEY in context.state else None
        try:
            reply, masks, state = client_step(rt, o, held, state)
        except NeedMasks:
            return Message(RecordDict({"res": ConfigRecord({"cid": o.cid, "need-masks": True})}), reply_to=msg)
        if masks is not None and o.kind == TRAIN:
            context.state[MASKS_KEY] = ArrayRecord(masks)
        context.state[STATE_KEY] = ConfigRecord({"strategy": state})
        return Message(RecordDict({
            "res": ConfigRecord({"cid": reply.cid, "payload": reply.payload, "res-type": reply.res_type}),
            "metrics": MetricRecord({"num-examples": len(rt.data.y)})}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid, nparts = _node_partition(context)
        return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": nparts})}),
                       reply_to=msg)

    app.train()(handle)
    app.train("setup")(handle)
    return app


# ---- ServerApp ------------------------------------------------------------------------------------
def _check(reply: Message, what: str) -> None:
    if reply.has_error():
        raise ToolchainError(f"a SuperNode failed during {what}: {reply.error.reason}")


def discover(grid: Grid, clients: int, timeout: float) -> dict[int, int]:
    """Wait for the SuperNodes, ask each for its ``partition-id``; returns partition -> node id."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < clients and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    if len(nodes) < clients:
        raise ToolchainError(f"only {len(nodes)} SuperNodes connected within {timeout:.0f} s but the run has "
                             f"--clients {clients}; start one SuperNode per partition")
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
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
    """``driver.Exchange`` over a Flower ``Grid``: one message per sampled client, all in flight at once."""

    def __init__(self, grid: Grid, node_of: dict[int, int], timeout: float | None = None) -> None:
        self.grid, self.node_of, self.timeout = grid, node_of, timeout

    def _send(self, out: list[Outgoing]) -> dict[int, Message]:
        msgs = [Message(ins_record(o), dst_node_id=self.node_of[o.cid],
                        message_type=SETUP_TYPE if o.kind == "setup" else MessageType.TRAIN,
                        group_id=str(o.rnd)) for o in out]
        got: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            _check(reply, f"round {out[0].rnd}")
            got[int(reply.content["res"]["cid"])] = reply
        if len(got) != len(out):
            raise ToolchainError(f"round {out[0].rnd}: {len(out) - len(got)} SuperNode(s) did not reply")
        return got

    def __call__(self, out: list[Outgoing], resend: Callable[[Outgoing], Outgoing]) -> dict[int, Incoming]:
        from toolchain.flower.driver import Incoming

        got = self._send(out)
        retry = [resend(o) for o in out if got[o.cid].content["res"].get("need-masks")]
        if retry:
            got.update(self._send(retry))
        extra = {o.cid: len(o.payload) for o in retry}
        return {cid: Incoming(cid, bytes(m.content["res"]["payload"]), str(m.content["res"]["res-type"]),
                              extra.get(cid, 0)) for cid, m in got.items()}


def serve(grid: Grid, spec: RunSpec) -> dict:
    """The whole server side of a run: build, discover nodes, run the rounds, write ``spec.out``."""
    from toolchain.flower.driver import build_server, server_loop
    from toolchain.flower.outputs import write_run

    strategy, model, fed, cfg = build_server(spec)
    node_of = discover(grid, cfg.clients, spec.node_timeout)
    log(INFO, "toolchain: %d SuperNodes hold partitions %s", len(node_of), sorted(node_of))
    exchange = GridExchange(grid, node_of)

    def run(on_round: Callable) -> list:
        def report(rec) -> None:  # noqa: ANN001 - RoundRecord
            log(INFO, "toolchain: round %d accuracy %.4f density %.4f up %d B down %d B (%.2f s)", rec.round,
                rec.accuracy, rec.density, rec.bytes_up, rec.bytes_down, rec.seconds)
            on_round(rec)

        return server_loop(strategy, model, fed, cfg, exchange, report)

    return write_run(spec, strategy, cfg, run)


def make_server_app(spec_json: str | None = None, sink: dict | None = None) -> ServerApp:
    """``spec_json`` set: simulation (``sink`` receives the summary); None: read the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from toolchain.flower.driver import RunSpec

        spec = RunSpec.from_json(spec_json if spec_json is not None else str(context.run_config[SPEC_KEY]))
        summary = serve(grid, spec)
        if sink is not None:
            sink["summary"] = summary

    return app


# The components named in the generated app's pyproject (deployment engine).
server_app = make_server_app()
client_app = make_client_app()
