"""Federated NTK foresight pruning + federated ZO training (``--algo ntk-zo``, docs/ntk-zo.md).

The ZO maths itself (signs, estimators, unbiasedness on a quadratic, the float32 update order) is tested in
tests/test_zo_contract.py; here: what travels, that every party holds the same weights, the masks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.masks import prunable_names
from toolchain.learning.fl.memory import forward_only_memory, measure_forward_peak_bytes
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.fl.strategy import ClientData
from toolchain.learning.pruning import make_strategy, ntk
from toolchain.learning.pruning.zo_fl import NTKZeroOrder, ZOTrainIns, ZOTrainRes, active_view
from toolchain.models.zoo import build_model


@pytest.fixture(scope="module")
def toy(mnist):
    return type(mnist)("mnist-small", mnist.x_train[:1200], mnist.y_train[:1200], mnist.x_test[:200],
                       mnist.y_test[:200], 10, mnist.preprocessing)


def _setup(toy, clients: int, per_round: int, rounds: int, **opts) -> tuple[TrainConfig, Federation, NTKZeroOrder]:
    cfg = TrainConfig(rounds=rounds, clients=clients, per_round=per_round, batch_size=16, density=0.1, seed=1,
                      partition="dirichlet", alpha=0.1, eval_samples=100,
                      algo_options={"K": 6, "lr": 0.01, "T": 3, "ntk_batch": 16, **opts})
    return cfg, Federation.from_dataset(toy, cfg), make_strategy("ntk-zo", cfg)


def _model():
    seed_everything(1)
    return build_model("lenet5", (28, 28, 1), 10)


def test_upload_per_client_round_is_4k_plus_12_bytes(toy):
    k = 6
    cfg, fed, strategy = _setup(toy, clients=4, per_round=3, rounds=3, mask="random", K=k)
    history = simulate(strategy, _model(), fed, cfg, progress=False)
    for rec in history:  # real encoded payloads, counted by the simulator
        assert rec.bytes_up_per_client == 4 * k + 12 <= 8 * k + 16
    # after a client's first contact only seeds and scalars come down (no weights)
    later = [r for r in history[1:] if set(r.clients) <= set(history[0].clients)]
    for rec in later:
        assert rec.bytes_down_per_client < 30 + 2 * (4 * k + 8)
    reply = ZOTrainRes(0, 3, 16, 2.25, np.arange(k, dtype=np.float32))
    blob = reply.to_bytes()
    back = ZOTrainRes.from_bytes(blob)
    assert len(blob) == 4 * k + 12 and back.round == 3 and back.num_examples == 16
    assert back.scalars.tolist() == list(range(k)) and back.loss == 2.25


def _deliver(strategy: NTKZeroOrder, ins: ZOTrainIns, known: dict) -> ZOTrainIns:
    return ZOTrainIns.from_bytes(ins.to_bytes(), known)


def test_clients_with_same_seeds_stay_bit_identical_to_server(toy):
    cfg, fed, strategy = _setup(toy, clients=3, per_round=3, rounds=5, mask="ntk-datafree")
    model = _model()
    import copy

    scratch = copy.deepcopy(model)
    strategy.setup(model, type("Ctx", (), {"extra": {}, "server_x": fed.clients[0].x[:8],
                                            "server_y": fed.clients[0].y[:8]})())
    # the pruning phase, as the simulator runs it (encoded both ways)
    for step in range(strategy.setup_steps(1)):
        ins = strategy.configure_setup(1, step, [0, 1, 2])
        res = [ntk.PruneRes.from_bytes(strategy.client_setup(ntk.PruneIns.from_bytes(ins[c].to_bytes()), fed.clients[c],
                                                             scratch, torch.Generator().manual_seed(c)).to_bytes())
               for c in (0, 1, 2)]
        strategy.aggregate_setup(1, step, res)
    known: dict[int, dict] = {}
    # clients 0 and 1 take part every round; client 2 only in rounds 1 and 5 (it replays the records it missed)
    for rnd in range(1, 6):
        cids = [0, 1, 2] if rnd in (1, 5) else [0, 1]
        out = strategy.configure_train(rnd, cids)
        results = []
        for cid in cids:
            ins = _deliver(strategy, out[cid], known.get(cid, {}))
            known[cid] = ins.masks
            res = strategy.client_train(ins, fed.clients[cid], scratch, torch.Generator().manual_seed(rnd * 10 + cid))
            results.append(ZOTrainRes.from_bytes(res.to_bytes()))
        strategy.aggregate_train(rnd, results)
    # the last broadcast (round 5's update) reaches everyone; then every party holds the same float32 bits
    final = strategy.configure_train(6, [0, 1, 2])
    for cid in (0, 1, 2):
        strategy.client_apply(_deliver(strategy, final[cid], known[cid]), cid, scratch)
    server = active_view(strategy.model, strategy.masks).gather()
    assert len(strategy.update_log()) == 5
    for cid in (0, 1, 2):
        assert np.array_equal(strategy.client_weights(cid).view(np.uint32), server.view(np.uint32))


def test_only_active_weights_move_and_mask_density_is_exact(toy):
    cfg, fed, strategy = _setup(toy, clients=3, per_round=3, rounds=3, mask="ntk")
    model = _model()
    snaps: list[dict[str, torch.Tensor]] = []
    history = simulate(strategy, model, fed, cfg, progress=False, on_round=lambda r: snaps.append(
        {k: v.detach().clone() for k, v in strategy.model.named_parameters()}))
    masks = strategy.masks
    moved = 0
    for name, after in snaps[-1].items():  # rounds 2..3 changed active entries only, and some of them
        changed = after != snaps[0][name]
        if name in masks:
            assert not torch.any(changed & ~masks[name])
        moved += int(changed.sum())
    assert moved > 0
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)  # exact aggregated density
    assert [p["kept"] for p in strategy.prune_log] == [round(d * total) for d in ntk.schedule(0.1, 3)]
    floors = ntk.layer_floors(masks, strategy.opts["ntk_min_layer"])
    assert all(int(masks[n].sum()) >= floors[n] for n in masks)
    params = dict(strategy.model.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0)
    assert history[-1].extra["active_weights"] == sum(int(m.sum()) for m in masks.values()) + sum(
        p.numel() for n, p in params.items() if n not in masks)
    assert history[0].bytes_up_per_client > 4 * 6 + 12  # round 1 also carries the saliency uploads


def test_datafree_saliency_never_reads_client_data(toy):
    model = _model()
    names = prunable_names(model)
    params = dict(model.named_parameters())
    bits = ntk.masks_to_bits({n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, names)
    cfg, fed, strategy = _setup(toy, clients=2, per_round=2, rounds=1)
    real = fed.clients[0]
    poisoned = ClientData(0, torch.full_like(real.x, float("nan")), real.y)
    outs = {}
    for datafree in (True, False):
        ins = ntk.PruneIns(7, 1, 1, 8, 0.01, datafree, bits)
        outs[datafree] = [strategy.client_setup(ins, d, model, torch.Generator().manual_seed(0)) for d in (real, poisoned)]
    clean, dirty = outs[True]
    assert np.isfinite(clean.scores).all() and np.array_equal(clean.scores, dirty.scores)
    assert np.isnan(outs[False][1].scores).any()  # the data mode does read the data (so the check has teeth)
    assert not np.array_equal(outs[False][0].scores, clean.scores)


def test_federated_saliency_is_the_pooled_saliency_under_full_participation(toy):
    """algorithms.md §3.2(b): R is additive over inputs, so with every client scoring all its data the server's
    |n-weighted sum of signed local saliencies| is the NTK-SAP saliency of the pooled data (LeNet-5: no BN)."""
    cfg, fed, strategy = _setup(toy, clients=3, per_round=3, rounds=1, ntk_batch=len(toy.y_train))
    model = _model()
    names = prunable_names(model)
    params = dict(model.named_parameters())
    masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    ins = ntk.PruneIns(11, 1, 2, len(toy.y_train), 0.01, False, ntk.masks_to_bits(masks, names))
    res = [ntk.PruneRes.from_bytes(strategy.client_setup(ins, c, model, torch.Generator().manual_seed(c.cid)).to_bytes())
           for c in fed.clients]
    assert [r.n for r in res] == [len(c.y) for c in fed.clients]  # each client scored all of its samples
    fed_scores = ntk.aggregate_scores(res, [r.n for r in res], masks, names)
    pooled = ntk.ntk_saliency(model, masks, torch.cat([c.x for c in fed.clients]), ntk.derive(11, 1), 0.01, 2)
    for n in names:
        assert torch.allclose(fed_scores[n].float(), pooled[n], rtol=1e-3, atol=1e-6 * float(pooled[n].max()))
    # the sum of per-client |saliency| (the former aggregation) is a different score: the check has teeth
    total = sum(r.n for r in res)
    abs_first = sum(np.abs(r.scores.astype(np.float64)) * r.n / total for r in res)
    flat = np.concatenate([pooled[n].reshape(-1).numpy() for n in names])
    assert not np.allclose(abs_first, flat, rtol=1e-2, atol=1e-6 * flat.max())


def test_frobenius_objective_estimates_the_squared_kernel_norm():
    """E_v R_F = ||Θ(X)||_F² / |X|² (Θ over the prunable weights, every output), checked against an explicit
    Jacobian on a small MLP: the mean of 1500 draws is within 4 standard errors."""
    from torch import nn
    from torch.func import functional_call, jacrev

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(6, 5)
    names = prunable_names(net)
    params = {n: p.detach() for n, p in net.named_parameters()}

    def f(theta):
        return functional_call(net, theta, (x,))

    jac = jacrev(f)(params)
    j = torch.cat([jac[n].reshape(6 * 3, -1) for n in names], 1)
    exact = float(((j @ j.T) ** 2).sum()) / 36
    draws = np.array([float(ntk._frobenius_r(f, {n: p.clone() for n, p in params.items()}, names, x, 1e-4,
                                             torch.Generator().manual_seed(r)).detach()) for r in range(1500)])
    assert abs(draws.mean() - exact) < 4 * draws.std(ddof=1) / np.sqrt(len(draws))


def test_frobenius_federated_saliency_keeps_only_the_local_kernels(toy):
    """Unlike the trace, ||Θ||_F² couples inputs: the federated sum holds the clients' diagonal kernel blocks only,
    so it differs from the pooled saliency even with every client scoring all its data (the local-NTK
    approximation, algorithms.md §3.2 b), while a single client scoring everything is the pooled saliency."""
    cfg, fed, strategy = _setup(toy, clients=3, per_round=3, rounds=1, ntk_batch=len(toy.y_train))
    model = _model()
    names = prunable_names(model)
    params = dict(model.named_parameters())
    masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    ins = ntk.PruneIns(11, 1, 1, len(toy.y_train), 0.01, False, ntk.masks_to_bits(masks, names), "frobenius")
    ins = ntk.PruneIns.from_bytes(ins.to_bytes())
    assert ins.objective == "frobenius"
    res = [strategy.client_setup(ins, c, model, torch.Generator().manual_seed(c.cid)) for c in fed.clients]
    fed_scores = ntk.aggregate_scores(res, [r.n for r in res], masks, names)
    x_all = torch.cat([c.x for c in fed.clients])
    # v is drawn per (input, output) row, so the pooled party scores its inputs in the order a client would
    x_seen = ntk.client_inputs(ins, x_all, tuple(x_all.shape[1:]), 0, torch.Generator().manual_seed(0))
    pooled = ntk.ntk_saliency(model, masks, x_seen, ntk.derive(11, 1), 0.01, 1, "frobenius")
    flat_fed = torch.cat([fed_scores[n].reshape(-1).float() for n in names])
    flat_pool = torch.cat([pooled[n].reshape(-1) for n in names])
    assert not torch.allclose(flat_fed, flat_pool, rtol=1e-2)
    one = strategy.client_setup(ins, ClientData(0, x_all, torch.cat([c.y for c in fed.clients])), model,
                                torch.Generator().manual_seed(0))
    alone = ntk.aggregate_scores([one], [one.n], masks, names)
    for n in names:
        assert torch.allclose(alone[n].float(), pooled[n], rtol=1e-4, atol=1e-7 * float(pooled[n].max()))


def test_unknown_ntk_objective_is_refused(toy):
    from toolchain.contracts.errors import ToolchainError

    with pytest.raises(ToolchainError, match="ntk_objective=spectral is not one of trace, frobenius"):
        _setup(toy, clients=2, per_round=2, rounds=1, ntk_objective="spectral")
    bad = bytearray(ntk.PruneIns(1, 1, 1, 8, 0.01, False, np.ones(8, np.uint8)).to_bytes())
    bad[18] = 4
    with pytest.raises(ValueError, match="unknown NTK pruning flags"):
        ntk.PruneIns.from_bytes(bytes(bad))


def test_prune_messages_roundtrip():
    bits = (np.arange(37) % 3 == 0).astype(np.uint8)
    ins = ntk.PruneIns(0xDEADBEEF, 4, 2, 64, 0.01, True, bits)
    back = ntk.PruneIns.from_bytes(ins.to_bytes())
    assert (back.seed, back.tau, back.samples, back.batch, back.datafree) == (0xDEADBEEF, 4, 2, 64, True)
    assert np.array_equal(back.bits[:37], bits) and len(ins.to_bytes()) == 19 + 5
    res = ntk.PruneRes(3, 100, np.linspace(0, 1, 13, dtype=np.float32))
    assert np.array_equal(ntk.PruneRes.from_bytes(res.to_bytes()).scores, res.scores)


def test_forward_peak_memory_is_measured():
    model = build_model("lenet5", (28, 28, 1), 10)
    x = torch.randn(1, 1, 28, 28)
    # peak: the input, conv1's output and its ReLU output are alive together (LeNet-5's largest moment)
    assert measure_forward_peak_bytes(model, x) == 4 * (28 * 28 + 2 * 6 * 28 * 28)
    assert measure_forward_peak_bytes(model, torch.randn(4, 1, 28, 28)) == 4 * 4 * (28 * 28 + 2 * 6 * 28 * 28)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in prunable_names(model)}
    rep = forward_only_memory(model, masks, x, 4 * 20)
    assert rep.gradients == 0 and rep.optimizer == 0 and rep.extra == 80


def test_train_cli_path_writes_a_sparse_model(tmp_path):
    from toolchain.learning.options import algo_options as _algo_options
    from toolchain.pipelines.train import TrainOptions, train

    opts = TrainOptions(algo="ntk-zo", out=str(tmp_path / "run"), clients=2, rounds=2, density=0.2, quiet=True,
                        batch_size=8, eval_samples=100,
                        algo_options=_algo_options(["K=4", "T=2", "ntk_batch=8", "mask=ntk", "estimator=central"]))
    summary = train(opts)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    kept = sum(int(m.sum()) for m in saved["masks"].values())
    assert kept == round(0.2 * sum(m.numel() for m in saved["masks"].values()))
    assert summary["algorithm"] == "ntk-zo"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bytes_up_per_client"] == 4 * 4 + 12
    assert rows[-1]["extra"]["forward_passes"] == 2 * 2 * 4  # central: 2K per client, 2 clients
    assert rows[-1]["device_memory"]["gradients"] == 0
