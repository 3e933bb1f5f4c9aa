"""`toolchain gateway --microbit PORT`: the micro:bit v1 (MicroPython 1.9.2 on QEMU) on the MQTT fleet through the
raw-REPL proxy, started from the CLI (docs/fleet.md), and the CLI's one-line errors for bad ports."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.fleet_helpers import microbit_files
from support.fleet_model import make_model
from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401
from support.proc_helpers import ctrl_c_as_in_a_terminal

from toolchain.deploy.emulators import microbit, wasm_repl
from toolchain.deploy.repl import RawRepl
from toolchain.fleet import Ack, Hello, MqttConfig, MqttHost, Ping, RoundResult, RoundStart, RoundUpdate, Status
from toolchain.verify.reference import reference_probe

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toolchain.cli", "gateway", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _one_error_line(stderr: str) -> bool:
    """Besides the gateway's progress lines: exactly one line, ``error: ...`` (no traceback)."""
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("[gateway] ")]
    return len(lines) == 1 and lines[0].startswith("error: ")


@pytest.mark.skipif(not microbit.available(), reason="qemu-system-arm / micro:bit firmware not installed")
def test_gateway_cli_puts_a_microbit_on_mqtt(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    m = make_model()
    idx = m.split(3)[2][:16]
    broker = f"127.0.0.1:{mosquitto.port}"
    qemu = microbit.QemuMicrobit()
    proc = None
    host = MqttHost(MqttConfig(port=mosquitto.port, fleet="gw"))
    try:
        time.sleep(0.5)
        # a bare micro:bit: refused in one line, naming what is missing
        bare = _cli("--microbit", qemu.port, "--broker", broker, "--fleet", "gw")
        assert bare.returncode == 2 and "lacks zo.py, ft.py, spec.py, head.bin, d.bin, y.bin" in bare.stderr, bare.stderr
        assert _one_error_line(bare.stderr), bare.stderr
        with RawRepl(qemu.port, timeout=60) as repl:  # provision it: the bundle's fine-tuner files + its data set
            repl.enter_raw()
            for name, data in microbit_files(m, idx).items():
                repl.put_file(name, data)
        host.start()
        log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "gateway", "--microbit", f"{qemu.port}=mb-cli",
                                 "--broker", broker, "--fleet", "gw"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=ctrl_c_as_in_a_terminal)
        log.close()

        def expect(kind: type, pred: object = lambda _m: True, timeout: float = 60.0) -> object:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                got = host.recv(0.5)
                if got is not None and isinstance(got[1], kind) and pred(got[1]):  # type: ignore[operator]
                    assert got[0] == "mb-cli"
                    return got[1]
                assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            raise AssertionError(f"no {kind.__name__}; gateway: {(tmp_path / 'gateway.log').read_text()}")

        hello = expect(Hello)
        assert (hello.board, hello.caps) == ("microbit", 0) and hello.firmware.endswith("(raw REPL)")
        st = expect(Status)  # the boot STATUS; PING -> HELLO + STATUS (the HELLO equals the boot one: MQTT dedupe)
        assert (st.model_id, st.round_id) == (1, 0)
        host.send("mb-cli", Ping())
        st = expect(Status, lambda s: s.uptime_s > 0)
        assert (st.model_id, st.round_id) == (1, 0)
        seed = 0xC0FFEE
        host.send("mb-cli", RoundStart(1, 4, 1e-3, 1.0, 1, 16, round_seed=seed))
        res = expect(RoundResult)
        ref = reference_probe(m.head, m.head.weights, m.feats[idx], m.y[idx], seed, 4, 1e-3)
        assert res.n_samples == len(idx) and res.loss == pytest.approx(ref.loss, abs=1e-3)
        # the board's 30-bit floats: docs/zo.md section 9 (measured within 7e-4 in the fleet test)
        assert max(abs(a - b) for a, b in zip(res.scalars, ref.scalars, strict=True)) < 5e-3, (res.scalars, ref.scalars)
        host.send("mb-cli", RoundUpdate(1, seed, 1.0, res.scalars))
        assert expect(Ack) == Ack(0x12, 1)
        host.send("mb-cli", Ping())
        expect(Status, lambda s: s.round_id == 1)
        assert "mb-cli (micro:bit, 16 samples" in (tmp_path / "gateway.log").read_text()
    finally:
        host.stop()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the gateway says OFFLINE and exits 0
            try:
                assert proc.wait(120) == 0  # (the proxy first finishes the board command in flight: slow under load)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        qemu.stop()


def test_gateway_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from toolchain.cli import main

    cases = [((), "at least one --port"), (("--microbit", "/dev/no-such-port"), "does not exist"),
             (("--microbit", str(tmp_path)), "is not a serial device"), (("--port", "/dev/no-such-port"), "does not exist"),
             (("--microbit", "/dev/ptmx="), "PORT=DEVICE_ID"), (("--microbit", "/dev/ptmx", "--port", "/dev/ptmx"), "twice"),
             (("--microbit", "/dev/ptmx", "--broker", "127.0.0.1:1"), "cannot reach the MQTT broker")]
    for args, what in cases:
        rc = main(["gateway", *args])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and _one_error_line(err), (args, err)


@pytest.mark.skipif(not wasm_repl.available(), reason="Node.js or the MicroPython WebAssembly package is missing")
def test_gateway_cli_refuses_a_board_that_is_not_a_microbit(mosquitto, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001, F811
    from toolchain.cli import main

    port, node = wasm_repl.start_wasm_board()
    try:
        rc = main(["gateway", "--microbit", port, "--broker", f"127.0.0.1:{mosquitto.port}"])
        err = capsys.readouterr().err
        assert rc == 2 and "not a micro:bit v1" in err and "webassembly" in err and _one_error_line(err), err
    finally:
        wasm_repl.stop_wasm_board(node)
