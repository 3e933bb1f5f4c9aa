"""Jetson runtime (device_runtime/jetson): ZO rounds in onnxruntime on the float and the QDQ int8 model equal the
host reference (toolchain.verify.reference) within 1e-5; the update is bit-exact; the code is Python 3.8."""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from support import sparse_models as sm
from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401

from device_runtime.jetson.runtime import JetsonFineTuner
from toolchain.boards.profiles import get_profile
from toolchain.export.onnx_export import export_onnx
from toolchain.models.zoo import build_model
from toolchain.package.bundle import write_bundle
from toolchain.verify.reference import (
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
    from toolchain.contracts.zo import derive, signs

    for seed, k in ((0, 0), (2024, 3), (0xDEADBEEF, 1)):
        assert zo_np.derive(seed, k) == derive(seed, k)
        np.testing.assert_array_equal(zo_np.signs(derive(seed, k), 1000), signs(derive(seed, k), 1000))


def _clean_python(tmp: Path) -> str:
    """An interpreter that has this environment's packages (numpy, onnxruntime, paho-mqtt, ...) but not the repository:
    a fresh venv whose site-packages points at ours through a plain path line, so our editable install's finder
    (a .pth import hook) never runs in it."""
    import subprocess
    import sysconfig

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(venv / "bin" / "python")


def test_jetson_bundle_runs_the_agent_without_the_repository(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """write_bundle's Jetson bundle, copied elsewhere, runs the fleet agent with only the bundle on PYTHONPATH."""
    import shutil
    import subprocess

    from support.fleet_model import make_model

    from toolchain.contracts.wire.messages import Ack, Error, Hello
    from toolchain.fleet import MqttConfig, MqttHost, Ping, RoundResult, RoundStart, RoundUpdate, Status
    from toolchain.package.jetson import AGENT_PACKAGES, import_closure

    m = make_model()
    idx = m.split(3)[1]
    build = tmp_path / "build"
    build.mkdir()
    m.onnx(build / "model.onnx")
    written = write_bundle(build, get_profile("jetson-orin-nano"), spec=m.jetson_spec())
    cfg = json.loads((build / "bundle" / "config.json").read_text())
    assert cfg["agent"]["modules"] == ["toolchain.contracts.wire.errors", "toolchain.contracts.wire.messages",
                                       "toolchain.contracts.wire.security", "toolchain.fleet.device_agent",
                                       "toolchain.fleet.mqtt_link"]
    wire = "toolchain/contracts/wire"
    assert {"bundle/run_agent.sh", "bundle/toolchain/__init__.py", f"bundle/{wire}/__init__.py",
            f"bundle/{wire}/messages.py"} <= set(written) and f"{wire}/messages.py" in cfg["files"]
    needed, external = import_closure()
    # the device side of the protocol only: no pipeline, learning, export or deploy code rides along
    assert external == set(AGENT_PACKAGES) and all(
        n.startswith(("toolchain.contracts.wire.", "toolchain.fleet.")) for n in needed if n.startswith("toolchain"))
    # "copied to the Jetson": another folder, the device's data next to it
    dev = tmp_path / "jetson" / "bundle"
    shutil.copytree(build / "bundle", dev)
    shutil.rmtree(build)
    for src in dev.rglob("*.py"):
        ast.parse(src.read_text(), feature_version=(3, 10))  # the agent's minimum (JetPack 6); runtime.py: 3.8
    local = tmp_path / "jetson" / "local"
    local.mkdir()
    feats = np.ascontiguousarray(m.feats[idx], np.int8)
    (local / "data.bin").write_bytes(feats.tobytes())
    (local / "local.json").write_text(json.dumps({"device": "jetson-b", "n": len(idx), "size": int(feats.shape[1]),
                                                  "labels": [int(v) for v in m.y[idx]], "model_id": 1}))
    py = _clean_python(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(dev), "PYTHON": py}
    probe = subprocess.run(
        [py, "-c", "import sys, agent, runtime\nprint(sys.modules['toolchain'].__file__)\n"
                   "print(sorted({n.split('.')[0] for n in sys.modules} & {'device_runtime', 'serial', 'torch'}))\n"
                   "print(sorted(n for n in sys.modules if n.startswith('toolchain.') and n.count('.') == 1))\n"
                   "try:\n    import toolchain.pipelines\nexcept ImportError as e:\n    print(e)\n"],
        cwd=dev, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == [str(dev / "toolchain" / "__init__.py"), "[]",
                                         "['toolchain.contracts', 'toolchain.fleet']",
                                         "No module named 'toolchain.pipelines'"]
    helped = subprocess.run(["./run_agent.sh", "--help"], cwd=dev, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--broker" in helped.stdout and "--local" in helped.stdout, helped.stderr
    # a real run against mosquitto: HELLO, a round equal to the runtime's own probe, an update, STATUS
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(["./run_agent.sh", "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", "jb",
                             "--device", "jetson-b", "--local", str(local)], cwd=dev, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    host = MqttHost(MqttConfig(port=mosquitto.port, fleet="jb"))
    try:
        host.start()

        def expect(kind: type, timeout: float = 60.0) -> object:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                got = host.recv(0.5)
                if got is not None and isinstance(got[1], kind):
                    assert got[0] == "jetson-b"
                    return got[1]
                assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            raise AssertionError(f"no {kind.__name__}: {(tmp_path / 'agent.log').read_text()}")

        hello = expect(Hello)
        assert hello.board == "jetson-orin-nano" and hello.firmware.startswith("onnxruntime")
        seed = 0xDEADBEEF
        host.send("jetson-b", RoundStart(1, 8, 1e-3, 0.5, 1, 64, round_seed=seed))
        res = expect(RoundResult)
        ref = JetsonFineTuner(str(dev / "model.onnx"), m.jetson_spec())
        g, loss, n = ref.probe(seed, 8, 1e-3, [feats[i].tobytes() for i in range(len(idx))], m.y[idx].tolist())
        assert res.n_samples == n == len(idx) and res.loss == pytest.approx(loss, abs=1e-6)
        assert max(abs(a - b) for a, b in zip(res.scalars, g, strict=True)) < 1e-6
        host.send("jetson-b", RoundUpdate(1, seed, 11.0, res.scalars))
        assert expect(Error) == Error(4, 0x12, 1, "out of range: lr")
        host.send("jetson-b", RoundUpdate(1, seed, 0.5, res.scalars))
        assert expect(Ack) == Ack(0x12, 1)
        host.send("jetson-b", Ping())
        assert expect(Status).round_id == 1
    finally:
        host.stop()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_jetson_bundle_refuses_imports_it_cannot_carry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import toolchain.package.jetson as jb
    from toolchain.contracts.errors import ToolchainError

    cases = {"serial": "import serial\n", "toolchain.contracts.zo": "from toolchain.contracts.zo import derive\n",
             "torch": "def f():\n    import torch\n",  # lazy imports count too
             "toolchain.fleet.serial_link": "from toolchain.fleet.serial_link import SerialLink\n"}  # needs pyserial
    for what, body in cases.items():
        d = tmp_path / what
        d.mkdir()
        (d / "agent.py").write_text("from .runtime import JetsonFineTuner\n" + body)
        (d / "runtime.py").write_text("import numpy\nfrom . import zo_np\n")
        (d / "zo_np.py").write_text("import numpy\n")
        monkeypatch.setattr(jb, "JETSON_DIR", d)
        with pytest.raises(ToolchainError, match="imports 'serial'" if what.endswith("serial_link") else what):
            jb.import_closure()
