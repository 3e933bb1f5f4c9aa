"""Fleet round costs with the real fleet pieces (docs/fleet.md): bytes per device per round and round latency.

* serial: coordinator (SerialFleet) <-> pty throttled to 115200 baud (11520 B/s) <-> MicroPython 1.29 WebAssembly
  boards running device_runtime/micropython/app.py;
* mqtt: coordinator (MqttFleet) <-> mosquitto (loopback) <-> Jetson agents (JetsonFineTuner, own processes) and
  the WebAssembly board through the gateway.

Bytes are counted after the model transfer (from round 2 on): protocol message bytes (what MQTT carries), and on
serial also the bytes on the wire (COBS framing, CRC, acks, retransmissions). The raw link's own costs are in
bench/results/protocol.md (bench/protocol_bytes.py). Writes bench/results/fleet_rounds.json + .md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, parser, write_results
from support.fleet_helpers import JetsonProcess, wasm_board
from support.fleet_model import make_model
from support.mosquitto_fixture import Broker

from toolchain.fleet import MqttConfig, Signer
from toolchain.fleet.coordinator import Coordinator, RoundConfig, read_rounds
from toolchain.fleet.gateway import Gateway
from toolchain.fleet.transports import MqttFleet, SerialFleet

KEY = b"bench-key"
ROUNDS = 6
K = 8


def _per_round(before: dict[str, int], after: dict[str, int], rounds: int) -> dict[str, float]:
    return {d: round((after.get(d, 0) - before.get(d, 0)) / rounds, 1) for d in after}


def run_serial(tmp: Path, n_boards: int = 2) -> dict:
    m = make_model()
    idx = m.split(n_boards)
    boards = [wasm_board(m, f"wasm-{i}", idx[i], KEY, rate=11520) for i in range(n_boards)]
    fleet = SerialFleet([b.port for b in boards])
    try:
        cfg = RoundConfig(rounds=ROUNDS, k=K, lr=1.0, batch=32, min_devices=n_boards, deadline_s=120)
        coord = Coordinator(fleet, cfg, tmp / "serial", model=m.smf, signer=Signer(hmac_key=KEY), progress=None)
        assert not coord.run(until=lambda: coord.round > 1, timeout=600)
        down0, up0 = dict(fleet.stats.bytes_down), dict(fleet.stats.bytes_up)
        wire0 = fleet.link_stats()
        assert coord.run(timeout=900)
        wire1 = fleet.link_stats()
        coord.close()
        n = ROUNDS - 1
        ports = {b.port: f"wasm-{i}" for i, b in enumerate(boards)}
        return {
            "devices": n_boards, "rounds_measured": n,
            "message_bytes_down_per_round": _per_round(down0, fleet.stats.bytes_down, n),
            "message_bytes_up_per_round": _per_round(up0, fleet.stats.bytes_up, n),
            "wire_bytes_host_to_device_per_round": {ports[p]: round((wire1[p]["bytes_out"] - wire0[p]["bytes_out"]) / n, 1)
                                                    for p in wire1},
            "wire_bytes_device_to_host_per_round": {ports[p]: round((wire1[p]["bytes_in"] - wire0[p]["bytes_in"]) / n, 1)
                                                    for p in wire1},
            "round_latency_s": [r["duration_s"] for r in read_rounds(tmp / "serial")][1:],
            "loss": [r["loss"] for r in read_rounds(tmp / "serial")],
        }
    finally:
        fleet.close()
        for b in boards:
            b.close()


def run_mqtt(tmp: Path, n_jetsons: int = 2) -> dict:
    m = make_model()
    idx = m.split(n_jetsons + 1)
    broker = Broker(tmp / "broker")
    broker.start()
    cfg_m = MqttConfig(port=broker.port, fleet="bench")
    board = wasm_board(m, "wasm-0", idx[0], KEY)
    gw = Gateway([board.port], cfg_m)
    jets = [JetsonProcess(m, f"jetson-{i}", idx[i + 1], tmp / f"j{i}", f"127.0.0.1:{broker.port}", "bench")
            for i in range(n_jetsons)]
    fleet = MqttFleet(cfg_m)
    try:
        cfg = RoundConfig(rounds=ROUNDS, k=K, lr=1.0, batch=32, min_devices=n_jetsons + 1, deadline_s=120)
        coord = Coordinator(fleet, cfg, tmp / "mqtt", model=m.smf, signer=Signer(hmac_key=KEY), progress=None)
        assert not coord.run(until=lambda: coord.round > 1, timeout=600)
        down0, up0 = dict(fleet.stats.bytes_down), dict(fleet.stats.bytes_up)
        assert coord.run(timeout=900)
        coord.close()
        n = ROUNDS - 1
        return {
            "devices": n_jetsons + 1, "rounds_measured": n,
            "message_bytes_down_per_round": _per_round(down0, fleet.stats.bytes_down, n),
            "message_bytes_up_per_round": _per_round(up0, fleet.stats.bytes_up, n),
            "round_latency_s": [r["duration_s"] for r in read_rounds(tmp / "mqtt")][1:],
            "loss": [r["loss"] for r in read_rounds(tmp / "mqtt")],
        }
    finally:
        fleet.close()
        gw.close()
        for j in jets:
            j.close()
        board.close()
        broker.stop()


def main() -> int:
    parser(__doc__).parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res = {"serial_115200": run_serial(tmp), "mqtt_loopback": run_mqtt(tmp)}
    res["k"] = K
    res["expected_message_bytes"] = {"ROUND_START": 25, "ROUND_RESULT": 14 + 4 * K, "ROUND_UPDATE": 14 + 4 * K,
                                     "ACK": 7}
    res["machine"] = machine("platform", "python", "processor")
    res["wall_s"] = round(time.time() - t0, 1)
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = ["# Fleet rounds: bytes per device per round, round latency", "",
             f"{res['date']}, {res['machine']['platform']}, Python {res['machine']['python']}; wall time "
             f"{res['wall_s']} s (shared, heavily loaded 2-core machine: latencies are upper bounds). K = {K}, "
             f"{ROUNDS} rounds, bytes from round 2 on (after the model transfer).", "",
             "| transport | device | message bytes down / round | message bytes up / round | wire bytes down / round "
             "| wire bytes up / round |", "|---|---|---|---|---|---|"]
    s = res["serial_115200"]
    for d in sorted(s["message_bytes_down_per_round"]):
        lines.append(f"| serial 115200 (WebAssembly app.py) | {d} | {s['message_bytes_down_per_round'][d]} | "
                     f"{s['message_bytes_up_per_round'].get(d, 0)} | {s['wire_bytes_host_to_device_per_round'].get(d)} "
                     f"| {s['wire_bytes_device_to_host_per_round'].get(d)} |")
    q = res["mqtt_loopback"]
    for d in sorted(q["message_bytes_down_per_round"]):
        lines.append(f"| MQTT loopback | {d} | {q['message_bytes_down_per_round'][d]} | "
                     f"{q['message_bytes_up_per_round'].get(d, 0)} | - | - |")
    lines += ["", "| transport | round latency median (s) | min | max | loss first -> last |", "|---|---|---|---|---|"]
    for name, r in (("serial 115200", s), ("MQTT loopback", q)):
        lat = r["round_latency_s"]
        lines.append(f"| {name} | {statistics.median(lat):.2f} | {min(lat):.2f} | {max(lat):.2f} | "
                     f"{r['loss'][0]:.3f} -> {r['loss'][-1]:.3f} |")
    lines += ["", "Expected message sizes (docs/protocol.md, docs/fleet.md): ROUND_START 25 B, ROUND_RESULT and "
              f"ROUND_UPDATE 14 + 4K = {14 + 4 * K} B, ACK 7 B; STATUS heartbeats and PINGs come on top. "
              "Round latency is from ROUND_START to the close (slowest participant)."]
    write_results(RESULTS / "fleet_rounds", res, "\n".join(lines) + "\n", indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
