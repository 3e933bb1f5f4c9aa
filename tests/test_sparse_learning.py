"""Sparse federated training must learn with the CLI defaults (issue 14), and a run that does not is called so.

Toy scale: LeNet-5 on 3000 MNIST images, 10 clients, 4 per round, 3 rounds of 2 local epochs, 5 % density. Before the fix every
method whose initial mask is random (ERK) or magnitude ended exactly at the majority-class share (loss ln 10).
"""

import numpy as np
import pytest
import torch

from toolchain.contracts.errors import ToolchainError
from toolchain.data.datasets import Dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.quality import chance_accuracy, chance_message
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.fl.sparse_init import rescale_kept
from toolchain.learning.pruning import make_strategy
from toolchain.learning.pruning.scores import random_masks
from toolchain.models.zoo import build_model
from toolchain.pipelines.build import BuildOptions
from toolchain.pipelines.train import TrainOptions


@pytest.fixture(scope="module")
def toy(mnist):
    return Dataset("mnist-toy", mnist.x_train[:3000], mnist.y_train[:3000], mnist.x_test[:1000], mnist.y_test[:1000],
                   10, mnist.preprocessing)


def _cli_config(algo: str = "random", **algo_options) -> TrainConfig:
    """``toolchain train --algo ALGO``'s own defaults, with the issue's federation, 3 rounds of 2 local epochs on 300
    images per client."""
    cfg = TrainOptions(algo=algo, out="-", density=0.05, clients=10, per_round=4, rounds=3, local_epochs=2,
                       algo_options=algo_options).train_config()
    cfg.eval_samples = None
    return cfg


def _final_accuracy(toy, algo: str, cfg: TrainConfig) -> float:
    fed = Federation.from_dataset(toy, cfg)
    seed_everything(cfg.seed)
    model = build_model("lenet5", toy.input_shape, 10)
    return simulate(make_strategy(algo, cfg), model, fed, cfg, progress=False)[-1].accuracy


@pytest.mark.parametrize("algo", ["random", "magnitude", "feddst", "fedtiny"])
def test_sparse_run_leaves_chance_with_cli_defaults(toy, algo):
    chance = chance_accuracy(toy.y_test, 10)
    acc = _final_accuracy(toy, algo, _cli_config(algo))
    assert chance_message(acc, chance) is None, (algo, acc)
    assert acc > 0.4, (algo, acc)  # chance is 0.126 on these 1000 test images


def test_budget_reaches_each_method_through_its_own_option():
    """``--budget`` sets the per-layer budget of whichever method runs; an explicit ``--algo-opt`` wins."""
    def opts(algo: str, budget: str, **algo_options) -> dict:
        return TrainOptions(algo=algo, out="-", budget=budget, algo_options=algo_options).train_config().algo_options

    assert opts("prunefl", "equal") == {"initial_scope": "equal"}
    assert opts("magnitude", "equal") == {"scope": "equal"}
    assert opts("fedtiny", "equal") == {"candidate_base": "equal"}
    assert opts("feddst", "equal", delta=5) == {"delta": 5, "budget": "equal"}
    assert opts("magnitude", "equal", scope="global") == {"scope": "global"}
    assert opts("snip", "equal") == {} and opts("random", "erk") == {}
    # the product's default is the equal budget, for train and build alike; the methods' own stays the papers' ERK
    assert TrainOptions(algo="prunefl", out="-").train_config().algo_options == {"initial_scope": "equal"}
    assert BuildOptions(algo="fedtiny", target="esp32", out="-").train_config().algo_options == {
        "candidate_base": "equal"}
    assert make_strategy("random", TrainConfig()).opts["budget"] == "erk"
    with pytest.raises(ToolchainError, match="unknown budget 'flat'"):
        TrainOptions(algo="random", out="-", budget="flat").validate()


def test_the_old_collapse_is_reported_as_chance(toy):
    """The settings of the collapse (masked dense init, SGD 0.05) still end at chance; the guard says so."""
    cfg = _cli_config(sparse_init="none")
    cfg.optimizer, cfg.lr = "sgd", 0.05
    acc = _final_accuracy(toy, "random", cfg)
    message = chance_message(acc, chance_accuracy(toy.y_test, 10))
    assert message is not None and "chance level" in message


def test_rescale_restores_the_dense_signal_per_unit():
    """Each unit's kept weights carry the unit's dense norm; the logits depend on the input again."""
    torch.manual_seed(0)
    model = build_model("lenet5", (28, 28, 1), 10)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(256, 1, 28, 28)
    with torch.no_grad():
        dense_spread = float(model(x).std(0).mean())
    masks = random_masks(model, 0.05, torch.Generator().manual_seed(1))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
        masked_spread = float(model(x).std(0).mean())
    rescale_kept(model, masks, dense)
    with torch.no_grad():
        rescaled_spread = float(model(x).std(0).mean())
    for n, m in masks.items():
        w, w0 = params[n].detach().flatten(1), dense[n].flatten(1)
        alive = m.flatten(1).any(1)
        assert torch.allclose(w.norm(dim=1)[alive], w0.norm(dim=1)[alive], rtol=1e-5)
        assert torch.all(w[~m.flatten(1)] == 0)
    assert masked_spread < 0.01 * dense_spread  # the collapse: outputs no longer depend on the input
    assert 0.5 < rescaled_spread / dense_spread < 2.0


def test_chance_accuracy_is_the_majority_share():
    assert chance_accuracy(np.array([0, 0, 0, 1]), 2) == 0.75
    assert chance_message(0.80, 0.75) is None and chance_message(0.79, 0.75) is not None
    assert chance_message(float("nan"), 0.1) is not None
