"""``toolchain serve`` / ``toolchain gateway``: federated ZO rounds over real devices (docs/fleet.md)."""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.wire.messages import (
    MAX_K,
    STATE_NAMES,
    U30,
    Error,
    Hello,
    RoundResult,
    RoundStart,
    RoundUpdate,
    Status,
    decode,
    describe,
)
from toolchain.contracts.wire.security import RoundLimits, device_key
from toolchain.deploy.flash_board import check_port
from toolchain.fleet import LinkError, MqttConfig, Signer
from toolchain.fleet.coordinator import Coordinator, RoundConfig, read_rounds
from toolchain.fleet.gateway import Gateway
from toolchain.fleet.mqtt_link import MqttHost
from toolchain.fleet.repl_proxy import MicrobitProxy
from toolchain.fleet.transports import MqttFleet, SerialFleet


@dataclass
class ServeOptions:
    transport: str  # serial | mqtt
    out: Path
    ports: list[str] = field(default_factory=list)
    broker: str = "127.0.0.1:1883"
    fleet: str = "default"
    prefix: str = "tinyml"
    baud: int = 115200
    rounds: int = 10
    k: int = 8
    mu: float = 1e-3
    lr: float = 0.5
    schedule: str = "constant"
    batch: int = 32
    per_round: float = 1.0
    min_results: int = 1
    min_devices: int = 1
    deadline: float = 60.0
    seed: int = 2024
    model: Path | None = None  # model.smf sent (HMAC-signed) to devices that lack it
    model_id: int = 1
    hmac_key: Path | None = None
    timeout: float | None = None
    aggregator: str = "clip"  # server step: clip | median | mean (docs/fleet.md "Only what was asked counts")
    clip: float = 3.0
    max_devices: int = 256
    auth: dict = field(default_factory=dict)  # MqttConfig username / password / tls (mqtt_link.auth_from_args)
    per_device_keys: bool = False  # --hmac-key is the master: each device's key is security.device_key(master, id)


def broker_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ToolchainError(f"--broker expects HOST:PORT (port 1..65535), got '{text}'")
    return host or "127.0.0.1", int(port)


def check_topic_level(name: str, what: str) -> None:
    """A fleet name or topic prefix is one MQTT topic level: wildcards or '/' would subscribe to (or publish on)
    other fleets' topics."""
    if not name or len(name) > 64 or not name.isascii() or not name.isprintable() or set(name) & set("/+#$ "):
        raise ToolchainError(f"{what} '{name}' must be 1..64 printable ASCII characters without '/', '+', '#', '$' "
                             "or spaces (it is one MQTT topic level)")


def _finite(name: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi):
        raise ToolchainError(f"{name} {v:g} is out of range: use {'(' if lo_open else '['}{lo:g}, {hi:g}]")


def _int(name: str, v: int, lo: int, hi: int) -> None:
    if not lo <= v <= hi:
        raise ToolchainError(f"{name} {v} is out of range: use {lo}..{hi}")


def _readable(name: str, path: Path, limit: int) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ToolchainError(f"cannot read {name} {path}: {exc.strerror or exc}") from None
    if not data or len(data) > limit:
        raise ToolchainError(f"{name} {path} is {len(data)} bytes; expected 1..{limit}")
    return data


