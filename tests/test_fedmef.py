"""FedMef parts at toy scale: SAP, NSConv, budget-aware extrusion, mask broadcast, export, CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolchain.learning.fl import Federation, TrainConfig, simulate
from toolchain.learning.fl.masks import apply_masks
from toolchain.learning.fl.sap import (
    DEFAULT_GAMMA,
    BitReLU,
    SAPConv2d,
    SAPLinear,
    compress,
    decompress,
    enable_sap,
    measure_footprint,
)
from toolchain.learning.fl.strategy import ClientData
from toolchain.learning.pruning import make_strategy
from toolchain.learning.pruning.fedmef import bae_lr, rex_budget
from toolchain.learning.pruning.scores import random_masks
from toolchain.models.nsconv import NSConv, _Standardize, materialize
from toolchain.models.zoo import build_model


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.endswith("weight")])


# ---- SAP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
    nn.Conv2d(4, 6, 1, bias=False), nn.Linear(20, 7),
])
def test_sap_forward_is_bit_identical_and_input_grad_exact(layer):
    torch.manual_seed(0)
    shape = (5, 20) if isinstance(layer, nn.Linear) else (5, layer.in_channels, 9, 9)
    x = torch.randn(shape, requires_grad=True)
    plain = copy.deepcopy(layer)
    y0 = plain(x)
    gy = torch.randn_like(y0)
    (gx0,) = torch.autograd.grad(y0, x, gy)
    sap = enable_sap(copy.deepcopy(layer), DEFAULT_GAMMA)
    assert isinstance(sap, (SAPConv2d, SAPLinear))
    y1 = sap(x)
    assert torch.equal(y0, y1)  # same kernel, same inputs: bit-identical
    (gx1,) = torch.autograd.grad(y1, x, gy)
    assert torch.allclose(gx0, gx1, atol=1e-6)  # the error signal passed down is exact


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Linear(30, 9)])
def test_sap_weight_gradient_exact_at_gamma_zero(layer):
    torch.manual_seed(1)
    shape = (6, 30) if isinstance(layer, nn.Linear) else (6, 4, 10, 10)
    x = torch.randn(shape)
    plain, sap = copy.deepcopy(layer), enable_sap(copy.deepcopy(layer), 0.0, fp16=False)
    r = torch.randn_like(plain(x))

    def loss(out: torch.Tensor) -> torch.Tensor:
        return (out * r).sum()

    loss(plain(x)).backward()
    loss(sap(x)).backward()
    assert torch.allclose(plain.weight.grad, sap.weight.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(plain.bias.grad, sap.bias.grad, atol=1e-6)
    # fp16 storage of all entries: equal up to half precision
    sap16 = enable_sap(copy.deepcopy(layer), 0.0, fp16=True)
    loss(sap16(x)).backward()
    err = (plain.weight.grad - sap16.weight.grad).norm() / plain.weight.grad.norm()
    assert 0 < err < 2e-3


def test_sap_keeps_the_largest_entries_and_saves_fp16_plus_int32():
    x = torch.randn(2, 3, 5, 5)
    values, idx = compress(x, 0.7, fp16=True)
    k = math.ceil(0.3 * x.numel())
    assert values.dtype == torch.float16 and idx.dtype == torch.int32 and len(values) == len(idx) == k
    assert x.abs().flatten()[idx.long()].min() >= torch.topk(x.abs().flatten(), k).values.min()
    rec = decompress(values, idx, x.shape, torch.float32)
    assert int((rec != 0).sum()) == k
    # the saved-tensor hooks see exactly those bytes in place of the dense fp32 inputs of conv and linear
    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 2))

    masks = {"0.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}
    y = torch.tensor([0, 1])
    plain = measure_footprint(net(), masks, x, y)
    sap = measure_footprint(enable_sap(net(), 0.7), masks, x, y)
    k_fc = math.ceil(0.3 * 2 * 100)
    assert plain.activations - sap.activations == (x.numel() + 2 * 100) * 4 - (k + k_fc) * (2 + 4)


def test_cosine_similarity_of_sap_weight_gradient_at_default_gamma():
    """Reported, not a paper number: cosine(SAP weight grad, exact) on a 5 %-dense ResNet-8 NSConv."""
    torch.manual_seed(0)
    model = build_model("resnet8", (32, 32, 3), 10, norm="nsconv")
    masks = random_masks(model, 0.05, torch.Generator().manual_seed(0))
    apply_masks(model, masks)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    ref, sap = copy.deepcopy(model), enable_sap(copy.deepcopy(model), DEFAULT_GAMMA)
    F.cross_entropy(ref(x), y).backward()
    F.cross_entropy(sap(x), y).backward()
    cos = float(F.cosine_similarity(_grads(ref), _grads(sap), dim=0))
    print(f"SAP gamma={DEFAULT_GAMMA}: cosine(weight grad, exact) = {cos:.4f}")
    assert 0.5 < cos < 1.0


def test_bit_relu_matches_relu():
    x = torch.randn(3, 5, 7, requires_grad=True)
    g = torch.randn(3, 5, 7)
    (a,) = torch.autograd.grad(torch.relu(x), x, g)
    (b,) = torch.autograd.grad(BitReLU()(x), x, g)
    assert torch.equal(a, b)


# ---- NSConv ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stats", ["active", "all"])
def test_nsconv_standardises_each_filter(stats):
    torch.manual_seed(0)
    conv = NSConv(6, 5, 3, padding=1, stats=stats)
    with torch.no_grad():
        conv.weight.normal_(0.3, 2.0)
        conv.gain.uniform_(0.5, 2.0)
    mask = torch.rand_like(conv.weight) < 0.4
    mask[0] = False
    mask[0, 0, 0, 0] = mask[0, 1, 1, 1] = True  # a filter with 2 active entries
    apply_masks(nn.Sequential(conv), {"0.weight": mask})
    w = conv.effective_weight().detach() / conv.gain.detach()
    assert torch.all(w[~mask] == 0)  # pruned entries stay exactly 0
    for o in range(5):
        if stats == "active":
            sel = w[o][mask[o]]
        else:  # statistics over all entries, then re-masked: check on the pre-mask standardised filter
            raw = conv.weight[o].detach()
            sel = (raw - raw.mean()) / torch.sqrt(raw.numel() * raw.var())
            assert torch.allclose(w[o][mask[o]], sel[mask[o]], atol=1e-6)
        assert abs(float(sel.mean())) < 1e-5
        assert float(sel.var()) == pytest.approx(1.0 / sel.numel(), rel=1e-4)  # fan-in-scaled variance


def test_nsconv_single_entry_filter_stays_alive():
    """A filter with one active entry is scaled, not centred (centring would zero it for good): g * sign(w)."""
    conv = NSConv(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[0, 0, 0, 0] = -0.7
        conv.gain.copy_(torch.tensor([2.0, 1.0, 1.0]).reshape(3, 1, 1, 1))
    mask = torch.zeros_like(conv.weight, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    mask[1, :, 1, 1] = True  # two entries: standardised as usual
    apply_masks(nn.Sequential(conv), {"0.weight": mask})
    w = conv.effective_weight().detach()
    assert float(w[0, 0, 0, 0]) == pytest.approx(-2.0)
    assert torch.count_nonzero(w[0]) == 1 and torch.count_nonzero(w[2]) == 0
    assert float(w[1][mask[1]].abs().sum()) > 0


def test_nsconv_nf_init_gains():
    """ReLU-followed convs start at NF-Nets' ReLU gain, the last conv of a residual branch at 0 (SkipInit)."""
    from toolchain.models.nsconv import RELU_GAIN
    from toolchain.models.zoo import BasicBlock, InvertedResidual

    for name, kw in (("resnet8", {}), ("mobilenetv2", {"width": 0.35})):
        model = build_model(name, (32, 32, 3), 10, norm="nsconv", **kw)
        last = set()
        for mod in model.modules():
            if isinstance(mod, (BasicBlock, InvertedResidual)) and mod.residual:
                last.add(id([c for c in mod.body.modules() if isinstance(c, NSConv)][-1]))
        for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
            kids = list(seq.children())
            for i, c in enumerate(kids):
                if not isinstance(c, NSConv):
                    continue
                relu = i + 2 < len(kids) and isinstance(kids[i + 2], nn.ReLU)
                want = 0.0 if id(c) in last else RELU_GAIN if relu else 1.0
                assert torch.allclose(c.gain, torch.full_like(c.gain, want)), (name, want)
        assert last  # both nets have residual blocks


