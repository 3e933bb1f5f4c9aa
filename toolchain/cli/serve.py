"""``toolchain serve``, ``gateway`` and ``fleet-status``: the fleet on real or emulated devices (docs/fleet.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolchain.contracts.errors import ToolchainError
from toolchain.fleet.mqtt_link import add_auth_args, auth_from_args
from toolchain.learning.options import fraction
from toolchain.pipelines.serve import ServeOptions, fleet_status, gateway, serve


def microbit_arg(text: str) -> tuple[str, str | None]:
    """``--microbit PORT[=DEVICE]`` -> (port, device id or None)."""
    port, sep, dev = text.partition("=")
    if not port or (sep and not dev):
        raise ToolchainError(f"--microbit expects PORT or PORT=DEVICE_ID, got '{text}'")
    return port, dev or None


def _auth(args: argparse.Namespace) -> dict:
    """The broker credentials and TLS of the command line (``--mqtt-*``, ``--tls-*``) or the environment."""
    try:
        return auth_from_args(args)
    except ValueError as exc:
        raise ToolchainError(str(exc)) from None


def cmd_fleet_status(args: argparse.Namespace) -> int:
    return fleet_status(args.broker, args.fleet, args.prefix, args.seconds, args.follow, auth=_auth(args))


def cmd_serve(args: argparse.Namespace) -> int:
    opts = ServeOptions(transport=args.transport, out=Path(args.out), ports=args.port or [], broker=args.broker,
                        fleet=args.fleet, baud=args.baud, rounds=args.rounds, k=args.k, mu=args.mu, lr=args.lr,
                        schedule=args.schedule, batch=args.batch, per_round=args.per_round,
                        min_results=args.min_results, min_devices=args.min_devices, deadline=args.deadline,
                        seed=args.seed, model=Path(args.model) if args.model else None, model_id=args.model_id,
                        hmac_key=Path(args.hmac_key) if args.hmac_key else None, timeout=args.timeout,
                        aggregator=args.aggregator, clip=args.clip, max_devices=args.max_devices, auth=_auth(args),
                        per_device_keys=args.per_device_keys)
    result = serve(opts)
    print(json.dumps(result))
    return 0 if result["done"] else 1


def cmd_gateway(args: argparse.Namespace) -> int:
    return gateway(args.port or [], args.broker, args.fleet, baud=args.baud, seconds=args.seconds,
                   microbits=[microbit_arg(m) for m in args.microbit or []], model_id=args.model_id,
                   heartbeat=args.heartbeat, auth=_auth(args),
                   device_keys=Path(args.device_keys) if args.device_keys else None,
                   microbit_sums=Path(args.microbit_sums) if args.microbit_sums else None)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``serve``, ``gateway`` and ``fleet-status``."""
    p = sub.add_parser("serve", help="coordinate federated ZO rounds on real devices (docs/fleet.md)")
    p.add_argument("--transport", choices=["serial", "mqtt"], required=True)
    p.add_argument("--port", action="append", help="serial port of a board (repeatable; --transport serial)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST:PORT (--transport mqtt)")
    p.add_argument("--fleet", default="default", help="MQTT fleet name (topic level)")
    p.add_argument("--baud", type=int, default=115200)
    p.add_argument("--out", default="fleet-run", help="folder for rounds.jsonl and the write-ahead log (resumes)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--k", type=int, default=8, help="perturbations per round")
    p.add_argument("--mu", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--schedule", choices=["constant", "cosine", "exponential"], default="constant")
    p.add_argument("--batch", type=int, default=32, help="samples per device and round")
    p.add_argument("--per-round", type=fraction, default=1.0, help="fraction of ready devices asked per round")
    p.add_argument("--min-results", type=int, default=1, help="results needed to close a round at its deadline")
    p.add_argument("--min-devices", type=int, default=1, help="ready devices to wait for before a round")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds before stragglers are left out")
    p.add_argument("--seed", type=int, default=2024, help="master seed of the round seeds")
    p.add_argument("--model", default=None, help="model.smf to install on devices that lack it (HMAC-signed)")
    p.add_argument("--model-id", type=int, default=1)
    p.add_argument("--hmac-key", default=None,
                   help="file with the devices' HMAC key (with --per-device-keys: the master the device keys "
                        "derive from)")
    p.add_argument("--per-device-keys", action="store_true",
                   help="each device holds its own key, device_key(master, id): models and rounds are signed per "
                        "device")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds (resume later)")
    p.add_argument("--aggregator", choices=["clip", "median", "mean"], default="clip",
                   help="server step: clip each update to --clip x the round's lower median norm (default), "
                        "coordinate-wise median, or the plain n-weighted mean")
    p.add_argument("--clip", type=float, default=3.0, help="clip factor of --aggregator clip")
    p.add_argument("--max-devices", type=int, default=256, help="device ids tracked at most (an id flood)")
    add_auth_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("gateway", help="bridge serial boards and micro:bits onto an MQTT fleet (docs/fleet.md)")
    p.add_argument("--port", action="append", help="serial port of a board running app.py (repeatable)")
    p.add_argument("--microbit", action="append", metavar="PORT[=DEVICE]",
                   help="serial port of a micro:bit v1 holding the fine-tuner files, served through the raw-REPL "
                        "proxy (repeatable; device id default: microbit-<its unique id>)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST:PORT")
    p.add_argument("--fleet", default="default")
    p.add_argument("--baud", type=int, default=115200)
    p.add_argument("--model-id", type=int, default=1, help="id of the model flashed on the micro:bits")
    p.add_argument("--heartbeat", type=float, default=30.0, help="micro:bit STATUS heartbeat, seconds")
    p.add_argument("--device-keys", default=None,
                   help="folder of <device id>.key files (hex): the micro:bits' own keys; the proxy then takes their "
                        "rounds only signed (boards running app.py hold their key themselves)")
    p.add_argument("--microbit-sums", default=None,
                   help="SHA256SUMS of the micro:bits' flashed files (zo.py, ft.py, spec.py, head.bin, ...): checked "
                        "before the fine-tuner is loaded")
    p.add_argument("--seconds", type=float, default=None, help="run this long (default: until Ctrl-C)")
    add_auth_args(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("fleet-status", help="decode a fleet's MQTT topics: who is online, which round, last loss")
    p.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST:PORT")
    p.add_argument("--fleet", default="default")
    p.add_argument("--prefix", default="tinyml")
    p.add_argument("--seconds", type=float, default=3.0, help="listen this long, then print the table")
    p.add_argument("--follow", action="store_true", help="also print every message as it arrives, decoded")
    add_auth_args(p)
    p.set_defaults(func=cmd_fleet_status)
