"""Protocol cost per device per round: bytes (serial framing and MQTT) for K in {1, 4, 16, 64}, and round-trip
latency host -> device -> host over a pty throttled to 115200 baud and over MQTT on loopback.

    .venv/bin/python bench/protocol_bytes.py   # writes bench/results/protocol.json and protocol.md
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, machine, parser, write_results
from support.mosquitto_fixture import Broker

from toolchain.fleet import (
    Frame,
    MqttConfig,
    MqttDevice,
    MqttHost,
    RoundResult,
    RoundStart,
    SerialLink,
    encode,
    encode_frame,
)
from toolchain.fleet.pty_relay import PtyRelay

KS = (1, 4, 16, 64)
BAUD_BYTES = 11520  # 115200 baud, 8N1
REPS = 15
ACK_FRAME = len(encode_frame(Frame(0, ack=True)))


def round_messages(k: int, explicit: bool) -> tuple[RoundStart, RoundResult]:
    start = (RoundStart(17, k, 1e-3, 0.01, 1, 8, seeds=tuple(range(1, k + 1))) if explicit
             else RoundStart(17, k, 1e-3, 0.01, 1, 8, round_seed=0xC0FFEE))
    return start, RoundResult(17, tuple(0.001 * i for i in range(k)), 2.3, 32)


def mqtt_publish_bytes(topic: str, payload: bytes) -> int:
    """MQTT 3.1.1 QoS 1 PUBLISH on one TCP leg plus its PUBACK (no TCP/IP headers)."""
    remaining = 2 + len(topic) + 2 + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + length_bytes + remaining + 4


def byte_table() -> list[dict]:
    cfg = MqttConfig(fleet="f1")
    rows = []
    for k in KS:
        for explicit in (False, True):
            start, result = round_messages(k, explicit)
            down, up = encode(start), encode(result)
            serial_down = len(encode_frame(Frame(1, down))) + ACK_FRAME  # frame to the device + its ack back
            serial_up = len(encode_frame(Frame(1, up))) + ACK_FRAME
            rows.append({
                "k": k, "seeds": "explicit" if explicit else "round seed",
                "message_down": len(down), "message_up": len(up), "result_payload": len(up) - 2,
                "serial_down": serial_down, "serial_up": serial_up, "serial_total": serial_down + serial_up,
                "mqtt_down": mqtt_publish_bytes(cfg.topic("dev-0001", "down"), down),
                "mqtt_up": mqtt_publish_bytes(cfg.topic("dev-0001", "up"), up),
            })
            rows[-1]["mqtt_total"] = rows[-1]["mqtt_down"] + rows[-1]["mqtt_up"]
            rows[-1]["serial_ms_at_115200"] = round(1000 * rows[-1]["serial_total"] / BAUD_BYTES, 2)
    return rows


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median_ms": round(1000 * statistics.median(s), 3), "p90_ms": round(1000 * s[int(0.9 * (len(s) - 1))], 3),
            "min_ms": round(1000 * s[0], 3), "n": len(s)}


def serial_latency() -> dict:
    out = {}
    with PtyRelay(rate=BAUD_BYTES) as relay:
        host = SerialLink.open(relay.a_path, ack_timeout=0.5)
        dev = SerialLink.open(relay.b_path, ack_timeout=0.5)
        stop = threading.Event()

        def device() -> None:  # answers every ROUND_START at once: the latency is the protocol's alone
            while not stop.is_set():
                msg = dev.recv_message(0.1)
                if isinstance(msg, RoundStart):
                    dev.send_message(round_messages(msg.k, False)[1])

        t = threading.Thread(target=device, daemon=True)
        t.start()
        for k in KS:
            samples = []
            for _ in range(REPS):
                start = time.perf_counter()
                host.send_message(round_messages(k, False)[0])
                assert isinstance(host.recv_message(10), RoundResult)
                samples.append(time.perf_counter() - start)
            out[str(k)] = summarize(samples)
        stop.set()
        t.join()
        out["retransmits"] = host.stats.retransmits + dev.stats.retransmits
        host.close()
        dev.close()
    return out


def mqtt_latency() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        try:
            cfg = MqttConfig(port=broker.port, fleet="bench")
            host, dev = MqttHost(cfg), MqttDevice(cfg, "dev-0001")
            host.start()
            dev.start()
            stop = threading.Event()

            def device() -> None:
                while not stop.is_set():
                    msg = dev.recv(0.1)
                    if isinstance(msg, RoundStart):
                        dev.send(RoundResult(msg.round_id, tuple(0.001 * i for i in range(msg.k)), 2.3, 32))

            t = threading.Thread(target=device, daemon=True)
            t.start()
            rid = 0
            for k in KS:
                samples = []
                for _ in range(REPS * 4):
                    rid += 1  # distinct ids: identical payloads inside the dedupe window would be dropped
                    start = time.perf_counter()
                    host.send("dev-0001", RoundStart(rid, k, 1e-3, 0.01, 1, 8, round_seed=rid))
                    item = host.recv(10)
                    assert item is not None and isinstance(item[1], RoundResult) and item[1].round_id == rid
                    samples.append(time.perf_counter() - start)
                out[str(k)] = summarize(samples)
            stop.set()
            t.join()
            dev.stop()
            host.stop()
        finally:
            broker.stop()
    return out


def mosquitto_version() -> str:
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    return mosq[0] if mosq else ""


def to_markdown(res: dict) -> str:
    lines = ["# Protocol cost per device per round", "",
             f"Machine: {res['machine']['cpu']} ({res['machine']['cpus']} CPUs), {res['machine']['platform']}, "
             f"Python {res['machine']['python']}, {res['machine']['mosquitto']}. Wall time {res['wall_s']} s, "
             f"{res['date']}.", "",
             "Bytes: serial = framed ROUND_START + its 9-byte ACK frame, plus framed ROUND_RESULT + ACK; MQTT = one QoS 1 "
             "PUBLISH + PUBACK on the device's broker leg, topic `tinyml/f1/dev-0001/{down,up}`, no TCP/IP headers.", "",
             "| K | seeds | msg down | msg up | result payload | serial down+up | ms @115200 | MQTT down+up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["bytes"]:
        lines.append(f"| {r['k']} | {r['seeds']} | {r['message_down']} | {r['message_up']} | {r['result_payload']} | "
                     f"{r['serial_total']} | {r['serial_ms_at_115200']} | {r['mqtt_total']} |")
    lines += ["", "Round trip host -> device -> host (ROUND_START with a round seed, immediate ROUND_RESULT; "
              "the device is a Python SerialLink / MqttDevice, so this is protocol + transport time only):", "",
              "| K | pty @11520 B/s median ms | p90 ms | MQTT loopback median ms | p90 ms |", "|---|---|---|---|---|"]
    for k in KS:
        s, m = res["latency_serial"][str(k)], res["latency_mqtt"][str(k)]
        lines.append(f"| {k} | {s['median_ms']} | {s['p90_ms']} | {m['median_ms']} | {m['p90_ms']} |")
    lines += ["", f"Serial retransmissions during the run: {res['latency_serial']['retransmits']}. MQTT: broker config of "
              "tests/support/mosquitto_fixture.py (`set_tcp_nodelay true`) and TCP_NODELAY on the clients; without both, "
              "every QoS 1 hop waits for a delayed ACK (88 ms round trip measured).", ""]
    return "\n".join(lines)


def main() -> None:
    parser(__doc__).parse_args()
    t0 = time.time()
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine("platform", "python", "cpu", "cpus", mosquitto=mosquitto_version()), "bytes": byte_table(),
           "latency_serial": serial_latency(), "latency_mqtt": mqtt_latency()}
    res["wall_s"] = round(time.time() - t0, 2)
    write_results(RESULTS / "protocol", res, to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