@pytest.mark.parametrize("active", [True, False])
def test_nsconv_backward_matches_autograd(active):
    torch.manual_seed(2)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(4, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    m = torch.rand(4, 3, 3, 3) < 0.5
    m[1] = False
    m[1, 0, 0, 0] = True  # one active entry: scaled by its magnitude, not centred
    assert torch.autograd.gradcheck(lambda w, g: _Standardize.apply(w, g, m, active)[0], (w, g))


@pytest.mark.parametrize("name,kw", [("resnet8", {}), ("resnet18", {}), ("mobilenetv2", {"width": 0.35})])
def test_nsconv_models_are_bn_free_and_bn_default_is_unchanged(name, kw):
    torch.manual_seed(0)
    bn = build_model(name, (32, 32, 3), 10, **kw)
    ns = build_model(name, (32, 32, 3), 10, norm="nsconv", **kw)
    assert not any(isinstance(m, NSConv) for m in bn.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ns.modules())
    convs_bn = [n for n, m in bn.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs_bn == [n for n, m in ns.named_modules() if isinstance(m, NSConv)]  # same layer names
    assert ns.arch["kwargs"]["norm"] == "nsconv"
    assert ns(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---- BaE ---------------------------------------------------------------------------------------------
def test_budget_schedule():
    assert rex_budget(0, 100) == 1.0 and rex_budget(100, 100) == 0.0 and 0 < rex_budget(50, 100) < 1
    assert bae_lr(0.01, 0.1, 0, 100, 5.0) == pytest.approx(0.1 * (2 / (1 + math.exp(-5)) - 1))
    assert bae_lr(0.01, 0.1, 0, 100, 0.0) == 0.01  # marked weights at 0: back to the scheduled lr
    assert bae_lr(0.01, 0.1, 100, 100, 5.0) == 0.01  # budget spent


def _toy_federation(seed: int = 0) -> Federation:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 3, generator=g)
    clients = []
    for cid in range(2):
        x = torch.randn(100, 1, 4, 4, generator=g)
        clients.append(ClientData(cid, x, (x.flatten(1) @ teacher).argmax(1)))
    tx = torch.randn(200, 1, 4, 4, generator=g)
    ty = (tx.flatten(1) @ teacher).argmax(1)
    return Federation(clients, tx, ty, tx, ty)


def _toy_run(opts: dict, rounds: int = 5):
    cfg = TrainConfig(rounds=rounds, clients=2, per_round=2, local_epochs=2, batch_size=10, lr=0.05, density=0.5,
                      algo_options={"delta": 5, "t_end": 10, "alpha": 0.3, **opts})
    torch.manual_seed(0)
    model = build_model("mlp", (4, 4, 1), 3, hidden=(32,))
    strategy = make_strategy("fedmef", cfg)
    history = simulate(strategy, model, _toy_federation(), cfg, progress=False)
    return strategy, history


def test_bae_drives_marked_weights_to_zero_within_budget():
    """Window = rounds 1..5 ending with the adjustment of round 5; the server fixes the marks at round 1.

    Toy lambda = 1 (the library default 0.01 is sized for ~100x more local steps): the squared penalty
    settles where 2*lambda*theta balances the task gradient, so "near zero" is relative to the norm
    at marking and to the same run without BaE, where the marked weights keep growing."""
    _, bae = _toy_run({"lam": 1.0})
    _, ctrl = _toy_run({"bae": 0})
    at_marking = bae[0].extra["marked_norm_at_marking"]
    assert at_marking == ctrl[0].extra["marked_norm_at_marking"] > 0  # same marks, same start
    final, final_ctrl = bae[-1].extra["marked_norm"], ctrl[-1].extra["marked_norm"]
    assert final < 0.2 * at_marking and final < 0.05 * final_ctrl, (final, at_marking, final_ctrl)
    assert final_ctrl > at_marking
    assert bae[-1].extra["swapped"] > 0
    assert abs(bae[-1].accuracy - ctrl[-1].accuracy) < 0.05  # the information went into the other weights


def test_marks_are_active_weights_and_travel_in_the_instruction():
    cfg = TrainConfig(rounds=2, clients=2, per_round=2, density=0.2, algo_options={"delta": 2, "t_end": 10})
    model = build_model("mlp", (4, 4, 1), 3, hidden=(32,))
    strategy = make_strategy("fedmef", cfg)
    from toolchain.learning.fl.strategy import ServerContext

    strategy.setup(model, ServerContext(cfg, [10, 10], np.random.default_rng(0), torch.zeros(1), torch.zeros(1)))
    ins = strategy.configure_train(1, [0, 1])[0]
    assert "bae" in ins.config and ins.config["bae"]["pos"] == 0 and ins.config["bae"]["rounds"] == 2
    for name, idx in strategy.marks.items():
        assert bool(strategy.masks[name].flatten()[idx].all())  # never an already-pruned weight
        assert len(idx) == strategy.round_counts(2)[name] > 0
    with_marks = len(ins.to_bytes())
    ins.config.pop("bae")
    assert with_marks - len(ins.to_bytes()) >= sum(2 * len(i) for i in strategy.marks.values())


def test_mask_broadcast_after_every_adjustment():
    cfg = TrainConfig(rounds=5, clients=2, per_round=2, local_epochs=1, batch_size=10, lr=0.05, density=0.5,
                      algo_options={"delta": 1, "bae_rounds": 1, "t_end": 4})
    torch.manual_seed(0)
    strategy = make_strategy("fedmef", cfg)
    travelled: dict[int, list[bool]] = {}
    real = strategy.configure_train

    def spy(rnd: int, cids: list[int]):
        out = real(rnd, cids)
        travelled[rnd] = [ins.mask_travels for ins in out.values()]
        return out

    strategy.configure_train = spy
    history = simulate(strategy, build_model("mlp", (4, 4, 1), 3, hidden=(32,)), _toy_federation(), cfg,
                       progress=False)
    adjusted = [r.round for r in history if r.extra.get("swapped", 0) > 0]
    assert adjusted == [1, 2, 3]  # alpha_t = 0 at t = t_end = 4
    assert strategy.mask_broadcasts == adjusted
    for rnd in range(2, 6):  # every client gets the new mask in the round after each adjustment, and only then
        assert travelled[rnd] == [rnd - 1 in adjusted] * 2, (rnd, travelled)
    assert history[1].bytes_down_per_client > history[4].bytes_down_per_client


# ---- export and CLI ----------------------------------------------------------------------------------
def test_int8_export_of_resnet8_nsconv(tmp_path):
    from toolchain.export.keras_mirror import build_keras_mirror
    from toolchain.export.silence import captured_fds
    from toolchain.export.tflite import TFLM_BUILTINS, convert_int8
    from toolchain.models.fold_bn import fold_batchnorm, max_abs_diff
    from toolchain.verify.interpreters import litert_outputs, quantize_input, tflm_outputs

    torch.manual_seed(0)
    shape = (32, 32, 3)
    model = build_model("resnet8", shape, 10, norm="nsconv")
    masks = random_masks(model, 0.1, torch.Generator().manual_seed(0))
    apply_masks(model, masks)
    enable_sap(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NSConv):
                m.gain.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    plain = materialize(model)
    assert not any(isinstance(m, (NSConv, SAPConv2d, SAPLinear, BitReLU)) for m in plain.modules())
    for name, mask in masks.items():  # pruned weights stay exactly zero in the exported weights
        assert torch.all(plain.get_parameter(name)[~mask] == 0)
    folded = fold_batchnorm(model)
    x = torch.randn(8, 3, 32, 32)
    assert max_abs_diff(model, folded, x) < 1e-4
    rng = np.random.default_rng(0)
    with captured_fds():
        tfl = convert_int8(build_keras_mirror(folded, shape), rng.normal(size=(32, *shape)).astype(np.float32))
    assert set(tfl.ops) <= TFLM_BUILTINS
    path = tmp_path / "m.tflite"
    path.write_bytes(tfl.data)
    xq = quantize_input(x.permute(0, 2, 3, 1).numpy(), tfl.input_quant.scale, tfl.input_quant.zero_point)
    lite, micro = litert_outputs(tfl.data, xq), tflm_outputs(path, xq)
    assert np.array_equal(lite, micro)
    deq = (lite.astype(np.float32) - tfl.output_quant.zero_point) * tfl.output_quant.scale
    ref = folded(x).detach().numpy()
    assert np.abs(deq - ref).max() < 0.1 * np.abs(ref).max() + 3 * tfl.output_quant.scale


def test_cli_train_fedmef_saves_a_rebuildable_nsconv_model(tmp_path, mnist):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "train", "--algo", "fedmef", "--model", "resnet8",
                           "--clients", "60", "--per-round", "1", "--rounds", "2", "--eval-samples", "200",
                           "--density", "0.05", "--algo-opt", "delta=1", "--algo-opt", "t_end=4", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fedmef" and summary["density"] == pytest.approx(0.05, abs=1e-3)
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["arch"]["kwargs"]["norm"] == "nsconv"
    rebuilt = build_model(saved["arch"]["name"], tuple(saved["arch"]["in_shape"]), saved["arch"]["num_classes"],
                          **saved["arch"]["kwargs"])
    rebuilt.load_state_dict(saved["state_dict"])  # strict: mask buffers, gains and biases included
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["extra"].get("swapped", 0) > 0


def test_no_bae_window_for_an_adjustment_after_the_last_round():
    """A 5-round run with delta = 10 never adjusts, so nothing is extruded (issue 14: 54.8 % at 1 % before)."""
    cfg = TrainConfig(rounds=5, density=0.2, algo_options={"delta": 10, "t_end": 300})
    strategy = make_strategy("fedmef", cfg)
    assert all(strategy.window_target(r) is None for r in range(1, 6))
    cfg10 = TrainConfig(rounds=10, density=0.2, algo_options={"delta": 10, "t_end": 300})
    assert make_strategy("fedmef", cfg10).window_target(1) == 10
