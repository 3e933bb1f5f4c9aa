"""The vectorised client engine (toolchain/learning/fl/vectorised.py) against the one-by-one engine.

The reference is ``local_train`` (one client at a time, one torch.optim optimizer, the layers' own autograd
functions), which the vectorised engine does not call. In float64 the two agree to rounding noise, so a wrong
update, batch, augmentation, BN statistic or hook call shows as a real difference; in float32 whole runs agree
closely (bench/vectorised_check.py measures how far rounding alone moves a run).
"""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from toolchain.data.datasets import Dataset
from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.local import LocalJob, augment_apply, augment_batch, augment_draws, local_train
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.fl.vectorised import DeviceData, run_together, train_together
from toolchain.learning.pruning import make_strategy
from toolchain.models.zoo import build_model

# the device the engine trains on: the CPU in CI; bench/gpu_grid.sh runs this file with TOOLCHAIN_TEST_DEVICE=cuda
DEVICE = os.environ.get("TOOLCHAIN_TEST_DEVICE", "cpu")


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def test_augmentation_of_stacked_batches_equals_per_image_crops():
    x = torch.randn(3, 5, 3, 8, 8)
    draws = [augment_draws(5, "flip-crop", torch.Generator().manual_seed(i)) for i in range(3)]
    got = augment_apply(x, torch.stack([f for f, _ in draws]), torch.stack([o for _, o in draws]))
    for i, (flip, off) in enumerate(draws):  # the reference: flip, pad by 4, slice each image's window
        ref = F.pad(torch.where(flip[:, None, None, None], x[i].flip(3), x[i]), (4, 4, 4, 4))
        ref = torch.stack([ref[j, :, off[j, 0]:off[j, 0] + 8, off[j, 1]:off[j, 1] + 8] for j in range(5)])
        assert torch.equal(got[i], ref)
    # one image set, one generator: the same draws in the same order as the per-batch function
    assert torch.equal(augment_batch(x[0], "flip-crop", torch.Generator().manual_seed(0)), got[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_clients_trained_together_equal_clients_trained_alone(float64, optimizer):
    """Three clients of unequal sizes (so groups of unequal batches and clients that stop early), BN, flip-crop
    augmentation, masks, and every hook ``local_train`` offers, one of them on each client."""
    torch.manual_seed(0)
    base = build_model("resnet8", (16, 16, 3), 10)
    params = dict(base.named_parameters())
    masks = {n: torch.rand_like(p) < 0.5 for n, p in params.items() if p.dim() > 1}
    sizes = [37, 20, 8]
    data = [(torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))) for n in sizes]
    cfg = TrainConfig(batch_size=8, lr=0.05, optimizer=optimizer, augment="flip-crop", local_epochs=2)
    calls: dict[str, list] = {}

    def hooks(i: int, model: torch.nn.Module) -> dict:
        own = dict(model.named_parameters())
        first = "stem.0.weight"
        if i == 0:  # a regulariser and a per-step learning rate that read the client's current weights
            return {"extra_loss": lambda _m: 0.01 * own[first].pow(2).sum(),
                    "lr_fn": lambda s, t: 0.05 / (1.0 + float(own[first].detach().abs().sum()) * (s + 1) / t)}
        if i == 1:  # a gradient statistic, and the last mini-batch's dense gradients
            def grad_hook(g: dict) -> None:
                calls.setdefault("grads", []).append(float(g[first].abs().sum()))
            return {"grad_hook": grad_hook, "keep_last_grads": True}

        def mask_update(step: int, total: int, g: dict):  # swap masks mid-training, as FedDST's readjustment
            calls.setdefault("steps", []).append((step, total))
            if step != 1:
                return None
            new = {n: m.clone() for n, m in masks.items()}
            new[first] = (own[first].detach().abs() + g[first].abs()) > float(own[first].detach().abs().median())
            return new
        return {"mask_update": mask_update}

    alone, together = [copy.deepcopy(base) for _ in sizes], [copy.deepcopy(base) for _ in sizes]
    ref = [local_train(m, masks, x, y, cfg, cfg.lr, torch.Generator().manual_seed(i), **hooks(i, m))
           for i, (m, (x, y)) in enumerate(zip(alone, data, strict=True))]
    ref_calls, calls = calls, {}
    jobs = [LocalJob(m, masks, x, y, cfg, cfg.lr, torch.Generator().manual_seed(i), **hooks(i, m))
            for i, (m, (x, y)) in enumerate(zip(together, data, strict=True))]
    got = train_together(jobs, torch.device(DEVICE), DeviceData(torch.device(DEVICE)))
    assert calls["steps"] == ref_calls["steps"] and calls["grads"] == pytest.approx(ref_calls["grads"], rel=1e-9)
    for r, g, a, b in zip(ref, got, alone, together, strict=True):
        assert (g.steps, g.loss) == (r.steps, pytest.approx(r.loss, rel=1e-9))
        assert _max_diff(a, b) < 1e-9  # weights and BN running statistics
        assert all(torch.equal(r.masks[n], g.masks[n]) for n in masks)
    assert not torch.equal(got[2].masks["stem.0.weight"], masks["stem.0.weight"])  # the mask update took effect
    assert all(torch.allclose(ref[1].last_grads[n], got[1].last_grads[n], atol=1e-9) for n in masks)


