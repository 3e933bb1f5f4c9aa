"""Boards the user owns (issue 17, item 4): --board-file, TOOLCHAIN_BOARDS, validation, aliases.

A full build with a user board file is in tests/test_build_budget.py (the 24 KB / 64 KB board)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from toolchain import cli
from toolchain.boards.profiles import BOARDS_DIR, all_profiles, get_profile
from toolchain.pipelines import build as build_mod

BASE = (BOARDS_DIR / "rp2040.toml").read_text().replace('name = "rp2040"', 'name = "myboard"')


@pytest.fixture
def no_training(monkeypatch):
    def spy(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(build_mod, "simulate", spy)


def _edit(text: str, key: str, value: str | None) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} ")]
    return "\n".join(lines + ([f"{key} = {value}"] if value is not None else [])) + "\n"


@pytest.mark.parametrize("key,value,needle", [
    ("ram_bytes", None, "missing key 'ram_bytes'"),
    ("flash_bytes", '"1 MB"', "'flash_bytes' must be an integer, got '1 MB'"),
    ("ram_bytes", "-4096", "'ram_bytes' must be a positive number of bytes, got -4096"),
    ("runtime", '"zephyr"', "'runtime' must be one of micropython, onnxruntime, tflite-micro"),
    ("transports", '["serial", 3]', "'transports' must be a list of strings"),
    ("weights_in_ram", "1", "'weights_in_ram' must be a bool"),
    ("name", '"My Board"', "'name' must be lower-case"),
    ("clock_hz", "-1", "'clock_hz' must not be negative, got -1"),
    ("clock_hz", '"240 MHz"', "'clock_hz' must be an integer, got '240 MHz'"),
])
def test_a_bad_board_file_is_one_line(tmp_path, capsys, no_training, key, value, needle):
    path = tmp_path / "b.toml"
    path.write_text(_edit(BASE, key, value))
    rc = cli.main(["build", "--board-file", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: board file {path}: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_board_file_that_is_not_toml_or_missing(tmp_path, capsys, no_training):
    bad = tmp_path / "b.toml"
    bad.write_text("name = \n")
    assert cli.main(["build", "--board-file", str(bad), "--quiet"]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert cli.main(["build", "--board-file", str(tmp_path / "none.toml"), "--quiet"]) == 2
    assert "cannot read board file" in capsys.readouterr().err


def test_target_must_match_the_board_file(tmp_path, capsys, no_training):
    path = tmp_path / "b.toml"
    path.write_text(BASE)
    assert cli.main(["build", "--board-file", str(path), "--target", "esp32", "--quiet"]) == 2
    assert "does not match --board-file" in capsys.readouterr().err
    assert cli.main(["build", "--quiet"]) == 2
    assert "give --target BOARD" in capsys.readouterr().err


def test_a_user_boards_folder_adds_and_overrides_boards(tmp_path, monkeypatch):
    (tmp_path / "myboard.toml").write_text(BASE)
    (tmp_path / "esp32.toml").write_text(_edit((BOARDS_DIR / "esp32.toml").read_text(), "ram_bytes", "65536"))
    monkeypatch.setenv("TOOLCHAIN_BOARDS", str(tmp_path))
    profiles = all_profiles()
    assert profiles["myboard"].mpy_march == "armv6m" and profiles["myboard"].source == str(tmp_path / "myboard.toml")
    assert profiles["esp32"].ram_bytes == 65536  # the user's file wins over the shipped one
    out = subprocess.run([sys.executable, "-m", "toolchain.cli", "targets", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["myboard"]["flash_bytes"] == 1048576
    table = subprocess.run([sys.executable, "-m", "toolchain.cli", "targets"], capture_output=True, text=True,
                           check=True).stdout
    assert f"[{tmp_path / 'myboard.toml'}]" in table


def test_a_missing_user_boards_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOOLCHAIN_BOARDS", str(tmp_path / "nope"))
    assert cli.main(["targets"]) == 2
    assert "TOOLCHAIN_BOARDS names" in capsys.readouterr().err


def test_aliases():
    assert get_profile("jetson").name == "jetson-orin-nano"
    assert get_profile("pico").name == "rp2040" and get_profile("esp32-s3").name == "esp32s3"


def test_an_alias_reaches_the_build(tmp_path, capsys, no_training):
    # refused on the out folder after the board was resolved: the error names no unknown target
    (tmp_path / "x").write_text("")
    rc = cli.main(["build", "--target", "jetson", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "not an earlier `toolchain build` output" in capsys.readouterr().err


def test_clock_hz_is_optional_and_in_the_shipped_micropython_boards():
    """The latency estimate (toolchain.boards.latency) divides by it; Jetson has none (its engine was not measured)."""
    clocks = {name: p.clock_hz for name, p in all_profiles().items()}
    assert clocks["esp32"] == clocks["esp32s3"] == 240_000_000
    assert clocks["rp2040"] == 133_000_000 and clocks["microbit"] == 16_000_000
    assert clocks["jetson-orin-nano"] == 0