def check_serve_options(opts: ServeOptions) -> tuple[bytes | None, bytes | None]:
    """Every option checked before anything is opened or sent: one-line errors, never a round that cannot run.
    The round parameters must be what devices accept (``RoundLimits``: out of range, every device would answer
    ERROR(RANGE) and serve would re-ask until --timeout). Returns the model and HMAC key bytes."""

    lim = RoundLimits()
    _int("--rounds", opts.rounds, 1, U30 - 1)
    _int("--k", opts.k, 1, MAX_K)
    _finite("--mu", opts.mu, lim.mu_min, lim.mu_max)
    _finite("--lr", opts.lr, 0.0, lim.lr_max, lo_open=True)
    _int("--batch", opts.batch, 1, lim.max_batch)
    _finite("--per-round", opts.per_round, 0.0, 1.0, lo_open=True)
    _int("--min-results", opts.min_results, 1, 1 << 16)
    _int("--min-devices", opts.min_devices, 1, 1 << 16)
    _finite("--deadline", opts.deadline, 0.0, 1e7, lo_open=True)
    _int("--seed", opts.seed, 0, (1 << 32) - 1)
    _int("--model-id", opts.model_id, 1, U30 - 1)
    _int("--baud", opts.baud, 50, 10_000_000)
    _finite("--clip", opts.clip, 0.0, 1e6, lo_open=True)
    _int("--max-devices", opts.max_devices, 1, 1 << 20)
    if opts.timeout is not None:
        _finite("--timeout", opts.timeout, 0.0, 1e9, lo_open=True)
    if opts.aggregator not in ("clip", "median", "mean"):
        raise ToolchainError(f"--aggregator '{opts.aggregator}': use clip, median or mean")
    if opts.transport == "serial":

        if not opts.ports:
            raise ToolchainError("--transport serial needs at least one --port")
        for p in opts.ports:
            check_port(p)
        if len(set(opts.ports)) != len(opts.ports):
            raise ToolchainError("a serial port is given twice")
    elif opts.transport == "mqtt":
        broker_address(opts.broker)
        check_topic_level(opts.fleet, "--fleet")
        check_topic_level(opts.prefix, "--prefix")
    else:
        raise ToolchainError(f"unknown transport '{opts.transport}'; use serial or mqtt")
    model = _readable("--model", opts.model, 1 << 24) if opts.model else None
    key = _readable("--hmac-key", opts.hmac_key, 4096).strip() if opts.hmac_key else None
    if opts.hmac_key and not key:
        raise ToolchainError(f"--hmac-key {opts.hmac_key} holds only white space")
    if model is not None and key is None:
        raise ToolchainError("--model needs --hmac-key (devices never accept an unsigned model)")
    if opts.per_device_keys and key is None:
        raise ToolchainError("--per-device-keys needs --hmac-key (the fleet's master key)")
    return model, key


def open_fleet(transport: str, ports: list[str], baud: int = 115200, broker: str = "127.0.0.1:1883",
               prefix: str = "tinyml", fleet: str = "default", auth: dict | None = None) -> SerialFleet | MqttFleet:
    """The devices' transport, ``serial`` (the ports) or ``mqtt`` (a broker's fleet); a port or broker that cannot
    be opened is one ToolchainError line. ``toolchain serve`` and the Flower fleet node open their fleet here."""
    if transport == "serial":
        try:
            return SerialFleet(ports, baudrate=baud)
        except Exception as exc:  # noqa: BLE001 - SerialException, OSError, termios.error: one line for the user
            why = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise ToolchainError(f"cannot open {', '.join(ports)}: {why}; "
                                 "check the port and close other programs using it") from None
    else:
        host, port = broker_address(broker)
        try:
            return MqttFleet(MqttConfig(host, port, prefix=prefix, fleet=fleet, **(auth or {})))
        except Exception as exc:  # noqa: BLE001 - LinkError, OSError: one line for the user
            raise ToolchainError(f"cannot reach the MQTT broker at {broker}: {exc}; start mosquitto or fix "
                                 "--broker") from None


def serve(opts: ServeOptions) -> dict:
    """Run the coordinator until every round is closed; resumes from ``opts.out`` (its write-ahead log)."""

    model, key = check_serve_options(opts)
    signer = Signer(hmac_key=key) if key is not None else None
    fleet = open_fleet(opts.transport, opts.ports, opts.baud, opts.broker, opts.prefix, opts.fleet, opts.auth)
    cfg = RoundConfig(rounds=opts.rounds, k=opts.k, mu=opts.mu, lr=opts.lr, schedule=opts.schedule, batch=opts.batch,
                      master_seed=opts.seed, per_round=opts.per_round, min_results=opts.min_results,
                      min_devices=opts.min_devices, deadline_s=opts.deadline, model_id=opts.model_id,
                      aggregator=opts.aggregator, clip=opts.clip, max_devices=opts.max_devices)
    key_for = None
    if opts.per_device_keys:

        master = key
        key_for = (lambda d: device_key(master, d)) if master is not None else None  # noqa: E731
    coord = Coordinator(fleet, cfg, opts.out, model=model, signer=None if key_for else signer, progress=sys.stderr,
                        key_for=key_for)
    t0 = time.monotonic()
    try:
        done = coord.run(timeout=opts.timeout)
        unacked = coord.unsynced()
    finally:
        coord.close()
        fleet.close()
    if coord.fatal:
        raise ToolchainError(coord.fatal)
    rounds = read_rounds(opts.out)
    return {"done": done, "rounds": len(rounds), "loss": [r["loss"] for r in rounds],
            "wall_s": round(time.monotonic() - t0, 1), "duplicates": coord.duplicates, "late": len(coord.late),
            "rejected": len(coord.rejected), "unacked": unacked}


