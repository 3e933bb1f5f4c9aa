"""Federated engine invariants at toy scale: partitions, masks, wire codec, accounting, determinism."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.contracts.errors import ToolchainError
from toolchain.data.partition import partition
from toolchain.learning.fl import Federation, TrainConfig, codec, simulate
from toolchain.learning.fl.masks import apply_masks, density, global_topk, prunable_names
from toolchain.learning.fl.memory import measure_saved_tensors, training_memory
from toolchain.learning.fl.messages import TrainIns, TrainRes
from toolchain.learning.fl.simulator import read_checkpoint, seed_everything
from toolchain.learning.pruning import make_strategy
from toolchain.models.zoo import build_model


def test_partitions_cover_every_sample_once():
    labels = np.repeat(np.arange(10), 100)
    for scheme in ("iid", "dirichlet", "shards"):
        parts = partition(labels, 8, scheme, seed=1, alpha=0.3)
        allidx = np.concatenate(parts)
        assert len(parts) == 8 and sorted(allidx.tolist()) == list(range(1000)), scheme
    # Dirichlet with small alpha is skewed: most clients are dominated by few classes
    parts = partition(labels, 8, "dirichlet", seed=1, alpha=0.1)
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.median(top_share) > 0.5
    assert all(len(np.unique(labels[p])) <= 2 for p in partition(labels, 10, "shards", seed=0, shards_per_client=2))
    with pytest.raises(ToolchainError):
        partition(labels, 0, "iid", seed=0)


def test_global_topk_keeps_exact_count():
    scores = {"a": torch.arange(10.0), "b": torch.tensor([[100.0, 0.5], [3.0, 2.0]])}
    masks = global_topk(scores, 0.5)
    assert sum(int(m.sum()) for m in masks.values()) == 7
    assert masks["b"][0, 0] and masks["a"][9] and not masks["a"][0]


def test_codec_roundtrip_and_sizes():
    torch.manual_seed(0)
    w = {"conv.weight": torch.randn(16, 8, 3, 3), "conv.bias": torch.randn(16), "fc.weight": torch.randn(10, 300)}
    masks = {"conv.weight": torch.rand(16, 8, 3, 3) < 0.05, "fc.weight": torch.rand(10, 300) < 0.5}
    for k, m in masks.items():
        w[k] = w[k] * m
    blob = codec.encode(w, masks, mask_travels=True)
    got, got_masks = codec.decode(blob)
    for k in w:
        assert torch.equal(got[k], w[k])
    for k in masks:
        assert torch.equal(got_masks[k], masks[k])
    # the receiver that already holds the masks gets only values
    blob2 = codec.encode(w, masks, mask_travels=False)
    got2, travelled = codec.decode(blob2, masks)
    assert not travelled and all(torch.equal(got2[k], w[k]) for k in w)
    nnz = sum(int(m.sum()) for m in masks.values())
    dense_vals = 16 * 4
    assert len(blob2) < 4 * (nnz + 16) + 100 < len(blob) and len(blob2) >= 4 * nnz + dense_vals


def test_messages_roundtrip_with_sparse_extras():
    masks = {"w": torch.tensor([True, False, True, False])}
    res = TrainRes(3, {"w": torch.tensor([1.0, 0.0, 2.0, 0.0])}, 17, {"loss": 0.5},
                   {"w": (torch.tensor([1, 3]), torch.tensor([0.25, -0.5]), (4,))})
    back = TrainRes.from_bytes(res.to_bytes(masks), masks)
    assert back.client_id == 3 and back.num_examples == 17 and back.metrics == {"loss": 0.5}
    idx, val, shape = back.extras["w"]
    assert idx.tolist() == [1, 3] and val.tolist() == [0.25, -0.5] and shape == (4,)
    ins = TrainIns(2, {"w": torch.tensor([1.0, 0.0, 2.0, 0.0])}, masks, {"lr": 0.1}, mask_travels=True)
    back_ins = TrainIns.from_bytes(ins.to_bytes(), {})
    assert torch.equal(back_ins.masks["w"], masks["w"]) and back_ins.mask_travels and back_ins.config == {"lr": 0.1}


def test_activation_memory_is_measured():
    model = build_model("lenet5", (28, 28, 1), 10)
    x, y = torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    a8 = measure_saved_tensors(model, x, y).activations
    a16 = measure_saved_tensors(model, torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)).activations
    # conv1's input (8x1x28x28 floats) and its ReLU output (8x6x28x28) alone are saved for backward
    assert a8 >= 8 * 4 * (28 * 28 + 6 * 28 * 28)
    assert 1.9 < a16 / a8 < 2.1  # activations scale with the batch
    masks = global_topk({n: p.abs() for n, p in model.named_parameters() if n in prunable_names(model)}, 0.1)
    dense = training_memory(model, {k: torch.ones_like(v) for k, v in masks.items()}, x, y)
    sparse = training_memory(model, masks, x, y)
    assert sparse.weights < 0.3 * dense.weights and sparse.gradients < 0.2 * dense.gradients


def test_measuring_saved_tensors_frees_the_probe_graph():
    """Each round probes its memory with one forward (``measure_saved_tensors``). The probe's graph must die with
    it: a pack hook that hands autograd a saved output as itself makes a cycle through C++ (output -> grad_fn ->
    saved output) that gc cannot see, and every probe's activations stayed alive (a CIFAR-10 grid worker reached
    15 GB and was killed for memory after 4 runs)."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    outputs = []  # ReLU saves its output for backward: the case that made the cycle
    model[1].register_forward_hook(lambda _m, _i, out: outputs.append(weakref.ref(out)))
    measure_saved_tensors(model, torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
    gc.collect()
    assert len(outputs) == 1 and outputs[0]() is None


def test_saved_model_state_is_not_an_activation_and_a_weight_copy_costs_its_kept_entries():
    """docs/memory.md: what autograd saves of the model's own state (BN statistics, NSConv masks) is already in
    the weights term; an NSConv effective weight is charged at its kept entries (a device holds nothing else)."""
    x, y = torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    bn = build_model("resnet8", (32, 32, 3), 10)
    saved = measure_saved_tensors(bn, x, y)
    stats = sum(b.numel() * 4 for n, b in bn.named_buffers() if "running_" in n)
    # BN's backward keeps the running statistics: model state, not activations
    assert saved.buffers == stats and saved.weight_copies == saved.weight_copies_device == 0
    ns = build_model("resnet8", (32, 32, 3), 10, norm="nsconv")
    names = [n for n in prunable_names(ns) if n.endswith(".weight") and ns.get_parameter(n).dim() == 4]
    dense = measure_saved_tensors(ns, x, y)
    conv_numel = sum(ns.get_parameter(n).numel() for n in names)
    assert dense.weight_copies == dense.weight_copies_device == 4 * conv_numel
    assert dense.buffers == conv_numel  # the bool masks, one byte each, are model state too
    masks = global_topk({n: ns.get_parameter(n).abs() for n in names}, 0.05)
    apply_masks(ns, masks)
    sparse = measure_saved_tensors(ns, x, y)
    nnz = sum(int(m.sum()) for m in masks.values())
    assert sparse.weight_copies == 4 * conv_numel and sparse.weight_copies_device == 4 * nnz
    assert sparse.activations == dense.activations  # weight sparsity removes no feature map
    mem = training_memory(ns, masks, x, y)
    assert mem.activations == sparse.activations + 4 * nnz


@pytest.fixture(scope="module")
def toy_fed(mnist):
    small = type(mnist)("mnist-small", mnist.x_train[:2000], mnist.y_train[:2000], mnist.x_test[:500],
                        mnist.y_test[:500], 10, mnist.preprocessing)
    return small


def _run(toy_fed, algo: str, seed: int = 0, **kw):
    cfg = TrainConfig(rounds=3, clients=4, per_round=3, batch_size=32, lr=0.05, density=0.2, seed=seed, **kw)
    fed = Federation.from_dataset(toy_fed, cfg)
    strategy = make_strategy(algo, cfg)
    seed_everything(seed)
    model = build_model("lenet5", (28, 28, 1), 10)
    return simulate(strategy, model, fed, cfg, progress=False), strategy


def test_gmp_reaches_exact_density_and_masks_hold(toy_fed):
    history, strategy = _run(toy_fed, "gmp", algo_options={"prune_end": 2})
    total = sum(m.numel() for m in strategy.masks.values())
    assert history[-1].density == pytest.approx(round(0.2 * total) / total)
    params = dict(strategy.model.named_parameters())
    for name, m in strategy.masks.items():
        assert torch.all(params[name][~m] == 0)  # pruned weights are exactly zero
    assert history[-1].bytes_up_per_client < history[0].bytes_up_per_client / 3  # sparse uploads shrink
    assert all(r.device_memory["activations"] > 0 for r in history)


def test_same_seed_same_result(toy_fed):
    h1, s1 = _run(toy_fed, "gmp", seed=3)
    h2, s2 = _run(toy_fed, "gmp", seed=3)
    assert [r.accuracy for r in h1] == [r.accuracy for r in h2]
    for (k, a), b in zip(s1.model.state_dict().items(), s2.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_apply_masks_zeroes_pruned():
    model = build_model("mlp", (28, 28, 1), 10)
    masks = {n: torch.rand_like(p) < 0.1 for n, p in model.named_parameters() if n in prunable_names(model)}
    apply_masks(model, masks)
    assert density(masks) == pytest.approx(0.1, abs=0.01)
    params = dict(model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in masks.items())


@pytest.mark.parametrize("algo", ["fedavg", "fedtiny", "feddst", "fedmef", "prunefl", "snip", "random"])
def test_checkpoint_resume_is_bit_identical(toy_fed, tmp_path, algo):
    """A run stopped after round 2 and resumed from its checkpoint ends exactly where an uninterrupted run does
    (the benchmark grid relies on this to fill over several sessions)."""
    opts = {"delta": 1, "t_end": 3}  # adjustments in every round, so method state crosses the checkpoint
    full, s_full = _run(toy_fed, algo, algo_options=opts)
    ckpt = tmp_path / "run.pt"
    cfg = TrainConfig(rounds=3, clients=4, per_round=3, batch_size=32, lr=0.05, density=0.2, seed=0,
                      algo_options=opts)
    fed = Federation.from_dataset(toy_fed, cfg)
    seed_everything(0)
    with pytest.raises(_Stop):  # the process "dies" right after round 2's checkpoint was written
        simulate(make_strategy(algo, cfg), build_model("lenet5", (28, 28, 1), 10), fed, cfg, progress=False,
                 checkpoint=ckpt, on_round=_stop_after(2))
    assert ckpt.is_file()
    kept = read_checkpoint(ckpt).strategy.ctx
    assert kept.server_x is None and "fewshot" not in kept.extra  # re-drawn from the data on resume
    if algo == "fedtiny":  # a checkpoint written before the modules moved (issue 18) resumes too
        _as_old_module_paths(ckpt)
    seed_everything(123)  # the resumed run must not depend on the caller's global RNG state
    strategy = make_strategy(algo, cfg)
    resumed = simulate(strategy, build_model("lenet5", (28, 28, 1), 10), fed, cfg, progress=False, checkpoint=ckpt)
    assert [r.accuracy for r in resumed] == [r.accuracy for r in full]
    assert [r.bytes_up for r in resumed] == [r.bytes_up for r in full]
    for (k, a), b in zip(s_full.model.state_dict().items(), strategy.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert all(torch.equal(s_full.masks[k], strategy.masks[k]) for k in s_full.masks)


def test_a_checkpoint_refuses_other_training_data(toy_fed, tmp_path):
    """A checkpoint keeps the server samples' labels, not the samples: resumed on other data it is refused in
    one line instead of continuing with a server batch the run never had."""
    cfg = TrainConfig(rounds=3, clients=4, per_round=3, batch_size=32, lr=0.05, density=0.2, seed=0)
    ckpt = tmp_path / "run.pt"
    seed_everything(0)
    with pytest.raises(_Stop):
        simulate(make_strategy("snip", cfg), build_model("lenet5", (28, 28, 1), 10),
                 Federation.from_dataset(toy_fed, cfg), cfg, progress=False, checkpoint=ckpt, on_round=_stop_after(1))
    other = type(toy_fed)("mnist-other", toy_fed.x_train[::-1].copy(), toy_fed.y_train[::-1].copy(), toy_fed.x_test,
                          toy_fed.y_test, 10, toy_fed.preprocessing)
    with pytest.raises(ValueError, match="other training data; delete it to start over"):
        simulate(make_strategy("snip", cfg), build_model("lenet5", (28, 28, 1), 10),
                 Federation.from_dataset(other, cfg), cfg, progress=False, checkpoint=ckpt)


class _Stop(Exception):
    pass


def _as_old_module_paths(ckpt: Path) -> None:
    """Rewrite a checkpoint as the toolchain before the layered package wrote it: the pickle names its classes
    by module (``GLOBAL`` opcodes, newline-terminated at torch's pickle protocol 2, so a byte replace is exact)."""
    with zipfile.ZipFile(ckpt) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(ckpt, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                for new, old in (("toolchain.learning.fl", "toolchain.fl"),
                                 ("toolchain.learning.pruning", "toolchain.pruning"),
                                 ("toolchain.models.", "models.")):
                    assert f"c{new}".encode() in data, new
                    data = data.replace(f"c{new}".encode(), f"c{old}".encode())
            z.writestr(info, data)


def _stop_after(n: int):
    def hook(rec):
        if rec.round == n:
            raise _Stop
    return hook


def test_augment_batch_is_reproducible_and_shape_preserving():
    from toolchain.learning.fl.local import augment_batch

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert augment_batch(x, "none", torch.Generator()) is x
    a = augment_batch(x, "flip-crop", torch.Generator().manual_seed(1))
    b = augment_batch(x, "flip-crop", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    flipped = augment_batch(x, "flip", torch.Generator().manual_seed(3))
    for i in range(2):  # each image is itself or its mirror image
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    with pytest.raises(ValueError):
        augment_batch(x, "flipcrop", torch.Generator())


def test_evaluate_batches_do_not_change_the_result():
    # evaluate() picks a small batch on the CPU (speed); the reading must be the whole set's, however it is cut
    from toolchain.learning.fl.local import evaluate

    torch.manual_seed(0)
    model = build_model("resnet8", (32, 32, 3), 10)
    x, y = torch.randn(250, 3, 32, 32), torch.randint(0, 10, (250,))
    whole = evaluate(model, x, y, batch_size=250)
    for cut in (None, 7, 100):  # None: the CPU default; 7 leaves a short last batch
        acc, loss = evaluate(model, x, y, batch_size=cut)
        assert acc == whole[0]
        assert loss == pytest.approx(whole[1], rel=1e-5)
