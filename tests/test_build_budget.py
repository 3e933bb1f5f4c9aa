"""The early budget gate (issue 17, item 2): what each board really loads, estimated before training with
the same rules as the final check, and advice that the estimator has checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolchain.boards.profiles import get_profile, parse_profile
from toolchain.contracts.errors import BudgetError
from toolchain.data.datasets import load_dataset
from toolchain.pipelines.build import BuildOptions, _estimator
from toolchain.pipelines.select import footprint, select_model

TOOLCHAIN = [sys.executable, "-m", "toolchain.cli"]
TINY = """name = "tiny32"
description = "a user's board: 32 KB heap, 64 KB flash, MicroPython 1.29"
arch = "cortex-m0plus"
runtime = "micropython"
micropython = "1.29.0"
mpy_march = "armv6m"
mpy_abi = 6
ram_bytes = 32768
flash_bytes = 65536
"""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLCHAIN, *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_board(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("boards") / "tiny32.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def refused(tiny_board, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("o") / "tiny"
    t0 = time.perf_counter()
    proc = run("build", "--board-file", str(tiny_board), "--model", "lenet5", "--out", str(out), "--quiet")
    return {"proc": proc, "seconds": time.perf_counter() - t0, "out": out}


def test_a_model_too_big_for_a_user_board_is_refused_in_seconds(refused):
    proc = refused["proc"]
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    line = lines[0]
    assert line.startswith("error: lenet5 at density 0.1 would need") and "on tiny32 (32768 B RAM, 65536 B flash" in line
    assert "this fits: --density" in line  # MicroPython boards load model.smf: a lower density does shrink it
    assert refused["seconds"] < 30, refused["seconds"]
    assert not refused["out"].exists() and not any(refused["out"].parent.iterdir())
    print(f"refused in {refused['seconds']:.1f} s: {line}")


def test_following_the_advice_fits_and_the_estimate_was_close(refused, tiny_board):
    advice = re.search(r"this fits: (--density [0-9.]+)", refused["proc"].stderr).group(1).split()
    out = refused["out"]
    proc = run("build", "--board-file", str(tiny_board), "--model", "lenet5", *advice, "--rounds", "2",
               "--clients", "4", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    b, est = m["budget"], m["budget"]["estimate"]
    assert b["fits"] and b["kind"] == "micropython" and m["target"] == "tiny32"
    assert b["ram_needed"] <= 32768 and b["flash_needed"] <= 65536
    # the final gate counts what the board loads: every bundle file, model.smf among them, not the .tflite
    assert "model.tflite" not in b["deployed"] and b["deployed"]["model.smf"] == m["artifacts"]["model.smf"]["bytes"]
    assert b["flash_needed"] == sum(b["deployed"].values()) and b["ram_needed"] == sum(b["ram_parts"].values())
    for key in ("ram_needed", "flash_needed"):
        assert abs(est[key] - b[key]) <= 0.1 * b[key], (key, est[key], b[key])
    # the final figures are the same rules applied to the files on disk
    fp = footprint(_profile(tiny_board), out)
    assert (fp.ram_needed, fp.flash_needed) == (b["ram_needed"], b["flash_needed"])
    print(f"estimate RAM {est['ram_needed']} / final {b['ram_needed']} B; flash {est['flash_needed']} / "
          f"final {b['flash_needed']} B")


def _profile(path: Path):
    from toolchain.boards.profiles import load_profile

    return load_profile(path)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def test_the_picker_takes_the_model_that_fits(tiny_board, mnist):
    profile = _profile(tiny_board)
    est = select_model(profile, mnist.input_shape, 0.1, _estimator(BuildOptions(target=None), profile, mnist))
    assert est.model == "micro-mlp" and est.footprint.fits(profile)


def test_a_tflite_micro_board_counts_the_dense_model_and_its_arena(mnist):
    profile = parse_profile({"name": "c-board", "description": "a bare-metal TFLite Micro board", "arch": "cortex-m4",
                             "runtime": "tflite-micro", "ram_bytes": 16384, "flash_bytes": 65536}, "test")
    fn = _estimator(BuildOptions(target=None), profile, mnist)
    with pytest.raises(BudgetError) as exc:
        select_model(profile, mnist.input_shape, 0.1, fn, "lenet5")
    msg = str(exc.value)
    e = fn("lenet5", 0.1).footprint
    assert e.flash_parts == {"model.tflite": e.flash_needed} and e.flash_needed > 65536  # dense: ~73 KB at any density
    assert set(e.ram_parts) == {"arena"}
    assert "this fits: --model micro-mlp" in msg and "--density" not in msg.split("this fits:")[1]
    assert fn("micro-mlp", 0.1).footprint.fits(profile)


def test_engine_heap_matches_the_micro_bit_measurement(mnist):
    """docs/sparse-model-format.md: the micro:bit build's 49-16-10 model holds 2448 B of heap once loaded
    (QEMU, gc.mem_alloc). The layout rule must not undercount it, and stay within 10 %."""
    profile = get_profile("microbit")
    est = _estimator(BuildOptions(target=None), profile, mnist)("micro-mlp", 0.1)
    assert 2448 <= est.footprint.ram_needed <= 1.1 * 2448, est.footprint.ram_parts
