"""Jetson runtime (device_runtime/jetson): ZO rounds in onnxruntime on the float and the QDQ int8 model equal the
host reference (toolchain.ondevice.reference) within 1e-5; the update is bit-exact; the code is Python 3.8."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_models as sm  # noqa: E402

from device_runtime.jetson.runtime import JetsonFineTuner  # noqa: E402
from hw.profiles import get_profile  # noqa: E402
from models.zoo import build_model  # noqa: E402
from toolchain.export.onnx_export import export_onnx  # noqa: E402
from toolchain.ondevice.bundle import write_bundle  # noqa: E402
from toolchain.ondevice.reference import (  # noqa: E402
    onnx_features,
    onnx_head,
    onnx_reference_probe,
    reference_update,
)

JETSON_DIR = Path(__file__).resolve().parents[1] / "device_runtime" / "jetson"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained, pruned LeNet-5 exported to ONNX, bundled for the Jetson (float + QDQ int8)."""
    out = tmp_path_factory.mktemp("jetson")
    torch.manual_seed(0)
    model = build_model("lenet5", (28, 28, 1), 10)
    images, labels = sm.mnist("train")
    x = torch.from_numpy(images[:2048, None].astype(np.float32) / 255)
    y = torch.from_numpy(labels[:2048].astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for i in range(0, 2048, 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
        opt.step()
    with torch.no_grad():  # prune the head to 30 %: only kept weights are trainable
        w = model.classifier[-1].weight
        w[w.abs() < w.abs().flatten().kthvalue(int(0.7 * w.numel())).values] = 0
    export_onnx(model.eval(), (28, 28, 1), out / "model.onnx")
    write_bundle(out, get_profile("jetson-orin-nano"), calibration=images[2048:2112, :, :, None] / np.float32(255))
    return out / "bundle"


@pytest.mark.parametrize("name", ["model.onnx", "model_int8.onnx"])
@pytest.mark.parametrize("estimator", ["forward", "central"])
def test_rounds_equal_host_reference(bundle: Path, name: str, estimator: str) -> None:
    images, labels = sm.mnist("t10k")
    x = images[:48, None].astype(np.float32) / 255
    ys = labels[:48].tolist()
    tuner = JetsonFineTuner(str(bundle / name), {"estimator": estimator})
    head = onnx_head(bundle / name)
    w = head.active
    np.testing.assert_array_equal(tuner.w, w)  # same trainable set, canonical order
    assert tuner.nnz == int(head.mask.sum()) < head.mask.size
    for r, seed in enumerate((7, 0xFEEDBEEF, 123456)):
        b = slice(16 * r, 16 * (r + 1))
        g, loss, n = tuner.probe(seed, 12, 1e-3, list(x[b]), ys[b])
        ref = onnx_reference_probe(head, w, onnx_features(head, x[b]), ys[b], seed, 12, 1e-3, estimator)
        assert n == 16 and abs(loss - ref.loss) <= 1e-5
        assert np.abs(np.array(g) - ref.scalars).max() <= 1e-5
        tuner.update(seed, g, 0.05)
        w = reference_update(w, seed, g, 0.05)
        np.testing.assert_array_equal(tuner.w, w)  # float32 update, bit-exact


def test_qdq_model_is_int8_and_int8_inputs_work(bundle: Path) -> None:
    model = onnx.load(str(bundle / "model_int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = producer[gemm.input[1]]  # the head's weight is int8 behind a per-channel DequantizeLinear
    assert dq.op_type == "DequantizeLinear"
    scale = next(i for i in model.graph.initializer if i.name == dq.input[1])
    assert len(scale.dims) == 1 and scale.dims[0] == 10
    images, labels = sm.mnist("t10k")
    tuner = JetsonFineTuner(str(bundle / "model_int8.onnx"), {"input": {"scale": 1 / 255, "zero_point": -128}})
    q = [(im.astype(np.int16) - 128).astype(np.int8).tobytes() for im in images[:200]]
    acc_q = tuner.accuracy(q, labels[:200])
    acc_f = tuner.accuracy(list(images[:200, None].astype(np.float32) / 255), labels[:200])
    assert acc_q == pytest.approx(acc_f, abs=0.02) and acc_f > 0.5


def test_bundle_lists_files_and_code_is_python38(bundle: Path) -> None:
    cfg = json.loads((bundle / "config.json").read_text())
    assert {"model.onnx", "model_int8.onnx", "runtime.py", "zo_np.py"} <= set(cfg["files"])
    for src in JETSON_DIR.glob("*.py"):
        ast.parse(src.read_text(), feature_version=(3, 8))  # JetPack's Python
    # the bundle folder runs on its own (flat files, no toolchain import)
    import subprocess

    code = ("import json, runtime\nt = runtime.JetsonFineTuner('model_int8.onnx', json.load(open('config.json')))\n"
            "print(t.rows, t.cols, 'toolchain' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["10", "84", "False"], out.stderr
    from device_runtime.jetson import zo_np
    from toolchain.zo import derive, signs

    for seed, k in ((0, 0), (2024, 3), (0xDEADBEEF, 1)):
        assert zo_np.derive(seed, k) == derive(seed, k)
        np.testing.assert_array_equal(zo_np.signs(derive(seed, k), 1000), signs(derive(seed, k), 1000))
