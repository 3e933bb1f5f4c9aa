"""`toolchain flash`, `toolchain emulate`, `toolchain hil` against real emulated boards (issue #8).

Real parts only: the micro:bit v1 MicroPython 1.9.2 firmware on QEMU and MicroPython 1.29 WebAssembly, both on
pseudo-terminals; mpremote, microfs and esptool as the user runs them; a real (small) int8 model converted by
TensorFlow, its .smf from the exporter and the bundle from ``toolchain.package.bundle``.
Every failure case checks the one-line error, the exit code and that the board's files did not change.

``pytest -m hil --board PORT|emulated`` runs the conformance checks (``test_conformance``) on a given board.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli_helpers import cli, one_line_error
from support.proc_helpers import ctrl_c_as_in_a_terminal

from toolchain.deploy.emulators import microbit as mb
from toolchain.deploy.emulators import wasm_repl
from toolchain.deploy.hil import CHECKS

REPO = Path(__file__).resolve().parents[1]
MPREMOTE = str(Path(sys.executable).with_name("mpremote"))
needs_wasm = pytest.mark.skipif(not wasm_repl.available(), reason="Node.js or the MicroPython WebAssembly package is missing")
needs_qemu = pytest.mark.skipif(not mb.available(), reason="qemu-system-arm or the micro:bit firmware is missing")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hil_plugin import make_emulated_builds

    return make_emulated_builds(tmp_path_factory.getbasetemp() / "hil")


@pytest.fixture(scope="module")
def wasm() -> Iterator[wasm_repl.WasmReplBoard]:
    if not wasm_repl.available():
        pytest.skip("Node.js or the MicroPython WebAssembly package is missing")
    with wasm_repl.WasmReplBoard() as board:
        yield board


@pytest.fixture(scope="module")
def qemu() -> Iterator[mb.QemuMicrobit]:
    if not mb.available():
        pytest.skip("qemu-system-arm or the micro:bit firmware is missing")
    with mb.QemuMicrobit() as board:
        time.sleep(1.0)
        yield board


def snapshot(port: str) -> dict[str, str]:
    """name -> sha256 of every file on the board (computed there, or read back on the micro:bit)."""
    from toolchain.deploy.flash_board import board_sha256, connect, identify, list_files

    repl = connect(port)
    try:
        info = identify(repl)
        return {n: board_sha256(repl, n, info) for n in list_files(repl)}
    finally:
        repl.close()


# --- the WebAssembly board is a serial board ---------------------------------------------------------------

@needs_wasm
def test_wasm_board_speaks_raw_repl_and_mpremote(wasm: wasm_repl.WasmReplBoard, tmp_path: Path) -> None:
    from toolchain.deploy.repl import RawRepl

    with RawRepl(wasm.port) as repl:
        repl.enter_raw()
        assert repl.exec("import sys\nprint(sys.platform, sys.implementation.version[:2])").strip() == "webassembly (1, 29)"
    src = tmp_path / "hello.py"
    src.write_text("print('hello from', __name__)\n")

    def mpr(*args: str) -> str:
        proc = subprocess.run([MPREMOTE, "connect", wasm.port, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert mpr("exec", "print(6*7)").strip() == "42"
    mpr("fs", "cp", str(src), ":hello.py")
    assert "hello.py" in mpr("fs", "ls")
    assert mpr("fs", "cat", "hello.py") == src.read_text()
    assert mpr("fs", "sha256sum", "hello.py").split()[-1] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "hello from hello" in mpr("exec", "import hello")
    mpr("fs", "rm", "hello.py")
    assert "hello.py" not in mpr("fs", "ls")


# --- acceptance: flash then hil ---------------------------------------------------------------------------

@needs_wasm
def test_flash_then_hil_pass_on_the_wasm_board(wasm: wasm_repl.WasmReplBoard, builds: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = cli(["flash", "--build", str(builds["esp32"]), "--port", wasm.port], capsys)
    assert rc == 0, err
    assert "sha256 verified" in out and "mpremote" in err  # progress went to stderr
    report = tmp_path / "hil.json"
    rc, out, err = cli(["hil", "--build", str(builds["esp32"]), "--port", wasm.port, "--json", str(report)], capsys)
    assert rc == 0, out + err
    results = {r["name"]: r for r in json.loads(report.read_text())}
    print(out)
    assert [r["status"] for r in results.values()] == ["pass"] * len(CHECKS), out
    assert "bit-exact with TFLite Micro" in results["inference"]["detail"]


@needs_qemu
def test_flash_then_hil_pass_on_the_qemu_microbit(qemu: mb.QemuMicrobit, builds: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = cli(["flash", "--build", str(builds["microbit"]), "--port", qemu.port], capsys)
    assert rc == 0, err
    assert "microfs" in out and "read back" in err
    report = tmp_path / "hil.json"
    rc, out, err = cli(["hil", "--build", str(builds["microbit"]), "--port", qemu.port, "--json", str(report)], capsys)
    print(out)
    assert rc == 0, out + err
    results = {r["name"]: r for r in json.loads(report.read_text())}
    # the micro:bit engine (smf_mb, two boots: convert, then load) on the 1.9.2 firmware, bit-exact
    assert [r["status"] for r in results.values()] == ["pass"] * len(CHECKS), out
    assert "bit-exact with TFLite Micro" in results["inference"]["detail"]


@needs_qemu
def test_mpremote_exec_and_run_work_on_the_qemu_microbit(qemu: mb.QemuMicrobit, tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint(sys.platform, 2 + 3)\n")
    for args in (["exec", "import sys\nprint(sys.platform, 2 + 3)"], ["run", str(script)]):
        proc = subprocess.run([MPREMOTE, "connect", qemu.port, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.split() == ["microbit", "5"], proc.stdout + proc.stderr


# --- failures: one line, exit code, board unchanged ------------------------------------------------------

def test_wrong_port_is_one_line(tmp_path: Path, builds: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(["flash", "--build", str(builds["esp32"]), "--port", "/dev/ttyNOPE0"], capsys)
    assert rc == 2 and "does not exist" in one_line_error(err)
    not_a_tty = tmp_path / "port"
    not_a_tty.write_text("")
    rc, _, err = cli(["hil", "--build", str(builds["esp32"]), "--port", str(not_a_tty)], capsys)
    assert rc == 2 and "not a serial device" in one_line_error(err)


def test_a_port_nobody_answers_on_is_one_line(builds: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    master, slave = os.openpty()  # a serial line with nothing behind it
    try:
        rc, _, err = cli(["flash", "--build", str(builds["esp32"]), "--port", os.ttyname(slave)], capsys)
        assert rc == 2 and "no MicroPython REPL answers" in one_line_error(err)
    finally:
        os.close(master)
        os.close(slave)


@needs_wasm
@needs_qemu
def test_wrong_firmware_is_refused_and_the_board_is_unchanged(wasm: wasm_repl.WasmReplBoard, qemu: mb.QemuMicrobit,
                                                              builds: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for port, build in ((qemu.port, builds["esp32"]), (wasm.port, builds["microbit"])):
        before = snapshot(port)
        rc, _, err = cli(["flash", "--build", str(build), "--port", port], capsys)
        line = one_line_error(err)
        assert rc == 2 and "not the firmware target" in line, line
        assert snapshot(port) == before


@needs_qemu
def test_bundle_too_big_is_refused_and_the_board_is_unchanged(qemu: mb.QemuMicrobit, builds: dict[str, Path],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "microbit"
    shutil.copytree(builds["microbit"], big)
    (big / "bundle" / "extra.bin").write_bytes(os.urandom(6000))  # the micro:bit's file system holds ~15 KB
    before = snapshot(qemu.port)
    rc, _, err = cli(["flash", "--build", str(big), "--port", qemu.port], capsys)
    line = one_line_error(err)
    assert rc == 3 and "more than the 15120 B microbit has" in line, line
    assert snapshot(qemu.port) == before


@needs_wasm
def test_hil_catches_a_corrupted_bundle(wasm: wasm_repl.WasmReplBoard, builds: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from toolchain.deploy.repl import RawRepl

    rc, _, err = cli(["flash", "--build", str(builds["esp32"]), "--port", wasm.port], capsys)
    assert rc == 0, err
    with RawRepl(wasm.port) as repl:
        repl.enter_raw()
        repl.exec("f=open('model.smf','r+b')\nf.seek(40)\nf.write(b'\\x7f')\nf.close()")
    rc, out, err = cli(["hil", "--build", str(builds["esp32"]), "--port", wasm.port, "--check", "bundle"], capsys)
    assert rc == 4 and "FAIL  bundle" in out and "model.smf" in one_line_error(err)


def test_mpy_that_the_board_cannot_import_falls_back_to_py(builds: dict[str, Path]) -> None:
    from toolchain.deploy.flash import resolve_build, select_for_board
    from toolchain.deploy.flash_board import BoardInfo
    from toolchain.package.load import load_bundle, mpy_header

    build_dir, manifest, profile = resolve_build(None, str(builds["esp32"]))
    bundle = load_bundle(build_dir, manifest, profile)
    head = mpy_header(bundle.files["smf.mpy"])
    assert head is not None and head[0] == 6  # mpy-cross 1.29 writes bytecode version 6
    new = BoardInfo("p", "esp32", (1, 29, 0), 6 | 3 << 8 | 10 << 10, True, 10**6, 10**5)
    assert "smf.mpy" in select_for_board(bundle, new, log=lambda _m: None)
    warnings: list[str] = []
    old = BoardInfo("p", "esp32", (1, 18, 0), 5 | 10 << 10, True, 10**6, 10**5)  # 1.18: .mpy version 5
    files = select_for_board(bundle, old, log=warnings.append)
    assert "smf.mpy" not in files and files["smf.py"] == (REPO / "device_runtime/micropython/smf.py").read_bytes()
    assert len(warnings) == 1 and "cannot import the bundle's .mpy" in warnings[0]


def test_esptool_failures_are_one_line(builds: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(["flash", "--build", str(builds["esp32"]), "--port", "/dev/ttyNOPE0", "--firmware",
                      str(tmp_path / "missing.bin")], capsys)
    assert rc == 2 and "firmware image" in one_line_error(err)
    image = tmp_path / "ESP32_GENERIC-v1.29.0.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    rc, _, err = cli(["flash", "--build", str(builds["esp32"]), "--port", "/dev/ttyNOPE0", "--firmware", str(image)],
                     capsys)  # esptool 5 really runs (subprocess) and cannot open the port
    assert rc == 2 and "esptool" in one_line_error(err)
    rc, _, err = cli(["flash", "--build", str(builds["microbit"]), "--port", "/dev/ttyNOPE0", "--firmware", str(image)],
                     capsys)
    assert rc == 2 and "ESP32" in one_line_error(err)


def test_jetson_flash_writes_an_install_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    build = tmp_path / "jetson"
    build.mkdir()
    onnx.save(helper.make_model(graph), str(build / "model.onnx"))
    (build / "manifest.json").write_text(json.dumps({"target": "jetson-orin-nano", "manifest_version": 1}))
    rc, out, err = cli(["flash", "--build", str(build)], capsys)
    assert rc == 0, err
    archive = build / "jetson-orin-nano-bundle.tar.gz"
    with tarfile.open(archive) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert {"model.onnx", "config.json", "install.sh", "SHA256SUMS", "agent.py", "runtime.py", "run_agent.sh",
            "requirements.txt", "toolchain/fleet/device_agent.py"} <= set(files)  # the agent runs from the archive
    for line in files["SHA256SUMS"].decode().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256(files[name]).hexdigest() == digest
    assert "install.sh" in out


# --- toolchain emulate ------------------------------------------------------------------------------------

@needs_wasm
def test_emulate_prints_ports_that_work_and_cleans_up() -> None:
    from toolchain.deploy.repl import RawRepl

    proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "emulate", "wasm", "--count", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().split() for _ in range(2)]
        assert all(len(ln) == 4 and ln[0] == f"wasm-{i}" for i, ln in enumerate(lines, 1)), lines
        for _, port, _, _ in lines:
            with RawRepl(port) as repl:
                repl.enter_raw()
                assert repl.exec("print(1+1)").strip() == "2"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)  # (drains stderr: a full pipe would block the shutdown)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for _, _, _, pid in lines:  # every Node.js board it started is gone
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


# --- pytest -m hil --board PORT|emulated -------------------------------------------------------------------

@pytest.mark.hil
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(hil_results: dict, check: str) -> None:
    result = hil_results[check]
    if result.status == "skip":
        pytest.skip(result.detail)
    assert result.status == "pass", result.detail