def _toy(mnist) -> Dataset:
    return Dataset("mnist-toy", mnist.x_train[:900], mnist.y_train[:900], mnist.x_test[:300], mnist.y_test[:300], 10,
                   mnist.preprocessing)


@pytest.mark.parametrize("algo", ["fedavg", "fedtiny", "feddst", "prunefl", "snip", "fedmef"])
def test_a_vectorised_run_matches_the_one_by_one_run(mnist, algo):
    """Whole runs in float32 (LeNet-5, non-IID clients of unequal sizes, mask adjustments every round): the
    methods' own client code runs in the client threads and meets in one batched step."""
    toy, runs = _toy(mnist), []
    for device in (None, DEVICE):
        cfg = TrainConfig(rounds=3, clients=6, per_round=4, batch_size=16, lr=0.1, partition="dirichlet", alpha=0.5,
                          density=0.1, seed=0, algo_options={"delta": 1, "t_end": 3})
        fed = Federation.from_dataset(toy, cfg)
        seed_everything(0)
        strategy = make_strategy(algo, cfg)
        hist = simulate(strategy, build_model("lenet5", toy.input_shape, 10), fed, cfg, progress=False,
                        clients_device=device)
        runs.append((strategy, hist))
    (a, ha), (b, hb) = runs
    # FedMef's SAP keeps the top 30 % of |x| per layer: float rounding of the batched forward moves entries across
    # that threshold, and its masks follow the weights' magnitudes; the float64 test above is its exact check
    agree, drift = (0.97, 5e-2) if algo == "fedmef" else (1.0, 1e-4)
    assert min(float((a.masks[n] == b.masks[n]).float().mean()) for n in a.masks) >= agree
    assert _max_diff(a.model, b.model) < drift
    assert [r.accuracy for r in hb] == pytest.approx([r.accuracy for r in ha], abs=2 / 300)  # 2 test images
    assert [r.bytes_up for r in hb] == pytest.approx([r.bytes_up for r in ha], rel=1e-3)  # encoded sizes vary a little


def test_a_checkpoint_resumes_on_the_other_engine(mnist, tmp_path):
    """The server's state stays on the CPU, so a grid run checkpointed by one engine finishes on the other, and each
    round's record names the engine that ran it (a grid row says which rounds a GPU made)."""
    toy = _toy(mnist)
    cfg = TrainConfig(rounds=3, clients=6, per_round=4, batch_size=16, lr=0.1, partition="dirichlet", alpha=0.5,
                      density=0.1, seed=0, algo_options={"delta": 1, "t_end": 3})
    fed = Federation.from_dataset(toy, cfg)

    class Stop(Exception):
        pass

    def stop_after_2(rec) -> None:
        if rec.round == 2:
            raise Stop

    def run(**kw):
        seed_everything(0)
        strategy = make_strategy("feddst", cfg)
        return strategy, simulate(strategy, build_model("lenet5", toy.input_shape, 10), fed, cfg, progress=False, **kw)

    ref, _ = run()
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Stop):
        run(checkpoint=ckpt, on_round=stop_after_2)  # one by one on the CPU, "killed" after round 2
    resumed, hist = run(checkpoint=ckpt, clients_device=DEVICE)  # round 3 with the clients batched
    assert [r.round for r in hist] == [1, 2, 3]
    assert [r.engine for r in hist] == ["one-by-one cpu"] * 2 + [f"vectorised {DEVICE}"]
    assert all(torch.equal(ref.masks[n], resumed.masks[n]) for n in ref.masks)
    assert _max_diff(ref.model, resumed.model) < 1e-4


