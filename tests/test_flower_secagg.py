"""SecAgg+ on the Flower engines (toolchain/learning/flower/secagg.py): the server gets the round's weighted average
and never one client's weights.

The fast test runs the real server side (``apps.serve``: the toolchain's round loop and Flower's
``SecAggPlusWorkflow`` stages) against the real ClientApp (Flower's ``secaggplus_mod`` around our handler), joined by
a loopback grid in this process that delivers each message to the node's ClientApp with the node's own
``Context``, as a SuperNode does, and keeps every reply the server receives. The slow tests run the same round
through ``flwr run`` on Flower's simulation engine and on a local SuperLink with SuperNodes.
"""

from __future__ import annotations

import copy
import json
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from toolchain.contracts.errors import ToolchainError  # noqa: E402
from toolchain.learning.flower import make_spec  # noqa: E402
from toolchain.learning.flower.apps import check_mods, make_client_app, serve, spec_from_run_config  # noqa: E402
from toolchain.learning.flower.driver import run_inprocess  # noqa: E402
from toolchain.learning.flower.secagg import CLIPPING_RANGE, DEFAULTS, MAX_WEIGHT, SECAGG  # noqa: E402
from toolchain.pipelines.train import TrainOptions  # noqa: E402

CLIENTS, TRAIN_N, TEST_N = 3, 300, 100
Q_RANGE = 2**22  # SecAggPlusWorkflow's default quantization_range


class LoopbackGrid:
    """The Grid calls the server side makes (node ids, push, pull), answered by ClientApp ``app`` in this process:
    one ``Context`` per node, kept across messages as a SuperNode keeps it. ``received`` holds every reply the
    server pulled."""

    def __init__(self, app, nodes: int, tamper=None) -> None:
        self.app, self.tamper = app, tamper  # tamper(node_id, reply): what a dishonest node changes in its reply
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in range(101, 101 + nodes)}
        self.pending: dict[str, Message] = {}
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid  # as the SuperLink (and Flower's simulation engine) assign it
            server, TaskIdentity.node_id = TaskIdentity.node_id, msg.metadata.dst_node_id  # now in the node's process
            try:
                # a copy, as a transport delivers one: the workflow's stage messages share one content object,
                # and the mod consumes what it reads
                reply = copy.deepcopy(self.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id]))
            except Exception as e:  # noqa: BLE001 - as Flower's runtime does: the server gets an error reply
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg)
            finally:
                TaskIdentity.node_id = server
            if self.tamper is not None:
                self.tamper(msg.metadata.dst_node_id, reply)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pending[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        got = [self.pending.pop(i) for i in list(ids) if i in self.pending]
        self.received.extend(copy.deepcopy(got))  # the workflow consumes what it reads
        return got


def _serve(spec, tamper=None) -> LoopbackGrid:
    """``serve`` in this process, against the ClientApp behind a loopback grid."""
    grid = LoopbackGrid(make_client_app(spec.to_json()), CLIENTS, tamper)
    # what Flower's runtime sets in a ServerApp process (a Message takes its sender from it)
    identity = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        serve(grid, spec)
    finally:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = identity
    return grid


def _opts(out: str, algo: str = "fedavg", engine: str = "flower-sim", **kw) -> TrainOptions:
    return TrainOptions(algo=algo, out=out, model="lenet5", clients=CLIENTS, per_round=CLIENTS, rounds=1,
                        batch_size=32, lr=0.05, quiet=True, engine=engine, seed=3, **kw)


@pytest.mark.parametrize("algo", ["fedavg", "random"])
def test_secagg_round_gives_the_average_and_no_node_sends_its_weights(tmp_path, algo):
    spec = make_spec(_opts(str(tmp_path / "run"), algo, density=0.2), TRAIN_N, TEST_N)
    spec.extra["mods"] = [SECAGG]
    grid = _serve(spec)
    got = torch.load(tmp_path / "run" / "model.pt")["state_dict"]
    _hist, ref = run_inprocess(make_spec(_opts(str(tmp_path / "ref"), algo, density=0.2), TRAIN_N, TEST_N))
    want = ref.model.state_dict()
    # SecAgg+ quantises each update (stochastic rounding, step 2 * clip / 2^22 per unit of n / max_weight; every
    # client here holds n = max_weight samples): the average is off by less than one step, and not bit-exact
    step = 2 * DEFAULTS[CLIPPING_RANGE] / Q_RANGE
    diffs = [(got[k] - want[k]).abs().max().item() for k in want]
    assert max(diffs) < step, (max(diffs), step)
    assert max(diffs) > 0  # the update really went through SecAgg+ (the plain engines are bit-exact)
    # what reached the server: 4 stages x 3 nodes, and not one array of weights
    assert len(grid.received) == 4 * CLIENTS
    for reply in grid.received:
        assert not reply.has_error()
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    masked = [r.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for r in grid.received
              if Key.MASKED_PARAMETERS in r.content[RECORD_KEY_CONFIGS]]
    assert len(masked) == CLIENTS
    # each masked vector holds one value per kept weight (plus SecAgg+'s weight factor), and none is a client's
    # update: a quantised update sits near 2^21 (clip 8 -> the middle of [0, 2^22)); masked, the values spread
    # uniformly over [0, 2^32), mean 2^31
    kept = sum(int(m.sum()) for m in ref.masks.values()) + sum(
        v.numel() for k, v in want.items() if k not in ref.masks)
    for vectors in masked:
        vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in vectors]).astype(np.float64)
        assert kept <= vec.size <= kept + len(vectors)
        assert abs(vec.mean() / 2**31 - 1) < 0.05 and vec.std() > 0.25 * 2**32, (vec.mean(), vec.std())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_secagg_on_flowers_simulation_engine(tmp_path):
    """The same round through ``flwr run`` on a simulation SuperLink (Ray, one virtual SuperNode per client)."""
    from toolchain.learning.flower.launch import run_simulation

    spec = make_spec(_opts(str(tmp_path / "run")), TRAIN_N, TEST_N)
    spec.extra["mods"] = [SECAGG]
    run_simulation(spec, num_cpus=1)
    got = torch.load(tmp_path / "run" / "model.pt")["state_dict"]
    _hist, ref = run_inprocess(make_spec(_opts(str(tmp_path / "ref")), TRAIN_N, TEST_N))
    diffs = [(got[k] - v).abs().max().item() for k, v in ref.model.state_dict().items()]
    assert 0 < max(diffs) < 2 * DEFAULTS[CLIPPING_RANGE] / Q_RANGE, max(diffs)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_secagg_on_flowers_deployment_engine(tmp_path):
    """The same round on a local SuperLink with 3 SuperNodes: every stage message starts a fresh ClientApp process
    there, so the mod's keys and shares live only in the node's ``context.state`` between stages."""
    from toolchain.learning.flower.launch import LocalFederation, run_deployment

    spec = make_spec(_opts(str(tmp_path / "run"), engine="flower"), TRAIN_N, TEST_N)
    spec.extra["mods"] = [SECAGG]
    fed = LocalFederation(CLIENTS)
    try:
        fed.start()
        run_deployment(spec, fed.address, timeout=360, stream=False, **fed.security())
    finally:
        fed.stop()
    got = torch.load(tmp_path / "run" / "model.pt")["state_dict"]
    _hist, ref = run_inprocess(make_spec(_opts(str(tmp_path / "ref")), TRAIN_N, TEST_N))
    diffs = [(got[k] - v).abs().max().item() for k, v in ref.model.state_dict().items()]
    assert 0 < max(diffs) < 2 * DEFAULTS[CLIPPING_RANGE] / Q_RANGE, max(diffs)


