"""Standard tools keep working (issue 16, item 6): ``mpremote`` interrupts a board running the device app's serial
loop (``app.run``) and gets its REPL; the app can be started again. The board: MicroPython 1.28 on an emulated
Cortex-M3 (QEMU mps2-an385, built by scripts/build_micropython.sh), its UART on a pty, whose REPL is that UART, as
on an ESP32 or a Pico whose app talks the protocol over the USB REPL port. Before: ``mpremote connect PORT exec``
hung (the app read mpremote's Ctrl-C and Ctrl-A as protocol bytes)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolchain.deploy.emulators import qemu_cortexm
from toolchain.fleet import Hello, Ping, RoundStart, SerialLink, Status

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not qemu_cortexm.available("an385"), reason=qemu_cortexm.MISSING)]
REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "device_runtime" / "micropython"

# main.py of the board: the modules come as source (this firmware has no writable file system), then the app on
# the REPL's UART: App(out, ft, data, ids) with no model (this test is about the serial loop, not training).
START = """
import sys
class _M:
    pass
def _mod(name, src):
    g = {'__name__': name}
    exec(src, g)
    m = _M()
    for k in g:
        setattr(m, k, g[k])
    sys.modules[name] = m
_mod('proto', PROTO)
_mod('app', APP)
import app
_a = app.App(sys.stdout.buffer.write, None, None, (b'qemu-1', b'mps2-an385', b'micropython 1.28'), session=77)
app.run(_a, app.stdin_reader())
"""


def _mpremote(port: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args], capture_output=True, text=True,
                          timeout=timeout)


def _start_app(port: str) -> None:
    code = f"PROTO = {(DEV / 'proto.py').read_text()!r}\nAPP = {(DEV / 'app.py').read_text()!r}\n" + START
    r = _mpremote(port, "exec", "--no-follow", code)
    assert r.returncode == 0, r.stderr


def _hello(port: str, timeout: float = 20) -> Hello:
    link = SerialLink.open(port, max_message=600, ack_timeout=0.5)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = link.recv_message(1)
            if isinstance(msg, Hello):
                # frames whose bytes hold 0x03 and '\r' 0x03 are data, not an interrupt: the app answers them
                link.send_message(RoundStart(1, 4, 1e-3, 0.5, 1, 8, round_seed=0x030D0D03))
                link.send_message(Ping())
                kinds = set()
                while not {"err", "status"} <= kinds and time.monotonic() < deadline:
                    m = link.recv_message(1)
                    kinds |= {"err"} if getattr(m, "code", 0) == 9 else {"status"} if isinstance(m, Status) else set()
                assert kinds == {"err", "status"}, kinds
                return msg
        raise AssertionError("the app sent no HELLO")
    finally:
        link.close()


def test_mpremote_interrupts_the_app_and_it_restarts(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    with open(log, "wb") as f:
        qemu = subprocess.Popen(["qemu-system-arm", "-machine", "mps2-an385", "-nographic", "-monitor", "null",
                                 "-semihosting", "-serial", "pty", "-kernel", str(qemu_cortexm.BOARDS["an385"][1])],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        port = None
        for _ in range(100):
            m = re.search(rb"/dev/pts/\d+", log.read_bytes())
            if m:
                port = m.group().decode()
                break
            time.sleep(0.05)
        assert port, log.read_text()
        time.sleep(0.5)
        _start_app(port)
        assert _hello(port).device_id == "qemu-1"  # the app runs and speaks the protocol on the UART
        t0 = time.monotonic()
        r = _mpremote(port, "exec", "print(6 * 7)")
        took = time.monotonic() - t0
        assert r.returncode == 0 and r.stdout.strip().endswith("42"), (r.stdout, r.stderr)
        print(f"mpremote exec answered in {took:.1f} s on a running app")
        assert took < 20, took
        _start_app(port)  # started again from the REPL
        assert _hello(port).device_id == "qemu-1"
        r = _mpremote(port, "exec", "print('again')")  # and interrupted again
        assert r.returncode == 0 and r.stdout.strip().endswith("again"), (r.stdout, r.stderr)
    finally:
        qemu.kill()
        qemu.wait(10)
