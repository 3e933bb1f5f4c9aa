"""Export: BN folding, the Keras mirror, full-int8 TFLite in LiteRT vs TFLite Micro, arena, C array, ONNX."""

import re

import numpy as np
import pytest
import torch

from toolchain.export.c_array import write_c_array
from toolchain.export.keras_mirror import build_keras_mirror
from toolchain.export.onnx_export import export_onnx, onnx_logits
from toolchain.export.silence import captured_fds
from toolchain.export.tflite import TFLM_BUILTINS, convert_int8
from toolchain.models.fold_bn import fold_batchnorm, max_abs_diff
from toolchain.models.zoo import build_model, prunable_layers
from toolchain.verify.interpreters import (
    _tflm_fits,
    litert_outputs,
    quantize_input,
    tflm_min_arena,
    tflm_outputs,
)


def _randomize(model: torch.nn.Module, density: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    with torch.no_grad():
        for _, layer in prunable_layers(model):
            w = layer.weight
            w.mul_(torch.rand_like(w) < density)  # extremely sparse, like the real models
    return model.eval()


@pytest.mark.parametrize("name,shape,kw", [
    ("lenet5", (28, 28, 1), {}), ("micro-mlp", (28, 28, 1), {}), ("resnet8", (32, 32, 3), {}),
    ("mobilenetv2", (32, 32, 3), {"width": 0.25}), ("vgg11", (32, 32, 3), {"width": 0.125}),
])
def test_fold_and_mirror_match_torch(name, shape, kw):
    model = _randomize(build_model(name, shape, 10, **kw))
    folded = fold_batchnorm(model)
    x = torch.randn(4, shape[2], shape[0], shape[1])
    assert max_abs_diff(model, folded, x) < 1e-4
    with captured_fds():
        keras_model = build_keras_mirror(folded, shape)
    got = np.concatenate([keras_model(x[i:i + 1].permute(0, 2, 3, 1).numpy()).numpy() for i in range(4)])
    assert np.abs(got - folded(x).detach().numpy()).max() < 1e-4


@pytest.fixture(scope="module")
def int8_resnet(tmp_path_factory):
    shape = (32, 32, 3)
    folded = fold_batchnorm(_randomize(build_model("resnet8", shape, 10)))
    rng = np.random.default_rng(0)
    with captured_fds():
        tfl = convert_int8(build_keras_mirror(folded, shape), rng.normal(size=(64, *shape)).astype(np.float32))
    path = tmp_path_factory.mktemp("int8") / "model.tflite"
    path.write_bytes(tfl.data)
    return tfl, path, folded


def test_int8_graph_uses_tflm_builtins_only(int8_resnet):
    tfl, _, _ = int8_resnet
    assert set(tfl.ops) <= TFLM_BUILTINS and "FULLY_CONNECTED" not in tfl.ops  # dense exported as 1x1 conv
    assert tfl.input_quant.scale > 0


def test_litert_and_tflm_agree_bit_for_bit(int8_resnet):
    tfl, path, _ = int8_resnet
    x = quantize_input(np.random.default_rng(1).normal(size=(200, 32, 32, 3)).astype(np.float32),
                       tfl.input_quant.scale, tfl.input_quant.zero_point)
    lite = litert_outputs(tfl.data, x)
    micro = tflm_outputs(path, x)
    assert lite.dtype == np.int8 and np.array_equal(lite, micro)


def test_min_arena_is_tight(int8_resnet):
    _, path, _ = int8_resnet
    arena = tflm_min_arena(path)
    assert _tflm_fits(path, arena) and not _tflm_fits(path, arena - 16)


def test_c_array_holds_the_model(int8_resnet, tmp_path):
    tfl, _, _ = int8_resnet
    header, source = write_c_array(tfl.data, tmp_path)
    text = source.read_text()
    values = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", text))
    assert values == tfl.data and f"g_model_data_len = {len(tfl.data)};" in text
    assert "alignas(16)" in text and "extern const unsigned char g_model_data[];" in header.read_text()


def test_onnx_matches_torch(int8_resnet, tmp_path):
    _, _, folded = int8_resnet
    path = tmp_path / "m.onnx"
    export_onnx(folded, (32, 32, 3), path)
    x = torch.randn(3, 3, 32, 32)
    assert np.abs(onnx_logits(path, x.numpy()) - folded(x).detach().numpy()).max() < 1e-4
