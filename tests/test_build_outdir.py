"""`--out` safety (issue 17, item 1) and the chance-level guard of `toolchain build` (issue 14, build side).

Real builds (the micro:bit's micro-mlp: the cheapest full pipeline) and real folders; the "refused before
training" tests run the CLI in-process with a spy on the training entry point, so that a regression which
trains first fails on the spy instead of only being slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolchain import cli
from toolchain.pipelines import build as build_mod
from toolchain.pipelines import train as train_mod

TOOLCHAIN = [sys.executable, "-m", "toolchain.cli"]
CHEAP = ("--target", "microbit", "--model", "micro-mlp", "--clients", "2", "--quiet")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLCHAIN, *args], capture_output=True, text=True, timeout=900)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training starts: every refusal below must come before it."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("training started before the refusal")

    monkeypatch.setattr(build_mod, "simulate", spy)
    monkeypatch.setattr(train_mod, "simulate", spy)
    return calls


def test_non_empty_foreign_folder_is_refused_and_untouched(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("do not lose me")
    t0 = time.perf_counter()
    proc = run("build", *CHEAP, "--out", str(precious))
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "not an earlier `toolchain build` output" in line and "--force" in line
    assert (precious / "notes.txt").read_text() == "do not lose me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no staging folder left
    assert elapsed < 30, elapsed  # interpreter start + imports only: no data, no training


def test_train_refuses_a_foreign_folder(tmp_path, no_training, capsys):
    (tmp_path / "notes.txt").write_text("x")
    rc = cli.main(["train", "--algo", "gmp", "--rounds", "1", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and not no_training
    err = capsys.readouterr().err
    assert "not an earlier `toolchain train` output" in one_error_line(err)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _unwritable(tmp_path: Path, kind: str) -> Path:
    if kind == "under-a-file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "out"
    if kind == "proc":
        return Path("/proc/x/out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "out"


@pytest.mark.parametrize("kind", ["under-a-file", "proc", "read-only"])
@pytest.mark.parametrize("command", ["build", "train"])
def test_unwritable_out_is_refused_before_training(tmp_path, no_training, capsys, kind, command):
    if kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into a 0500 folder")
    out = _unwritable(tmp_path, kind)
    args = (["build", "--target", "esp32"] if command == "build" else ["train", "--algo", "gmp"])
    t0 = time.perf_counter()
    rc = cli.main([*args, "--out", str(out), "--quiet"])
    elapsed = time.perf_counter() - t0
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and not no_training and line.startswith("error: cannot write"), line
    assert elapsed < 5, elapsed
    if kind != "proc":
        assert sorted(p.name for p in tmp_path.iterdir()) in (["afile"], ["ro"])  # nothing written


def test_out_that_is_a_file_is_refused(tmp_path, no_training, capsys):
    f = tmp_path / "out"
    f.write_text("x")
    rc = cli.main(["build", "--target", "esp32", "--out", str(f), "--force", "--quiet"])
    assert rc == 2 and "is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert f.read_text() == "x"


def test_force_never_deletes_the_working_folder(tmp_path, no_training, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    rc = cli.main(["build", "--target", "esp32", "--out", ".", "--force", "--quiet"])
    assert rc == 2 and "holds the current folder" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "keep.txt").exists()


# --- real builds: --force, chance level, an earlier build replaced ---------------------------------------

@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """Build 1: --force into a foreign folder, with settings that end at chance (2 of ~950 weights kept, lr 0).
    Build 2: a normal build into the same folder, without --force: it is an earlier build now."""
    out = tmp_path_factory.mktemp("f") / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    chance = run("build", *CHEAP, "--rounds", "1", "--density", "0.002", "--lr", "0", "--force", "--out", str(out))
    first = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    report = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    notes_left = (out / "notes.txt").exists()
    sizes = {a["path"]: (out / a["path"]).stat().st_size for a in (first or {}).get("artifacts", {}).values()
             if (out / a["path"]).is_file()}
    again = run("build", *CHEAP, "--rounds", "2", "--out", str(out))
    return {"out": out, "chance": chance, "first": first, "report": report, "notes_left": notes_left,
            "sizes": sizes, "again": again}


def test_force_replaces_a_foreign_folder(builds):
    assert builds["first"] is not None, builds["chance"].stderr
    assert not builds["notes_left"]


def test_build_at_chance_level_exits_5_and_keeps_its_outputs(builds):
    proc, m = builds["chance"], builds["first"]
    assert proc.returncode == 5, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith("error: the model is at chance level")
    assert "built micro-mlp for microbit" in proc.stdout and "kept for inspection" in proc.stdout
    q = m["quality"]
    assert q["at_chance"] is True and q["chance"] == pytest.approx(0.1135, abs=1e-3)  # MNIST test: class 1
    assert q["accuracy"] == m["accuracy"]["tflm_int8"] and "chance level" in q["message"]
    assert "Not usable: the model is at chance level" in builds["report"]
    assert builds["sizes"] == {a["path"]: a["bytes"] for a in m["artifacts"].values()}  # all there, as listed


def test_an_earlier_build_is_replaced_without_force(builds):
    proc, out = builds["again"], builds["out"]
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["quality"]["at_chance"] is False and m["config"]["rounds"] == 2
    assert not (out / "notes.txt").exists()
    assert [p.name for p in out.parent.iterdir()] == ["precious"]  # neither staging nor the old folder is left


def test_a_stray_file_in_an_earlier_build_is_refused(builds, no_training, capsys):
    out = builds["out"]
    (out / "bundle" / "mine.py").write_text("x")
    try:
        rc = cli.main(["build", *CHEAP, "--out", str(out)])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and "holds bundle/mine.py, which build did not write" in line and "--force" in line
    finally:
        (out / "bundle" / "mine.py").unlink()
