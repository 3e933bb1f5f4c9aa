"""report.md (issue 17, item 3): per-board RAM/flash, per-layer table, confusion matrix, plots, stage timings;
`toolchain report DIR` re-renders it and `--json` gives the same facts to machines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.boards.latency import METHOD, estimate
from toolchain.boards.profiles import get_profile

TOOLCHAIN = [sys.executable, "-m", "toolchain.cli"]
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLCHAIN, *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("r") / "rp2040"
    proc = run("build", "--target", "pico", "--model", "micro-mlp", "--rounds", "2", "--clients", "2",
               "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_report_has_the_board_view_layers_confusion_plots_and_timings(built):
    text = (built / "report.md").read_text()
    m = json.loads((built / "manifest.json").read_text())
    for heading in ("## Accuracy (test set)", "## On the board: rp2040", "## Every board", "## Layers",
                    "## Confusion matrix", "## Rounds", "## Stage timings", "## Artifacts"):
        assert heading in text, heading
    # the target's RAM and flash as the gate counted them, with the estimate made before training
    b = m["budget"]
    assert f"| RAM | {b['ram_needed']} B |" in text and "estimated before training" in text
    # latency: an estimate labelled as one for MicroPython boards, "not measured" where nothing was measured
    lat = m["boards"]["rp2040"]["latency"]
    assert lat["engine"] == "viper auto" and lat["method"] == METHOD and lat["latency_ms"] > 0
    assert re.search(r"^\| latency \(estimate\) \| ~[\d.]+ ms \(viper auto, [\d.]+ M instr\) \|", text, re.M)
    assert METHOD in text
    assert m["boards"]["microbit"]["latency"]["engine"] == "bytecode"  # no -march: no native code there
    assert re.search(r"^\| microbit \|.*\| ~[\d.]+ ms \(bytecode, ", text, re.M)
    for board in ("(any TFLite Micro board)", "jetson-orin-nano"):
        assert m["boards"][board]["latency_ms"] == "not measured"
        assert re.search(rf"^\| {re.escape(board)} \|.*\| not measured \(\S+ engine not measured\) \|$", text, re.M)
    shares = [ly["latency_share"] for ly in m["layers"]]
    assert all(0 < s < 1 for s in shares) and sum(shares) < 1  # the rest: fixed per-inference cost
    # every shipped board has a row; the micro:bit one can run this MLP
    for board in ("esp32", "esp32s3", "jetson-orin-nano", "microbit", "(any TFLite Micro board)"):
        assert re.search(rf"^\| {re.escape(board)} \|", text, re.M), board
    assert m["boards"]["microbit"]["fits"] is True
    # per-layer rows: kept weights and density match the manifest's model totals
    assert len(m["layers"]) == 2 and sum(ly["kept"] for ly in m["layers"]) == m["model"]["kept_weights"]
    for ly in m["layers"]:
        assert f"| {ly['layer']} | dense | " in text and ly["smf_bytes"] > 0
    # the confusion matrix is the int8 TFLite Micro model's: its diagonal is the accuracy
    cm = m["confusion"]
    assert sum(map(sum, cm)) == 10000
    assert sum(cm[i][i] for i in range(10)) / 10000 == pytest.approx(m["accuracy"]["tflm_int8"])
    # plots are real PNG files, embedded in the report
    for name in ("rounds", "layers", "memory"):
        path = built / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG and f"](plots/{name}.png)" in text
    # stage timings as a table, not JSON
    assert re.search(r"^\| train \| \d+\.\d\d \|$", text, re.M) and "{" not in text.split("## Stage timings")[1]


def test_report_command_rerenders_and_prints_json(built, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(built, copy)
    before = (copy / "report.md").read_text()
    (copy / "report.md").unlink()
    shutil.rmtree(copy / "plots")
    proc = run("report", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert (copy / "report.md").read_text() == before
    assert all((copy / "plots" / f"{n}.png").is_file() for n in ("rounds", "layers", "memory"))
    data = json.loads(run("report", str(copy), "--json").stdout)
    assert data["target"] == "rp2040" and data["model"] == "micro-mlp" and len(data["rounds"]) == 2
    assert data["budget"]["fits"] and len(data["layers"]) == 2 and len(data["confusion"]) == 10


def test_esp32_latency_estimate_of_the_default_model_matches_the_measurement():
    """The default esp32 model (LeNet-5, GMP 10 %: the layer densities measured in engine_speed.json) through
    layer_table -> toolchain.boards.latency: 10.48 M instructions measured (viper auto) / 240 MHz = 43.7 ms, +-30 %;
    the micro:bit runs bytecode (258 M measured). No training: kept counts per layer are what matters."""
    import torch

    from toolchain.models.zoo import build_model, prunable_layers
    from toolchain.pipelines.report import layer_table

    speed = json.loads((Path(__file__).parents[1] / "bench/results/engine_speed.json").read_text())["models"][0]
    model = build_model("lenet5", (28, 28, 1), 10)
    masks = {}
    for (name, layer), measured in zip(prunable_layers(model), speed["layers"], strict=True):
        keep = torch.zeros(layer.weight.numel())
        keep[:measured["kept_weights"]] = 1
        masks[f"{name}.weight"] = keep.reshape(layer.weight.shape)
    layers = layer_table(model, masks, (28, 28, 1), None)
    esp32 = estimate(get_profile("esp32"), layers)
    measured_ms = 1000 * speed["engines"]["viper auto"]["instructions_per_inference"] / 240e6
    assert esp32["engine"] == "viper auto" and esp32["method"] == METHOD
    assert esp32["latency_ms"] == pytest.approx(measured_ms, rel=0.3)
    microbit = estimate(get_profile("microbit"), layers)
    assert microbit["engine"] == "bytecode"
    assert microbit["instructions"] == pytest.approx(speed["engines"]["bytecode"]["instructions_per_inference"],
                                                     rel=0.3)
    assert estimate(get_profile("jetson"), layers)["latency_ms"] == "not measured"


def test_latency_constants_are_the_fit_of_the_committed_measurements():
    """latency_constants.json is generated (python -m toolchain.boards.latency ...), not typed: the fit reproduces it."""
    from toolchain.boards.latency import CONSTANTS, fit

    src = "bench/results/engine_speed.json"  # as recorded in the file: relative to the repository
    data = json.loads((Path(__file__).parents[1] / src).read_text())
    assert fit(data, src) == json.loads(CONSTANTS.read_text())


def test_report_on_a_folder_that_is_not_a_build(tmp_path):
    proc = run("report", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: no manifest.json in {tmp_path}; pass a `toolchain build` output folder"


def test_an_earlier_build_with_plots_is_still_ours(built, tmp_path):
    """plots/ is written by build: a folder holding it is replaced without --force (toolchain.contracts.staging)."""
    from toolchain.contracts.staging import build_owned

    assert build_owned(built) == (True, [])
    archive = built / "rp2040-bundle.tar.gz"  # what `toolchain flash` may leave in a build folder
    archive.write_bytes(b"")
    try:
        assert build_owned(built) == (True, [])
    finally:
        archive.unlink()
