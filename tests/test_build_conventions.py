"""Conventions (issue 17, item 5): defaults in --help, exit codes and outputs in the README, replaying a build
from its manifest."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.contracts import errors

ROOT = Path(__file__).resolve().parents[1]
TOOLCHAIN = [sys.executable, "-m", "toolchain.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOLCHAIN, *args], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("command", ["build", "train", "targets", "report"])
def test_help_shows_the_defaults(command):
    """Every option with a default shows it (the values come from the parser: other commits may change them)."""
    from toolchain.cli import make_parser

    sub = next(a for a in make_parser()._actions if a.dest == "command").choices[command]
    flat = " ".join(run(command, "--help").stdout.split())
    checked = 0
    for action in sub._actions:
        if not action.option_strings or action.default in (None, [], "==SUPPRESS==") or action.default is False:
            continue
        assert f"(default: {action.default})" in flat or (action.help and "default" in action.help), action.dest
        checked += 1
    assert checked >= (10 if command in ("build", "train") else 0)
    if command == "build":
        assert "(default: 0.1)" in flat and "exit codes: 0 built, 2 bad input, 3 does not fit" in flat


def test_readme_documents_every_exit_code():
    readme = (ROOT / "README.md").read_text()
    codes = {0} | {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    table = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", readme, re.M))
    assert {int(c) for c in table} == codes, table


def test_readme_board_figures_match_the_profiles():
    from toolchain.boards.profiles import all_profiles

    readme = (ROOT / "README.md").read_text()
    mb = all_profiles()["microbit"]
    assert f"{mb.ram_bytes} B of heap" in readme and "16 KB of RAM" not in readme


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "mb"
    proc = run("build", "--target", "microbit", "--rounds", "2", "--clients", "2", "--seed", "3", "--out", str(out),
               "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_readme_lists_what_a_build_writes(original):
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"writes `build/esp32/` \((.+?)\)", readme, re.S).group(1)
    names = set(re.findall(r"`([^`]+)`", listed))
    on_disk = {p.name if p.is_file() else p.name + "/" for p in original.iterdir()}
    # the micro:bit build has no .mpy bundle, but every file kind the README names is written
    for name in names:
        assert name.replace("model_data.h/.cc", "model_data.h") in on_disk, (name, on_disk)


def test_a_build_replays_from_its_manifest(original, tmp_path):
    again = tmp_path / "replay"
    proc = run("build", "--config", str(original / "manifest.json"), "--out", str(again), "--quiet")
    assert proc.returncode == 0, proc.stderr
    a = json.loads((original / "manifest.json").read_text())
    b = json.loads((again / "manifest.json").read_text())
    drop = ("out",)
    assert {k: v for k, v in a["config"].items() if k not in drop} == {k: v for k, v in b["config"].items()
                                                                      if k not in drop}
    assert b["config"]["seed"] == 3 and b["target"] == "microbit"
    for name in ("model.tflite", "model.smf"):  # same seed, same options: the same model, byte for byte
        assert a["artifacts"][name]["sha256"] == b["artifacts"][name]["sha256"]


def test_options_given_with_config_override_it(original, tmp_path, capsys, monkeypatch):
    from toolchain import cli
    from toolchain.cli import build as build_cmd

    seen = {}

    def record(opts, log=print):  # stop after the options are settled: the replay itself is tested above
        seen.update(vars(opts))
        raise errors.ToolchainError("stop")

    monkeypatch.setattr(build_cmd, "build", record)
    assert cli.main(["build", "--config", str(original), "--rounds", "7", "--quiet"]) == 2
    assert seen["rounds"] == 7 and seen["seed"] == 3 and seen["clients"] == 2 and seen["target"] == "microbit"
    assert seen["out"] is None  # where to write is asked anew: build/<target>
    assert cli.main(["build", "--config", str(tmp_path / "none.json"), "--quiet"]) == 2
    assert "cannot read --config" in capsys.readouterr().err
