"""The checked-in Flower app (flower_app/) run by ``flwr run`` exactly as Flower's own examples are run:
Flower 1.41's ``local`` connection starts a simulation SuperLink, ``--federation-config`` sizes the
federation. Its results must equal the in-process engine's bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _managed_superlinks(port: int) -> list[int]:
    """The SuperLink ``flwr run`` started for its ``local`` connection (detached), found by its port."""
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmd.read_bytes().split(b"\0")
            if any(a.endswith(b"flower-superlink") for a in argv) and str(port).encode() in argv:
                out.append(int(cmd.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_flwr_run_of_the_checked_in_app(tmp_path):
    pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")
    from toolchain.learning.flower import make_spec
    from toolchain.learning.flower.driver import run_inprocess
    from toolchain.learning.flower.launch import descendants, free_port
    from toolchain.pipelines.train import TrainOptions

    http, control = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="tcr")  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           "RAY_TMPDIR": ray_tmp, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    out = tmp_path / "run"
    argv = [str(Path(sys.executable).parent / "flwr"), "run", str(REPO / "flower_app"), "local", "--stream",
            "--run-config", f"clients=2 rounds=2 train-limit=300 test-limit=100 out='{out}'",
            "--federation-config", "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=1"]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=360)
    finally:
        for pid in _managed_superlinks(http):  # stop what `flwr run` left running, and its children
            for p in [pid, *descendants([pid])]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "toolchain: round 2" in proc.stdout + proc.stderr
    assert not (REPO / "flower_app" / "pyproject.toml").read_text().count("[tool.flwr.federations]")

    ref_hist, ref = run_inprocess(make_spec(TrainOptions(algo="gmp", out=str(tmp_path / "ref"), clients=2,
                                                         rounds=2, quiet=True), 300, 100))
    got = torch.load(out / "model.pt")
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got["state_dict"][k], v), k
    assert all(torch.equal(got["masks"][k], m) for k, m in ref.masks.items())
