"""SecAgg+ on the toolchain's Flower engines: the server learns the weighted average of a round's updates, never
one client's update.

Flower 1.41 ships both halves of SecAgg+ and we run them unchanged: the client mod ``secaggplus_mod`` (key
agreement, Shamir shares, quantise + mask the update) and the server's ``SecAggPlusWorkflow`` stages (setup,
share keys, collect masked vectors, unmask). Both speak Flower's legacy ``FitRes`` layout, so this module adapts
the two ends to the toolchain's messages (docs/flower.md, "Secure aggregation (SecAgg+)"):

* client: :func:`secagg_mod` is ``secaggplus_mod`` with :func:`_fitres_mod` inside it, which hands the mod our
  reply's weight arrays (the kept values, in layout order) as ``fitres.parameters`` plus the sample count, and
  our layout, client id and payload class as plaintext ``fitres.metrics`` (Flower's own SecAgg+ leaves
  metrics and ``num_examples`` in the clear too). The mod then clears every ``ArrayRecord`` of the reply: the
  plaintext weights never leave the node.
* server: :class:`SecAggExchange` runs a training round through the workflow's four stages, with our own
  instruction records as the round's instructions, and rebuilds one reply per client from the unmasked
  average and that client's own layout. The strategy's weighted FedAvg over identical weights is the average
  itself (this is what Flower's workflow does with ``FitRes.parameters`` too).

Only strategies whose sampled clients share one mask and send nothing but their kept weights can be summed
this way (:data:`SHARED_MASK_ALGOS`); the update then differs from the in-process engine by SecAgg+'s
quantisation (``clipping_range`` / ``quantization_range`` per unit of ``num_examples / max_weight``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.serverapp import Grid

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.fl import codec
from toolchain.learning.flower import records
from toolchain.learning.flower.driver import TRAIN, Incoming, Outgoing
from toolchain.learning.flower.polling import send_and_receive

SECAGG = "secaggplus"  # the mod's name in a run's ``mods``
# strategies whose round is plain FedAvg under one mask shared by every sampled client (Strategy.aggregate_train)
SHARED_MASK_ALGOS = ("fedavg", "gmp", "random", "magnitude", "snip", "synflow")
# RunSpec.extra keys and their defaults. Every sampled client shares with every other (1.0) and every share is
# needed to unmask (1.0): the engines need every reply anyway (a lost node fails the round), so a lower
# threshold would buy no dropout tolerance, only a smaller coalition that could unmask a client.
# MAX_WEIGHT: the largest sample count a client may weigh its update with (SecAgg+ scales each update by
# n / max_weight before quantising); default: the largest partition of the server's federation.
SHARES, THRESHOLD, CLIPPING_RANGE = "secagg_shares", "secagg_threshold", "secagg_clipping_range"
MAX_WEIGHT = "secagg_max_weight"
DEFAULTS: dict[str, float] = {SHARES: 1.0, THRESHOLD: 1.0, CLIPPING_RANGE: 8.0}
_LAYOUT, _CID, _RES_TYPE = "toolchain-layout", "toolchain-cid", "toolchain-res-type"


def check_secagg(algo: str, per_round: int) -> None:
    """One line for a run SecAgg+ cannot serve."""
    if algo not in SHARED_MASK_ALGOS:
        raise ToolchainError(f"the secaggplus mod sums updates that share one mask; '{algo}' sends per-client masks "
                             f"or extras. Use one of {', '.join(SHARED_MASK_ALGOS)}, or drop the mod")
    if per_round < 2:
        raise ToolchainError("the secaggplus mod needs at least 2 clients per round (--per-round 2)")


def vector_keys(layout_json: str) -> list[str]:
    """The arrays SecAgg+ sums, in layout order: a ``TrainRes``'s weights (dense, or kept values under the
    mask the server sent). A reply with extras or its own mask cannot be summed with the others."""
    layout = json.loads(layout_json)
    if layout is None or any(layout["sections"][1:]):
        raise ToolchainError("secaggplus: this reply carries more than weights under the shared mask")
    sections = layout["sections"][0] or []
    if any(enc not in (codec.DENSE, codec.KNOWN_MASK) for _name, enc, _dims in sections):
        raise ToolchainError("secaggplus: this reply carries its own mask; SecAgg+ needs one mask for all clients")
    return [name for name, _enc, _dims in sections]


# ---- client -------------------------------------------------------------------------------------
def _fitres_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Inside ``secaggplus_mod``: our reply, plus the legacy ``FitRes`` records the mod reads."""
    reply = call_next(msg, ctx)
    if reply.has_error():
        return reply
    c = reply.content["config"]
    if c.get("need-masks"):  # a restarted node: SecAgg+ cannot resend within its masked round
        raise ToolchainError("secaggplus: this node lost its masks (restarted) in the middle of a run")
    layout = str(c["layout"])
    arrays = reply.content["arrays"]
    vector = [arrays[k].numpy() for k in vector_keys(layout)]
    n = int(json.loads(json.loads(layout)["meta"])["n"])
    max_weight = float(ctx.state.config_records[RECORD_KEY_STATE]["max_weight"])
    if n > max_weight:  # the mod would only warn, and the sum would overflow its quantisation range
        raise ToolchainError(f"secaggplus: this node trains on {n} samples, more than the run's max weight "
                             f"{max_weight:g}; set secagg-max-weight >= {n} in the run config "
                             f"(RunSpec.extra['{MAX_WEIGHT}'])")
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(vector), n,
                    {_LAYOUT: layout, _CID: int(c["cid"]), _RES_TYPE: str(c["res-type"])})
    for name, record in compat.fitres_to_recorddict(fitres, keep_input=False).items():
        reply.content[name] = record
    return reply