def test_fedmef_layers_batched_give_the_sequential_gradients(float64):
    """FedMef's client model (NSConv instead of BN, SAP on every layer, 1-bit ReLU): NSConv's standardisation
    under vmap and SAP's vmappable formulation against the layers' own autograd functions, two clients."""
    from toolchain.learning.fl.sap import enable_sap
    from toolchain.models.nsconv import convert_to_nsconv

    torch.manual_seed(1)
    base = enable_sap(convert_to_nsconv(build_model("resnet8", (16, 16, 3), 10)), relu_bits=True)
    masks = {n: torch.rand_like(p) < 0.3 for n, p in base.named_parameters() if n.endswith("weight") and p.dim() > 1}
    from toolchain.learning.fl.masks import apply_masks

    apply_masks(base, masks)
    # integer-valued images: many ties at SAP's threshold, taken in index order as compress() does
    data = [(torch.randint(-3, 4, (n, 3, 16, 16)).double(), torch.randint(0, 10, (n,))) for n in (24, 13)]
    cfg = TrainConfig(batch_size=8, lr=0.05)
    alone, together = [copy.deepcopy(base) for _ in data], [copy.deepcopy(base) for _ in data]
    ref = [local_train(m, masks, x, y, cfg, cfg.lr, torch.Generator().manual_seed(i))
           for i, (m, (x, y)) in enumerate(zip(alone, data, strict=True))]
    got = train_together([LocalJob(m, masks, x, y, cfg, cfg.lr, torch.Generator().manual_seed(i))
                          for i, (m, (x, y)) in enumerate(zip(together, data, strict=True))],
                         torch.device(DEVICE), DeviceData(torch.device(DEVICE)))
    for r, g, a, b in zip(ref, got, alone, together, strict=True):
        assert g.loss == pytest.approx(r.loss, rel=1e-9)
        assert _max_diff(a, b) < 1e-9
    assert _max_diff(alone[0], base) > 1e-3  # it trained


def test_a_failing_client_or_trainer_fails_the_round_without_hanging():
    from toolchain.learning.fl.local import ROUTE

    def client(i: int):
        def work():
            if i == 1:
                raise ValueError("client 1 broke")
            return ROUTE.trainer.submit(i)
        return work

    with pytest.raises(ValueError, match="client 1 broke"):
        run_together([client(0), client(1), client(2)], lambda jobs: [f"res{j}" for j in jobs])
    assert run_together([client(0), client(2)], lambda jobs: [f"res{j}" for j in jobs]) == ["res0", "res2"]

    def broken_trainer(jobs):
        raise RuntimeError("out of device memory")

    with pytest.raises(RuntimeError, match="out of device memory"):
        run_together([client(0), client(2)], broken_trainer)


def test_train_device_flag(tmp_path, capsys):
    """``toolchain train --device``: a device this machine lacks, an unknown one, or one with a Flower engine is
    refused in one line before anything is written; ``--device cpu`` trains with the vectorised engine."""
    from toolchain.cli import main

    base = ["train", "--algo", "random", "--model", "lenet5", "--rounds", "1", "--clients", "3", "--density", "0.05", "--batch-size", "500",
            "--quiet"]
    missing = "cuda:7" if torch.cuda.device_count() < 8 else "cuda:99"
    for extra, needle in ((["--device", missing], "no such CUDA device"), (["--device", "tpu0"], "torch device"),
                          (["--device", "cpu", "--engine", "flower-sim"], "in-process engine")):
        out = tmp_path / "refused"
        assert main([*base, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and not out.exists()
    out = tmp_path / "run"
    assert main([*base, "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["device"] == "cpu" and summary["accuracy"] > 0.5