def test_secagg_node_with_more_samples_than_the_max_weight_refuses(tmp_path):
    """A node whose sample count exceeds the run's max weight would overflow SecAgg+'s quantisation range (the mod
    itself only warns): it refuses, and the round fails with that node's reason in one line."""
    spec = make_spec(_opts(str(tmp_path / "run")), TRAIN_N, TEST_N)
    spec.extra.update({"mods": [SECAGG], MAX_WEIGHT: 10})
    with pytest.raises(ToolchainError, match=r"collect_masked_vectors_stage failed: .*more than the run's max weight"):
        _serve(spec)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_secagg_refuses_a_node_that_lies_about_its_update(tmp_path):
    """A node's plaintext layout says how the summed vector is cut into tensors; one that disagrees with the
    others' (here: its first tensor claims another size) fails the round in one line instead of being decoded."""

    def lie(node, reply):
        metrics = reply.content.config_records.get("fitres.metrics")
        if node == 102 and metrics is not None:
            layout = json.loads(str(metrics["toolchain-layout"]))
            layout["sections"][0][0][2] = [1]
            metrics["toolchain-layout"] = json.dumps(layout)

    spec = make_spec(_opts(str(tmp_path / "run")), TRAIN_N, TEST_N)
    spec.extra["mods"] = [SECAGG]
    with pytest.raises(ToolchainError, match="laid out unlike the others"):
        _serve(spec, lie)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_secagg_refuses_what_it_cannot_sum():
    with pytest.raises(ToolchainError, match="share one mask"):
        check_mods([SECAGG], "feddst", 10)
    with pytest.raises(ToolchainError, match="at least 2 clients"):
        check_mods([SECAGG], "fedavg", 1)
    with pytest.raises(ToolchainError, match="first"):
        check_mods(["fixedclipping", SECAGG])
    # the checked-in app's run config (flwr run flower_app --run-config ...) is checked the same way
    with pytest.raises(ToolchainError, match="share one mask"):
        spec_from_run_config({"algo": "feddst", "mods": SECAGG, "clients": 4})
    assert json.loads(spec_from_run_config({"algo": "fedavg", "mods": SECAGG, "secagg-max-weight": 900}))["extra"] == {
        "mods": [SECAGG], MAX_WEIGHT: 900.0}
