"""pytest plugin for the hardware-in-the-loop conformance suite (docs/hil.md).

    pytest -m hil --board /dev/ttyUSB0 --hil-build build/esp32   # a real board, flashed with `toolchain flash`
    pytest -m hil --board emulated                               # CI: QEMU micro:bit + WebAssembly board

Without ``--board`` the ``hil`` tests skip with the reason. With ``--board emulated`` the suite flashes a small
real build (``toolchain.package.testbuild`` + ``toolchain.package.bundle``) to each emulated board first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

EMULATED = ("wasm", "microbit")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop conformance suite")
    group.addoption("--board", default=None, help="PORT of a flashed board, or 'emulated' (QEMU micro:bit + WebAssembly)")
    group.addoption("--hil-build", default=None, help="build folder flashed on --board PORT (default: build/<target>)")
    group.addoption("--hil-target", default=None, help="target of --board PORT (default: the build's)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hil: hardware-in-the-loop conformance suite (real board or emulated)")


@dataclass
class HilBoard:
    name: str  # "wasm", "microbit" or the port
    port: str
    build: str
    target: str | None


def _tiny_tflite(cache: Path) -> bytes:
    from support import sparse_models as sm

    path = cache / "hil_microbit.tflite"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sm.build_tflite("microbit", 0.08, steps=30))
    return path.read_bytes()


def make_emulated_builds(cache: Path) -> dict[str, Path]:
    """build folders (manifest, model.tflite/.smf, bundle/) for esp32 (used on the wasm board) and microbit."""
    from toolchain.boards.profiles import get_profile
    from toolchain.package.bundle import write_bundle
    from toolchain.package.testbuild import make_build

    tfl = _tiny_tflite(cache)
    out = {}
    for target in ("esp32", "microbit"):
        d = cache / "builds" / target
        if not (d / "bundle" / "config.json").is_file():
            make_build(tfl, target, d)
            write_bundle(d, get_profile(target))
        out[target] = d
    return out


@pytest.fixture(scope="session")
def emulated_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_emulated_builds(tmp_path_factory.getbasetemp() / "hil")


def _board_params(config: pytest.Config) -> list[str]:
    board = config.getoption("--board")
    if board is None:
        return ["none"]
    return list(EMULATED) if board == "emulated" else [board]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hil_board" in metafunc.fixturenames:
        metafunc.parametrize("hil_board", _board_params(metafunc.config), indirect=True, scope="session")


@pytest.fixture(scope="session")
def hil_board(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HilBoard]:
    which = request.param
    if which == "none":
        pytest.skip("no board: run with --board PORT (a flashed board) or --board emulated")
    if which not in EMULATED:
        build = request.config.getoption("--hil-build")
        target = request.config.getoption("--hil-target")
        if build is None and target is None:
            pytest.skip("--board PORT needs --hil-build DIR or --hil-target T (the build flashed on the board)")
        yield HilBoard(which, which, build or f"build/{target}", target)
        return
    from toolchain.deploy.flash import flash

    builds = make_emulated_builds(tmp_path_factory.getbasetemp() / "hil")
    if which == "wasm":
        from toolchain.deploy.emulators.wasm_repl import WasmReplBoard, available

        if not available():
            pytest.skip("Node.js or the MicroPython WebAssembly package is missing")
        board = WasmReplBoard()
        build = builds["esp32"]
    else:
        from toolchain.deploy.emulators.microbit import QemuMicrobit, available

        if not available():
            pytest.skip("qemu-system-arm or the micro:bit firmware is missing")
        board = QemuMicrobit()
        build = builds["microbit"]
    try:
        time.sleep(1.0)
        flash(None, board.port, str(build), log=lambda _m: None)
        yield HilBoard(which, board.port, str(build), None)
    finally:
        board.stop()


@pytest.fixture(scope="session")
def hil_results(hil_board: HilBoard) -> dict:
    """The whole suite, run once per board (checks share one soft-reset sequence, as `toolchain hil` runs them)."""
    from toolchain.deploy.hil.suite import run_suite

    return {r.name: r for r in run_suite(hil_board.port, hil_board.target, hil_board.build)}
