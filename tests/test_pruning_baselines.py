"""Baselines (random, magnitude, snip, synflow, prunefl, feddst) in the federated engine, toy scale."""

import pytest
import torch

from toolchain.data.datasets import Dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.masks import kept_count, masks_equal
from toolchain.learning.fl.messages import TrainRes
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.pruning import ALGORITHMS
from toolchain.learning.pruning.scores import keep_count
from toolchain.models.zoo import build_model

BASELINES = ["random", "magnitude", "snip", "synflow", "prunefl", "feddst"]


@pytest.fixture(scope="module")
def toy(mnist):
    return Dataset("mnist-toy", mnist.x_train[:600], mnist.y_train[:600], mnist.x_test[:200], mnist.y_test[:200], 10,
                   mnist.preprocessing)


def recording(cls):
    class Recording(cls):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.server_masks: dict[int, dict] = {}
            self.client_masks: list[tuple[int, dict]] = []
            self.uploads: list[TrainRes] = []

        def configure_train(self, rnd, client_ids):
            self.server_masks[rnd] = {k: v.clone() for k, v in self.masks.items()}
            return super().configure_train(rnd, client_ids)

        def client_train(self, ins, data, model, generator):
            self.client_masks.append((ins.round, {k: v.clone() for k, v in ins.masks.items()}))
            return super().client_train(ins, data, model, generator)

    return Recording


def _run(toy, algo, seed=0, density=0.05, cls=None):
    opts = {"delta": 1, "t_end": 3, "synflow_iterations": 10, "pretrain_epochs": 1}
    cfg = TrainConfig(rounds=2, clients=3, per_round=3, batch_size=32, lr=3e-3, optimizer="adam", density=density,
                      seed=seed, algo_options=opts)
    fed = Federation.from_dataset(toy, cfg)
    strategy = (cls or recording(ALGORITHMS[algo]))(cfg)
    seed_everything(seed)
    model = build_model("lenet5", toy.input_shape, 10)
    return simulate(strategy, model, fed, cfg, progress=False), strategy


@pytest.mark.parametrize("algo", BASELINES)
def test_baseline_reaches_target_density_with_equal_masks(toy, algo):
    history, s = _run(toy, algo)
    total = sum(m.numel() for m in s.masks.values())
    target = keep_count(total, 0.05)
    assert all(r.density == pytest.approx(target / total) for r in history), [r.density for r in history]
    assert kept_count(s.masks) == target
    params = dict(s.model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in s.masks.items())  # pruned weights exactly zero
    for rnd, decoded in s.client_masks:  # what each device decoded is the server's mask of that round
        assert masks_equal(decoded, s.server_masks[rnd])
    mem = history[-1].device_memory
    assert mem["activations"] > 0 and mem["total"] == sum(mem[k] for k in
                                                         ("weights", "gradients", "optimizer", "activations", "extra"))
    others = sum(p.numel() for n, p in params.items() if n not in s.masks)
    for rnd, rec in enumerate(history, 1):  # dense gradients are charged exactly in the rounds that compute them
        dense = s.dense_gradient_layers(rnd)
        want = sum(s.masks[n].numel() if n in dense else int(s.masks[n].sum()) for n in s.masks) + others
        assert rec.device_memory["gradients"] == 4 * want, (algo, rnd)
        assert bool(dense) == (algo in ("prunefl", "feddst")), (algo, rnd)  # both readjust in rounds 1 and 2


def test_dynamic_baselines_change_masks(toy):
    for algo in ("prunefl", "feddst"):
        _, s = _run(toy, algo)
        assert not masks_equal(s.server_masks[1], s.masks), algo


def test_same_seed_same_result(toy):
    for algo in ("snip", "feddst"):
        h1, s1 = _run(toy, algo, seed=5)
        h2, s2 = _run(toy, algo, seed=5)
        assert [r.accuracy for r in h1] == [r.accuracy for r in h2], algo
        assert masks_equal(s1.masks, s2.masks)
        assert [r.bytes_up for r in h1] == [r.bytes_up for r in h2]
