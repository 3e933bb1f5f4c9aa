"""`toolchain flash --device-id ID --key-master FILE`: the device's own key and model.tag are provisioned at flash
time (docs/fleet.md, "Provisioning at flash time"), and ``app_boot.py`` on the flashed board loads the model only
while model.smf matches model.tag.

Real parts: MicroPython 1.29 WebAssembly as a REPL board on a pty, flashed by ``toolchain flash`` (mpremote), the
esp32 build's bundle from ``toolchain.package.bundle``, and the board's own ``app_boot.start`` run after a soft
reset (files kept, fresh heap: a reboot).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli_helpers import cli, one_line_error

from toolchain.contracts.wire.security import device_key
from toolchain.deploy.emulators import wasm_repl
from toolchain.deploy.flash_board import connect, read_file, soft_reset
from toolchain.deploy.repl import RawRepl
from toolchain.package.bundle import model_tag

pytestmark = pytest.mark.timeout(300)
needs_wasm = pytest.mark.skipif(not wasm_repl.available(), reason="Node.js or the MicroPython WebAssembly package is missing")
MASTER = b"fleet master key for the provisioning test"
DEVICE = "wasm-7"
# the board's own data shard, there before the model is flashed: flashing must keep it
LOCAL = {"device": "unprovisioned", "n": 2, "size": 4, "labels": [0, 1], "key": "00", "model_id": 0, "max_message": 600}
# app_boot.start with an out() that drops the protocol bytes: what is asked is whether the model was loaded
BOOT = ("import gc\nimport app_boot\na = app_boot.start(lambda b: None, 'wasm', 'micropython 1.29 wasm', '', gc.mem_free)\n"
        "print('BOOT', a.mid, a.ft is not None)\n")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hil_plugin import make_emulated_builds

    return make_emulated_builds(tmp_path_factory.getbasetemp() / "hil")


@pytest.fixture
def board() -> Iterator[wasm_repl.WasmReplBoard]:
    if not wasm_repl.available():
        pytest.skip("Node.js or the MicroPython WebAssembly package is missing")
    with wasm_repl.WasmReplBoard() as b:
        yield b


def boot(repl: RawRepl) -> tuple[str, str]:
    """Reboot (soft reset: files stay) and start app_boot.py as the board's main would; (BOOT line, all output)."""
    soft_reset(repl)
    out = repl.exec(BOOT, timeout=120)
    line = next(ln for ln in out.splitlines() if ln.startswith("BOOT "))
    return line, out


def test_bad_inputs_are_one_line_before_the_port(builds: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # the port does not exist: each error below is about the input, so it was checked before the port was opened
    base = ["flash", "--build", str(builds["esp32"]), "--port", "/dev/ttyNOPE0"]
    empty = tmp_path / "empty.key"
    empty.write_bytes(b" \n")
    good = tmp_path / "master.key"
    good.write_bytes(MASTER + b"\n")
    for extra, want in ((["--device-id", DEVICE, "--key-master", str(tmp_path / "missing.key")], "cannot read --key-master"),
                        (["--device-id", DEVICE, "--key-master", str(empty)], "is empty"),
                        (["--device-id", "a/b", "--key-master", str(good)], "--device-id 'a/b' must be"),
                        (["--device-id", "x" * 33, "--key-master", str(good)], "must be 1..32"),
                        (["--device-id", DEVICE], "go together"),
                        (["--key-master", str(good)], "go together"),
                        (["--device-id", DEVICE, "--key-master", str(good), "--model-id", "0"], "--model-id 0")):
        rc, _, err = cli(base + extra, capsys)
        line = one_line_error(err)
        assert rc == 2 and want in line, line
    rc, _, err = cli(["flash", "--build", str(builds["microbit"]), "--port", "/dev/ttyNOPE0", "--device-id", DEVICE,
                      "--key-master", str(good)], capsys)
    assert rc == 2 and "--device-keys" in one_line_error(err)


@needs_wasm
def test_provisioned_model_loads_and_a_flipped_byte_is_refused(board: wasm_repl.WasmReplBoard, builds: dict[str, Path],
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_bytes(MASTER + b"\n")  # a trailing newline, as an editor leaves it: stripped like serve does
    repl = connect(board.port)
    try:
        repl.put_file("local.json", json.dumps(LOCAL).encode())
        repl.put_file("data.bin", bytes(range(8)))
    finally:
        repl.close()

    rc, out, err = cli(["flash", "--build", str(builds["esp32"]), "--port", board.port, "--device-id", DEVICE,
                        "--key-master", str(key_file)], capsys)
    assert rc == 0, err
    assert f"provisioned as device {DEVICE}" in out and "sha256 verified" in out
    assert MASTER.decode() not in out + err and device_key(MASTER, DEVICE).hex() not in out + err  # no key in logs

    smf = (builds["esp32"] / "bundle" / "model.smf").read_bytes()
    want_key = device_key(MASTER, DEVICE)  # what serve --per-device-keys derives for this id
    repl = connect(board.port)
    try:
        loc = json.loads(read_file(repl, "local.json"))
        assert loc == {**LOCAL, "device": DEVICE, "key": want_key.hex(), "model_id": 1}  # the data shard is kept
        assert read_file(repl, "model.tag") == model_tag(want_key, 1, smf)
        assert read_file(repl, "data.bin") == bytes(range(8))

        line, log = boot(repl)
        assert line == "BOOT 1 True", log  # the flashed model is checked and loaded
        assert "does not match model.tag" not in log

        bad = bytearray(smf)
        bad[len(bad) // 2] ^= 0x01  # one bit of the model on the board's flash
        repl.put_file("model.smf", bytes(bad))
        line, log = boot(repl)
        assert line == "BOOT 0 False", log  # refused: no model, STATUS says model 0 and the host sends it again
        assert [ln for ln in log.splitlines() if "model.tag" in ln] == [
            "model.smf does not match model.tag: not loaded (the host sends it again)"]
    finally:
        repl.close()


@needs_wasm
def test_a_board_without_local_data_still_boots_with_its_key(board: wasm_repl.WasmReplBoard, builds: dict[str, Path],
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_bytes(MASTER)
    rc, _, err = cli(["flash", "--build", str(builds["esp32"]), "--port", board.port, "--device-id", "wasm-8",
                      "--key-master", str(key_file), "--model-id", "5"], capsys)
    assert rc == 0, err
    assert "no local data yet" in err
    repl = connect(board.port)
    try:
        loc = json.loads(read_file(repl, "local.json"))
        assert loc == {"n": 0, "size": 0, "labels": [], "device": "wasm-8", "key": device_key(MASTER, "wasm-8").hex(),
                       "model_id": 5}
        assert read_file(repl, "data.bin") == b""
        line, log = boot(repl)
        assert line == "BOOT 5 True", log  # tagged with model id 5, checked with it
    finally:
        repl.close()
