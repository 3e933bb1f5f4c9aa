"""`toolchain build` end to end (tiny training budget) and its one-line failures."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLCHAIN = [sys.executable, "-m", "toolchain.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLCHAIN, *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def esp32_build(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("b") / "esp32"
    proc = run("build", "--target", "esp32", "--rounds", "2", "--clients", "4", "--out", str(out), "--quiet")
    return out, proc


def test_build_writes_a_verified_manifest(esp32_build):
    out, proc = esp32_build
    assert proc.returncode == 0, proc.stderr
    assert "built lenet5 for esp32" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    for key in ("target", "algorithm", "density", "accuracy", "arena_bytes", "flash_bytes", "budget", "input",
                "artifacts", "config", "toolchain_version"):
        assert key in m, key
    assert m["target"] == "esp32" and m["algorithm"] == "gmp"
    assert m["density"] <= 0.1 + 1e-6
    assert set(m["accuracy"]) == {"float", "tflite_int8", "tflm_int8"}
    assert m["accuracy"]["tflm_int8"] > 0.8  # two short rounds on a quarter of the clients
    assert m["int8_agreement"]["litert_vs_tflm_identical"]
    assert m["budget"]["fits"] and m["budget"]["ram_needed"] >= m["arena_bytes"] > 0
    assert m["input"]["layout"] == "NHWC" and m["input"]["shape"] == [1, 28, 28, 1]
    assert m["input"]["preprocessing"]["scale"] == pytest.approx(1 / 255)
    for name in ("model.tflite", "model_data.h", "model_data.cc", "model.onnx"):
        art = m["artifacts"][name]
        data = (out / art["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == art["sha256"] and len(data) == art["bytes"]
    assert m["flash_bytes"] == m["artifacts"]["model.tflite"]["bytes"]
    report = (out / "report.md").read_text()
    assert "## On the board: esp32" in report and "**Fits.**" in report
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args,needle", [
    (("--target", "esp33"), "unknown target 'esp33'"),
    (("--target", "esp32", "--density", "0"), "--density must be in (0, 1]"),
    (("--target", "esp32", "--density", "1.01"), "--density must be in (0, 1]"),
    (("--target", "esp32", "--dataset", "cifar10", "--data", "/nonexistent"), "is not a directory"),
    (("--target", "esp32", "--dataset", "fashion-mnist", "--data", "."), "missing dataset file"),
    (("--target", "esp32", "--algo", "nope"), "unknown algorithm 'nope'"),
])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run("build", *args, "--out", str(out), "--quiet")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_model_too_big_for_board_fails_with_budget_message(tmp_path):
    out = tmp_path / "mb"
    proc = run("build", "--target", "microbit", "--model", "lenet5", "--rounds", "1", "--clients", "2",
               "--out", str(out), "--quiet")
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    # refused before training (toolchain.pipelines.select.preflight), with advice the estimator checked
    assert line.startswith("error: lenet5 cannot run on microbit") and "this fits: --model micro-mlp" in line
    assert not out.exists() and not any(tmp_path.iterdir())  # the staging folder was removed too


def test_microbit_build_fits_its_budget(tmp_path):
    out = tmp_path / "microbit"
    proc = run("build", "--target", "microbit", "--rounds", "2", "--clients", "2", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["name"] == "micro-mlp" and m["budget"]["fits"]
    # the micro:bit loads its bundle (file-system chunks counted) and holds the decoded model in its heap
    b = m["budget"]
    assert "model.smf" in b["deployed"] and "model.tflite" not in b["deployed"]
    assert b["flash_needed"] == sum(b["deployed"].values()) <= 15120
    assert b["ram_needed"] == sum(b["ram_parts"].values()) <= 4096
