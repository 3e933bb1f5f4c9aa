"""A fleet no stranger can poison (issue 16), attacked through a real mosquitto on loopback: forged results from
ids that were not asked, a sampled device that lies (huge scalars, a huge ``n``), with Jetson agents
(``device_runtime/jetson/agent.py`` processes, onnxruntime) as the honest devices."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.fleet_helpers import JetsonProcess, RogueDevice
from support.fleet_model import make_model
from support.mosquitto_fixture import mosquitto, mosquitto_factory  # noqa: F401

from toolchain.contracts.zo import ClientReply
from toolchain.fleet import MqttConfig, MqttDevice, RoundResult
from toolchain.fleet.coordinator import (
    Coordinator,
    RoundConfig,
    counted_results,
    read_rounds,
    robust_aggregate,
)
from toolchain.fleet.transports import MqttFleet

pytestmark = pytest.mark.timeout(300)
FORGED = ((1e6,) * 8, 0.0, (1 << 30) - 1)  # the RoundResult(r, [1e6]*8, loss 0, n=2**30-1)


def _wal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "wal.jsonl").read_text().splitlines()]


def test_forged_results_from_strangers_and_for_other_rounds_are_rejected(  # noqa: F811
        tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    fleet_name = "lab"
    mcfg = MqttConfig(port=mosquitto.port, fleet=fleet_name)
    m = make_model()
    idx = m.split(3)
    jets = [JetsonProcess(m, f"jet-{i}", idx[i], tmp_path / f"j{i}", f"127.0.0.1:{mosquitto.port}", fleet_name)
            for i in range(2)]
    evil = MqttDevice(mcfg, "evil")  # anonymous: never said HELLO, publishes results on tinyml/lab/evil/up
    spoof = MqttDevice(mcfg, "jet-0", client_id="spoof")  # a stranger on a participant's topic (no ACL here)
    fleet = coord = None
    out = tmp_path / "coord"
    try:
        evil.start()
        spoof.start()
        fleet = MqttFleet(mcfg)
        cfg = RoundConfig(rounds=4, k=8, lr=1.0, batch=32, min_devices=2, deadline_s=60, resend_s=3)
        coord = Coordinator(fleet, cfg, out, progress=sys.stderr)
        forged_for: set[int] = set()

        def attack() -> bool:
            c = coord
            assert c is not None
            if c._open and c.round not in forged_for:  # each round, as soon as it is open
                forged_for.add(c.round)
                evil.send(RoundResult(c.round, *FORGED))
                spoof.send(RoundResult(c.round + 1, *FORGED))  # a participant's id, for a round not asked
                if c.round > 1:
                    spoof.send(RoundResult(c.round - 1, *FORGED))  # ... and for a closed round
            return False

        assert coord.run(until=attack, timeout=200), coord.summary()
        rounds = read_rounds(out)
        assert [r["round"] for r in rounds] == [1, 2, 3, 4]
        assert all(sorted(r["devices"]) == ["jet-0", "jet-1"] for r in rounds)
        assert not any(d == "evil" for _, d in counted_results(out))
        why = {(r, d): w for r, d, w in coord.rejected}
        assert all(why.get((r, "evil")) for r in forged_for), coord.rejected  # every forgery rejected and logged
        assert sum(1 for (_, d) in why if d == "jet-0") >= 3  # the other-round ones too (or counted late)
        losses = [r["loss"] for r in rounds]
        assert losses[-1] < losses[0] and max(losses) < 2 * losses[0], losses  # the issue: 0.47 -> 325972
        for w in _wal(out):
            if w["t"] == "close":
                assert max(abs(g) for g in w["gbar"]) < 100, w
    finally:
        for obj in (coord, fleet):
            if obj is not None:
                obj.close()
        for d in (evil, spoof):
            d.stop()
        for j in jets:
            j.close()


def test_a_sampled_liar_is_bounded(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """A device that got itself sampled answers [1e6]*8 with n = 2**30-1 (rejected: more than the batch asked),
    then with n = batch (counted, clipped to 3x the round's lower median norm): the honest devices' losses stay
    where training takes them."""
    fleet_name = "lab"
    mcfg = MqttConfig(port=mosquitto.port, fleet=fleet_name)
    m = make_model()
    idx = m.split(3)
    jets = [JetsonProcess(m, f"jet-{i}", idx[i], tmp_path / f"j{i}", f"127.0.0.1:{mosquitto.port}", fleet_name)
            for i in range(2)]
    rogue = RogueDevice(mcfg, "mallory")
    fleet = coord = None
    out = tmp_path / "coord"
    try:
        fleet = MqttFleet(mcfg)
        cfg = RoundConfig(rounds=4, k=8, lr=1.0, batch=32, min_devices=3, deadline_s=60, resend_s=3)
        coord = Coordinator(fleet, cfg, out, progress=sys.stderr)
        assert coord.run(timeout=200), coord.summary()
        rounds = read_rounds(out)
        assert len(rounds) == 4 and rogue.asked
        for r in rounds:
            assert sorted(r["devices"]) == ["jet-0", "jet-1", "mallory"] and r["clipped"] == ["mallory"], r
        assert sum(1 for _, d, w in coord.rejected if d == "mallory" and w.startswith("n 1073741823")) >= 4
        honest = [np.mean([r["per_device"][d]["loss"] for d in ("jet-0", "jet-1")]) for r in rounds]
        assert honest[-1] < honest[0] * 1.05 and max(honest) < 1.5 * honest[0], honest
        # what the plain n-weighted mean would have sent (the step): the clip bounds it by 1e5 times
        for w in _wal(out):
            if w["t"] != "close":
                continue
            res = [x for x in _wal(out) if x["t"] == "result" and x["round"] == w["round"]]
            replies = [ClientReply(np.asarray(x["scalars"], np.float32), x["loss"], x["n"]) for x in res]
            plain, _ = robust_aggregate(replies, "mean")
            assert float(np.abs(plain.scalars).max()) > 1e5
            assert max(abs(g) for g in w["gbar"]) < 1e-4 * float(np.abs(plain.scalars).max())
    finally:
        for obj in (coord, fleet, rogue):
            if obj is not None:
                obj.close()
        for j in jets:
            j.close()


def test_robust_aggregate_rules() -> None:
    honest = [ClientReply(np.full(4, v, np.float32), 0.5, 32) for v in (1.0, -1.0, 2.0)]
    liar = ClientReply(np.full(4, 1e6, np.float32), 0.0, 32)
    agg, clipped = robust_aggregate([*honest, liar], "clip", 3.0)
    assert clipped == [3] and float(np.abs(agg.scalars).max()) <= 3.0 * 2.0  # lower median norm: 2 (of 2, 2, 4, 2e6)
    agg, clipped = robust_aggregate([honest[0], liar], "clip", 3.0)  # two replies: the lower one bounds
    assert clipped == [1] and float(np.abs(agg.scalars).max()) <= 2.0 + 1e-6
    agg, _ = robust_aggregate([*honest, liar], "median")
    assert float(np.abs(agg.scalars).max()) <= 2.0
    agg, _ = robust_aggregate([*honest, liar], "mean")
    assert float(np.abs(agg.scalars).max()) > 1e5
    with pytest.raises(ValueError, match="unknown aggregator"):
        robust_aggregate(honest, "trim")


def test_per_device_keys_and_signed_rounds(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """Each device holds only its own key (device_key(master, id)): the WebAssembly board (app.py, behind the
    gateway) gets its model signed with its key and both it and a Jetson take ROUND_START / ROUND_UPDATE only
    sealed with theirs. A stranger on the broker publishes the issue's forged ROUND_UPDATE (lr 10, gbar 1e6) on
    their down topics, unsigned and sealed with the master or the other device's key: every one is refused with
    ERROR(AUTH) and no device moves off the fleet's version."""
    from support.fleet_helpers import wasm_board

    from toolchain.deploy.emulators import wasm
    from toolchain.fleet import Error, MqttHost, RoundUpdate, Signer, device_key, seal
    from toolchain.fleet.gateway import Gateway

    if not wasm.available():
        pytest.skip("MicroPython WebAssembly not installed (npm ci)")
    master = b"fleet-master-key"
    fleet_name = "lab"
    mcfg = MqttConfig(port=mosquitto.port, fleet=fleet_name)
    m = make_model()
    idx = m.split(2)
    board = wasm_board(m, "wasm-1", idx[1], device_key(master, "wasm-1"))
    gw = Gateway([board.port], mcfg)
    jet = JetsonProcess(m, "jet-0", idx[0], tmp_path / "j0", f"127.0.0.1:{mosquitto.port}", fleet_name,
                        key=device_key(master, "jet-0"))
    spy = MqttHost(mcfg, client_id="spy", keep_history=True)  # a stranger: reads every up, writes any down
    spy.start()
    fleet = coord = None
    out = tmp_path / "coord"
    try:
        fleet = MqttFleet(mcfg)
        cfg = RoundConfig(rounds=3, k=8, lr=1.0, batch=32, min_devices=2, deadline_s=60, resend_s=3)
        coord = Coordinator(fleet, cfg, out, model=m.smf, progress=sys.stderr,
                            key_for=lambda d: device_key(master, d))
        c = coord
        assert not c.run(until=lambda: c.round == 2 and c._open, timeout=200), c.summary()
        sessions = {d: c.devices[d].session for d in ("jet-0", "wasm-1")}
        forged = RoundUpdate(2, 1, 10.0, (1e6,) * 8)
        for d, other in (("jet-0", "wasm-1"), ("wasm-1", "jet-0")):
            spy.send(d, forged)
            spy.send(d, seal(master, d, sessions[d] or 0, forged))
            spy.send(d, seal(device_key(master, other), d, sessions[d] or 0, forged))
        # (the second and third refusals are the same bytes: the spy's host-side dedupe shows them once)
        refused = spy.wait_until(lambda s: all(d in s and len({h for h in s[d].history if isinstance(h, Error)
                                                               and h.code == 8}) >= 2 for d in ("jet-0", "wasm-1")), 30)
        assert refused, "\n".join(f"{d}: {[h for h in spy.slots[d].history if not hasattr(h, 'scalars')]}"
                                   for d in ("jet-0", "wasm-1") if d in spy.slots)
        assert c.run(timeout=200), c.summary()
        rounds = read_rounds(out)
        assert all(sorted(r["devices"]) == ["jet-0", "wasm-1"] for r in rounds)
        losses = [r["loss"] for r in rounds]
        assert losses[-1] < losses[0] and max(losses) < 2 * losses[0], losses
        assert {d: c.devices[d].applied for d in ("jet-0", "wasm-1")} == {"jet-0": 3, "wasm-1": 3}
        assert c.devices["wasm-1"].transfer >= 1  # its model, signed with its own key
        # the model signed for jet-0's key is refused by wasm-1 (keys are per device)
        for msg in model_transfer_for(m.smf, Signer(hmac_key=device_key(master, "jet-0"))):
            spy.send("wasm-1", msg)
        assert spy.wait_until(lambda s: any(isinstance(h, Error) and (h.code, h.ref_type) == (8, 4)
                                            for h in s["wasm-1"].history), 30)
    finally:
        for obj in (coord, fleet):
            if obj is not None:
                obj.close()
        spy.stop()
        gw.close()
        board.close()
        jet.close()


def model_transfer_for(model: bytes, signer: object) -> list:
    from toolchain.fleet import model_transfer

    return model_transfer(model, 9, signer, chunk_size=64)  # type: ignore[arg-type]


def test_microbit_proxy_takes_signed_rounds_only(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """The QEMU micro:bit behind the raw-REPL proxy with its own key (gateway --device-keys): rounds sealed by the
    coordinator run on the board, a forged ROUND_UPDATE on its topic is refused (AUTH) before the board sees it."""
    from support.fleet_helpers import MicrobitDevice

    from toolchain.deploy.emulators import microbit
    from toolchain.fleet import Error, MqttHost, RoundUpdate, device_key

    if not microbit.available():
        pytest.skip("QEMU micro:bit not installed")
    master = b"fleet-master-key"
    mcfg = MqttConfig(port=mosquitto.port, fleet="mb")
    m = make_model()
    mb = MicrobitDevice(m, "microbit-1", m.split(3)[2][:16], mcfg, round_key=device_key(master, "microbit-1"))
    spy = MqttHost(mcfg, client_id="spy", keep_history=True)
    spy.start()
    fleet = coord = None
    try:
        fleet = MqttFleet(mcfg)
        cfg = RoundConfig(rounds=2, k=4, lr=1.0, batch=16, min_devices=1, deadline_s=120, resend_s=5)
        coord = Coordinator(fleet, cfg, tmp_path / "coord", progress=sys.stderr,
                            key_for=lambda d: device_key(master, d))
        c = coord
        assert not c.run(until=lambda: c.round == 2 and c._open, timeout=200), c.summary()
        spy.send("microbit-1", RoundUpdate(2, 1, 10.0, (1e6,) * 4))
        assert spy.wait_until(lambda s: "microbit-1" in s and any(
            isinstance(h, Error) and (h.code, h.ref_type) == (8, 0x12) for h in s["microbit-1"].history), 30)
        assert c.run(timeout=300), c.summary()
        assert [r["devices"] for r in read_rounds(tmp_path / "coord")] == [["microbit-1"]] * 2
        assert c.devices["microbit-1"].caps & 0x40 and c.devices["microbit-1"].applied == 2
    finally:
        for obj in (coord, fleet):
            if obj is not None:
                obj.close()
        spy.stop()
        mb.close()


def test_microbit_flash_checked_before_the_fine_tuner_loads(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001, F811
    """gateway --microbit-sums: the proxy hashes the micro:bit's flashed files (read back over the raw REPL) and
    refuses, in one line, a head.bin with a flipped byte; the intact one is served."""
    import hashlib

    from support.fleet_helpers import microbit_files

    from toolchain.contracts.errors import ToolchainError
    from toolchain.deploy.emulators import microbit
    from toolchain.deploy.emulators.microbit import QemuMicrobit
    from toolchain.deploy.repl import RawRepl
    from toolchain.fleet.repl_proxy import MicrobitProxy

    if not microbit.available():
        pytest.skip("QEMU micro:bit not installed")
    m = make_model()
    files = microbit_files(m, m.split(3)[2][:16])
    sums = {n: hashlib.sha256(files[n]).hexdigest() for n in ("head.bin", "spec.py")}
    bad = bytearray(files["head.bin"])
    bad[len(bad) // 2] ^= 0x01
    qemu = QemuMicrobit()
    try:
        time.sleep(0.5)
        repl = RawRepl(qemu.port, timeout=60)
        repl.enter_raw()
        for name, data in {**files, "head.bin": bytes(bad)}.items():
            repl.put_file(name, data)
        repl.close()
        cfg = MqttConfig(port=mosquitto.port, fleet="mb")
        with pytest.raises(ToolchainError, match="head.bin on the micro:bit .* does not match its SHA256SUMS"):
            MicrobitProxy(cfg, qemu.port, "mb-x", sums=sums)
        repl = RawRepl(qemu.port, timeout=60)
        repl.enter_raw()
        repl.put_file("head.bin", files["head.bin"])
        repl.close()
        proxy = MicrobitProxy(cfg, qemu.port, "mb-x", sums=sums)
        proxy.close()
    finally:
        qemu.stop()
