"""Board profiles are data files; `toolchain targets` lists them."""

import json
import subprocess
import sys

from toolchain.boards.profiles import BOARDS_DIR, all_profiles, load_profile


def test_required_boards_present():
    profiles = all_profiles()
    for name in ("esp32", "esp32s3", "rp2040", "microbit", "jetson-orin-nano"):
        assert name in profiles
    mb = profiles["microbit"]
    assert mb.micropython == "1.9.2" and mb.weights_in_ram and mb.ram_bytes < 16 * 1024
    assert profiles["esp32"].mpy_march == "xtensawin" and profiles["rp2040"].mpy_march == "armv6m"


def test_adding_a_board_is_adding_a_file(tmp_path, monkeypatch):
    src = (BOARDS_DIR / "rp2040.toml").read_text().replace('name = "rp2040"', 'name = "myboard"')
    monkeypatch.setattr("toolchain.boards.profiles.BOARDS_DIR", tmp_path)
    (tmp_path / "myboard.toml").write_text(src)
    assert list(all_profiles()) == ["myboard"]
    assert load_profile(tmp_path / "myboard.toml").mpy_march == "armv6m"


def test_targets_cli_json():
    out = subprocess.run([sys.executable, "-m", "toolchain.cli", "targets", "--json"], capture_output=True,
                         text=True, check=True).stdout
    data = json.loads(out)
    assert data["esp32"]["ram_bytes"] > 0 and data["jetson-orin-nano"]["runtime"] == "onnxruntime"
    table = subprocess.run([sys.executable, "-m", "toolchain.cli", "targets"], capture_output=True, text=True,
                           check=True).stdout
    assert "microbit" in table and "rp2040" in table