def gateway(ports: list[str], broker: str, fleet: str = "default", prefix: str = "tinyml", baud: int = 115200,
            seconds: float | None = None, microbits: list[tuple[str, str | None]] | None = None, model_id: int = 1,
            heartbeat: float = 30.0, auth: dict | None = None, device_keys: Path | None = None,
            microbit_sums: Path | None = None) -> int:
    """Bridge serial boards (app.py) and micro:bits (raw-REPL proxy) onto the MQTT fleet until interrupted."""

    microbits = microbits or []
    if not ports and not microbits:
        raise ToolchainError("gateway needs at least one --port (a board running app.py) or --microbit PORT")
    host, port = broker_address(broker)
    check_topic_level(fleet, "--fleet")
    check_topic_level(prefix, "--prefix")
    _int("--baud", baud, 50, 10_000_000)
    _int("--model-id", model_id, 1, (1 << 30) - 1)
    _finite("--heartbeat", heartbeat, 0.0, 1e6, lo_open=True)
    key_for = None
    if device_keys is not None:
        if not device_keys.is_dir():
            raise ToolchainError(f"--device-keys {device_keys} is not a folder (one <device id>.key file, hex, each)")

        def key_for(dev: str) -> bytes:
            path = device_keys / f"{dev}.key"
            try:
                return bytes.fromhex(path.read_text().strip())
            except (OSError, ValueError) as exc:
                raise ToolchainError(f"cannot use {path} (the micro:bit {dev}'s key, hex): {exc}") from None
    sums = None
    if microbit_sums is not None:
        try:
            lines = microbit_sums.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolchainError(f"cannot read --microbit-sums {microbit_sums}: {exc}") from None
        sums = {ln.split()[1].lstrip("*"): ln.split()[0] for ln in lines if len(ln.split()) == 2}
        if not sums or not all(len(h) == 64 for h in sums.values()):
            raise ToolchainError(f"--microbit-sums {microbit_sums} is not a sha256sum file ('<hex>  <name>' lines)")
    every = [*ports, *(p for p, _ in microbits)]
    for p in every:
        check_port(p)
    if len(set(every)) != len(every):
        raise ToolchainError("a serial port is given twice; each board goes with one --port or --microbit")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ToolchainError(f"cannot reach the MQTT broker at {broker}: {exc}; start mosquitto or fix --broker") from None

    def log(m: str) -> None:
        print(f"[gateway] {m}", file=sys.stderr, flush=True)

    cfg = MqttConfig(host, port, prefix=prefix, fleet=fleet, **(auth or {}))
    if auth and auth.get("username"):  # a wrong password or an untrusted broker: one line now, not per board later

        probe = MqttHost(cfg, client_id=f"gateway-check-{os.getpid()}")
        try:
            probe.start(timeout=10)
        except Exception as exc:  # noqa: BLE001 - LinkError, ssl.SSLError, OSError
            raise ToolchainError(f"the MQTT broker at {broker} refuses the gateway: "
                                 f"{str(exc).splitlines()[0]}") from None
        probe.client.disconnect()
        probe.client.loop_stop()
    gw: Gateway | None = None
    proxies: list[MicrobitProxy] = []
    try:
        if ports:
            try:
                gw = Gateway(ports, cfg, baudrate=baud, log=log)
            except (LinkError, OSError) as exc:
                raise ToolchainError(f"cannot open {', '.join(ports)}: {str(exc).splitlines()[0]}; close other "
                                     "programs using the port") from None
        for p, dev in microbits:
            log(f"{p}: starting the micro:bit proxy (identify, files, fine-tuner import)")
            proxies.append(MicrobitProxy(cfg, p, dev, model_id=model_id, heartbeat_s=heartbeat, log=log,
                                         key_for=key_for, sums=sums))
        t0 = time.monotonic()
        while seconds is None or time.monotonic() - t0 < seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for proxy in proxies:
            proxy.close()
        if gw is not None:
            gw.close()
    return 0


