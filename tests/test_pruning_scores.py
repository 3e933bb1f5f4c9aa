"""One-shot scoring/mask functions (toolchain.learning.pruning.scores) and the prune/grow primitives (dynamic)."""

import math

import pytest
import torch

from toolchain.contracts.errors import ToolchainError
from toolchain.learning.fl.masks import kept_count, prunable_names
from toolchain.learning.fl.messages import TrainRes
from toolchain.learning.pruning.dynamic import (
    aggregate_sparse_gradients,
    cosine_rate,
    is_adjust_round,
    prune_and_grow,
    swap_counts,
    topk_inactive_gradients,
)
from toolchain.learning.pruning.scores import (
    equal_counts,
    erk_counts,
    erk_densities,
    keep_count,
    layer_counts,
    magnitude_masks,
    random_masks,
    snip_masks,
    synflow_masks,
)
from toolchain.models.zoo import build_model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("resnet8", (16, 16, 3), 10)


def _total(model) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in prunable_names(model))


@pytest.mark.parametrize("density", [0.01, 0.05, 0.3])
def test_every_scorer_keeps_the_exact_count(net, density):
    target = keep_count(_total(net), density)
    counts = erk_counts(net, density)
    assert sum(counts.values()) == target
    params = dict(net.named_parameters())
    assert all(1 <= counts[n] <= params[n].numel() for n in counts)
    dens = erk_densities(net, density)
    assert sum(dens[n] * params[n].numel() for n in dens) == pytest.approx(target)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    before = {k: v.clone() for k, v in net.state_dict().items()}
    masks = {
        "random": random_masks(net, density, torch.Generator().manual_seed(1)),
        "magnitude": magnitude_masks(net, density),
        "snip": snip_masks(net, x, y, density),
        "synflow": synflow_masks(net, (16, 16, 3), density, iterations=5),
        "magnitude-local": magnitude_masks(net, density, scope="local"),
    }
    for name, m in masks.items():
        assert set(m) == set(prunable_names(net)), name
        if name.endswith("local"):
            assert all(int(m[n].sum()) == max(1, round(density * m[n].numel())) for n in m)
        else:
            assert kept_count(m) == target, name
    assert all(int(masks["random"][n].sum()) == counts[n] for n in counts)  # exact ERK per layer
    # scorers never touch the model they score
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # magnitude keeps the largest |theta| globally
    kept = torch.cat([params[n].detach().abs()[masks["magnitude"][n]] for n in masks["magnitude"]])
    dropped = torch.cat([params[n].detach().abs()[~masks["magnitude"][n]] for n in masks["magnitude"]])
    assert kept.min() >= dropped.max()


def test_equal_budget_gives_every_layer_the_same_count_unless_it_is_full(net):
    assert equal_counts({"a": 10, "b": 20}, 25) == {"a": 10, "b": 15}  # a fills up, b takes the rest
    assert equal_counts({"a": 150, "b": 2400, "c": 840}, 302) == {"a": 101, "b": 100, "c": 101}
    assert equal_counts({"a": 3, "b": 4}, 7) == {"a": 3, "b": 4}
    params = dict(net.named_parameters())
    for density in (0.01, 0.05):
        counts = layer_counts(net, density, "equal")
        assert sum(counts.values()) == keep_count(_total(net), density)
        open_layers = [c for n, c in counts.items() if c < params[n].numel()]
        assert max(open_layers) - min(open_layers) <= 1
        masks = random_masks(net, density, torch.Generator().manual_seed(1), budget="equal")
        assert {n: int(m.sum()) for n, m in masks.items()} == counts
        mags = magnitude_masks(net, density, scope="equal")
        assert {n: int(m.sum()) for n, m in mags.items()} == counts
    bern = random_masks(net, 0.05, torch.Generator().manual_seed(1), bernoulli=True, budget="equal")
    big = max(counts, key=lambda n: params[n].numel())  # Bernoulli draws keep the equal count in expectation
    assert abs(int(bern[big].sum()) - counts[big]) < 5 * counts[big] ** 0.5
    with pytest.raises(ToolchainError, match="budget must be one of erk, equal"):
        layer_counts(net, 0.01, "uniform")


def test_random_masks_depend_only_on_the_seed(net):
    a = random_masks(net, 0.05, torch.Generator().manual_seed(3))
    b = random_masks(net, 0.05, torch.Generator().manual_seed(3))
    c = random_masks(net, 0.05, torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)


def test_cosine_schedule_and_adjust_rounds():
    assert cosine_rate(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_rate(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_rate(0.1, 100, 100) == pytest.approx(0.0) and cosine_rate(0.1, 101, 100) == 0.0
    # t_end is exclusive: alpha is 0 there, so round t_end is not an adjustment (issue 14)
    assert [t for t in range(1, 40) if is_adjust_round(t, 10, 30)] == [10, 20]
    assert all(cosine_rate(0.1, t, 30) > 0 for t in range(1, 40) if is_adjust_round(t, 10, 30))
    masks = {"a": torch.tensor([True] * 10 + [False] * 90), "b": torch.tensor([True] * 9 + [False])}
    counts = swap_counts(masks, ["a", "b"], 0.15)
    assert counts == {"a": math.ceil(0.15 * 10), "b": 1}  # b is capped by its single inactive slot


def test_topk_aggregate_prune_grow():
    masks = {"w": torch.tensor([True, True, True, False, False, False, False, False])}
    g1 = {"w": torch.tensor([9.0, 9.0, 9.0, 0.1, -3.0, 0.2, 2.0, 0.0])}
    top = topk_inactive_gradients(g1, masks, {"w": 2})
    idx, val, shape = top["w"]
    assert idx.tolist() == [4, 6] and val.tolist() == [-3.0, 2.0] and shape == (8,)  # never active positions
    r1 = TrainRes(0, {}, 30, extras=top)
    r2 = TrainRes(1, {}, 10, extras={"w": (torch.tensor([3, 6]), torch.tensor([8.0, -4.0]), (8,))})
    agg = aggregate_sparse_gradients([r1, r2], masks)
    expect = torch.zeros(8)
    expect[4], expect[6], expect[3] = -3.0 * 0.75, 2.0 * 0.75 - 4.0 * 0.25, 8.0 * 0.25
    assert torch.allclose(agg["w"], expect)
    params = {"w": torch.tensor([0.5, -0.1, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0])}
    new, grown = prune_and_grow(params, masks, agg, {"w": 2})
    assert int(new["w"].sum()) == int(masks["w"].sum())  # nnz unchanged
    assert new["w"].tolist() == [False, False, True, True, True, False, False, False]
    assert grown["w"].tolist() == [False, False, False, True, True, False, False, False]
    assert torch.all(params["w"][grown["w"]] == 0)