def secagg_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` around the toolchain's training handler (see the module docstring)."""
    return secaggplus_mod(msg, ctx, lambda m, c: _fitres_mod(m, c, call_next))


# ---- server -------------------------------------------------------------------------------------
class _Round:
    """The legacy strategy and client manager that ``SecAggPlusWorkflow`` asks: which nodes train this round,
    and (after unmasking) the results, each carrying the same averaged parameters."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.results: list[tuple[Any, FitRes]] = []

    def num_available(self) -> int:
        return len(self.nodes)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, FitIns]]:
        # placeholders: the exchange puts the real instruction records in place before they travel
        return [(SimpleNamespace(node_id=n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        if failures:
            raise ToolchainError(f"secaggplus round {server_round}: {len(failures)} node(s) failed: {failures[0]}")
        self.results = results
        return None, {}  # the toolchain's strategy aggregates (SecAggExchange)


class _Polled:
    """The grid as the workflow sees it: its exchanges poll as ours do (toolchain/learning/flower/polling.py), not
    with Flower's fixed 3 s sleep between pulls on a deployment grid (four exchanges a round)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        return send_and_receive(self.grid, messages, timeout)


class SecAggExchange:
    """``NodeExchange.send`` for a run with the ``secaggplus`` mod: training rounds go through Flower's SecAgg+
    workflow; setup exchanges (scores, not updates) go through ``plain``, the run's ``GridExchange``."""

    def __init__(self, grid: Grid, node_of: dict[int, int], plain: Any, max_weight: float,
                 options: dict[str, Any] | None = None, timeout: float | None = None) -> None:
        opts = {**DEFAULTS, **{k: v for k, v in (options or {}).items() if k in DEFAULTS}}
        self.grid, self.node_of, self.plain = _Polled(grid), node_of, plain
        self.workflow = SecAggPlusWorkflow(float(opts[SHARES]), float(opts[THRESHOLD]), max_weight=float(max_weight),
                                           clipping_range=float(opts[CLIPPING_RANGE]), timeout=timeout)

    def __call__(self, out: list[Outgoing]) -> dict[int, Incoming]:
        if out[0].kind != TRAIN:
            return self.plain(out)
        rnd = out[0].rnd
        cid_of = {self.node_of[o.cid]: o.cid for o in out}
        legacy = _Round(list(cid_of))
        ctx = _legacy_context(rnd, legacy)
        state = WorkflowState()
        wf = self.workflow
        stages = [wf.setup_stage, wf.share_keys_stage, wf.collect_masked_vectors_stage, wf.unmask_stage]
        for i, stage in enumerate(stages):
            try:
                ok = stage(self.grid, ctx, state)
            except ValueError as e:  # e.g. a node's masked vector of another shape: numpy cannot add it
                raise ToolchainError(f"secaggplus round {rnd}: {stage.__name__}: {e}") from None
            if not ok:
                why = f": {state.failures[0]}" if state.failures else " (too few nodes answered)"
                raise ToolchainError(f"secaggplus round {rnd}: {stage.__name__} failed{why}")
            if i == 0:  # the round's real instructions (the workflow adds its stage record to each)
                state.nid_to_fitins = {self.node_of[o.cid]: self.plain.record(o) for o in out}
        got: dict[int, Incoming] = {}
        shape = None  # every client's weights section (names, encodings, sizes): the sum is only defined if equal
        for proxy, fitres in legacy.results:
            meta = fitres.metrics
            cid = int(meta[_CID])
            if cid_of.get(proxy.node_id) != cid:
                raise ToolchainError(f"secaggplus round {rnd}: node {proxy.node_id} answered for client {cid}")
            layout = str(meta[_LAYOUT])
            keys, sections = vector_keys(layout), json.loads(layout)["sections"][0]
            if shape is not None and sections != shape:
                raise ToolchainError(f"secaggplus round {rnd}: client {cid}'s update is laid out unlike the others'")
            shape = sections
            average = parameters_to_ndarrays(fitres.parameters)
            if len(average) != len(keys):
                raise ToolchainError(f"secaggplus round {rnd}: {len(average)} summed arrays for {len(keys)} tensors")
            arrays = dict(zip(keys, (np.asarray(v, np.float32) for v in average), strict=True))
            got[cid] = Incoming(cid, records.join(arrays, layout), str(meta[_RES_TYPE]))
        if len(got) != len(out):
            raise ToolchainError(f"secaggplus round {rnd}: {len(out) - len(got)} node(s) did not reply")
        return got


def _legacy_context(rnd: int, legacy: _Round) -> LegacyContext:
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    return LegacyContext(Context(0, 0, {}, state, {}), strategy=legacy, client_manager=legacy)  # type: ignore[arg-type]