def fleet_status(broker: str, fleet: str, prefix: str = "tinyml", seconds: float = 3.0, follow: bool = False,
                 auth: dict | None = None, out: TextIO | None = None) -> int:
    """``toolchain fleet-status``: the fleet's topics for people. Listens ``seconds`` (retained STATUS arrive at
    once) and prints one line per device: online or not, state, model and version, uptime, the last round it
    answered and its loss, its last error; with ``follow``, every message as it comes (``mosquitto_sub -F '%t %x'``
    decoded). A clean session with a random client id: it leaves nothing queued on the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    out = out or sys.stdout  # (at call time: a default bound at import would keep a replaced stdout)
    host, port = broker_address(broker)
    check_topic_level(fleet, "--fleet")
    check_topic_level(prefix, "--prefix")
    _finite("--seconds", seconds, 0.0, 1e9, lo_open=True)
    rows: dict[str, dict] = {}
    lock = threading.Lock()
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
        if getattr(rc, "is_failure", False):
            refused.append(str(rc))
            return
        c.subscribe([(f"{prefix}/{fleet}/+/{leaf}", 1) for leaf in ("up", "status", "down")])
        connected.set()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        parts = m.topic.split("/")
        if len(parts) != 4:
            return
        dev, leaf = parts[2], parts[3]
        try:
            msg = decode(m.payload)
            text = describe(msg)
        except Exception as exc:  # noqa: BLE001 - anything on the broker is untrusted: shown, never fatal
            msg, text = None, f"undecodable {bytes(m.payload[:24]).hex()} ({exc})"
        with lock:
            if follow:
                print(f"{time.strftime('%H:%M:%S')} {m.topic} {text}", file=out, flush=True)
            if len(rows) >= 4096 and dev not in rows:
                return  # (an id flood: the table stays bounded)
            r = rows.setdefault(dev, {"online": None, "state": "?", "model": "?", "version": "?", "uptime": "?",
                                      "board": "", "result": "", "asked": "", "error": "", "last": ""})
            r["last"] = f"{leaf}: {text}"
            if isinstance(msg, Status):
                r.update(online=msg.state != 0, state=STATE_NAMES.get(msg.state, str(msg.state)),
                         model=msg.model_id, version=msg.round_id, uptime=f"{msg.uptime_s}s")
            elif isinstance(msg, Hello) and leaf == "up":
                r.update(online=True, board=f"{msg.board} ({msg.firmware})")
            elif isinstance(msg, RoundResult):
                r["result"] = f"round {msg.round_id} loss {msg.loss:.4f} n {msg.n_samples}"
            elif isinstance(msg, RoundStart | RoundUpdate) or (msg is not None and msg.TYPE == 0x13):
                r["asked"] = text
            elif isinstance(msg, Error):
                r["error"] = text

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-status-{os.getpid()}", clean_session=True,
                    protocol=mqtt.MQTTv311)
    if auth and auth.get("username"):
        c.username_pw_set(auth["username"], auth.get("password"))
    if auth and auth.get("tls") is not None:
        import ssl

        t = auth["tls"]
        c.tls_set(ca_certs=t.ca_certs, certfile=t.certfile, keyfile=t.keyfile, cert_reqs=ssl.CERT_REQUIRED)
    c.on_connect, c.on_message = on_connect, on_message
    try:
        c.connect(host, port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise ToolchainError(f"cannot reach the MQTT broker at {broker}: {exc}; start mosquitto or fix "
                             "--broker") from None
    c.loop_start()
    try:
        t0 = time.monotonic()
        while not connected.is_set() and not refused and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        if not connected.is_set():
            why = refused[0] if refused else "no answer"
            raise ToolchainError(f"the MQTT broker at {broker} refused fleet-status: {why}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        c.disconnect()
        c.loop_stop()
    with lock:
        if not follow or rows:
            print(f"fleet {prefix}/{fleet}: {len(rows)} device(s) seen in {seconds:g} s", file=out)
        for dev in sorted(rows):
            r = rows[dev]
            online = {True: "online", False: "OFFLINE", None: "?"}[r["online"]]
            line = (f"{dev:<20} {online:<7} {r['state']:<8} model {r['model']} version {r['version']} "
                    f"up {r['uptime']}")
            for key, label in (("result", "last result"), ("asked", "last asked"), ("error", "last error"),
                               ("board", "board")):
                if r[key]:
                    line += f"; {label}: {r[key]}"
            print(line, file=out)
    return 0
