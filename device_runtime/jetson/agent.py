"""Jetson fleet agent (docs/fleet.md): ``JetsonFineTuner`` as an MQTT fleet device (``firmware_bridge.device_agent``).

    python -m device_runtime.jetson.agent --broker 127.0.0.1:1883 --device jetson-1 --bundle DIR --local DIR
    ./run_agent.sh --broker 127.0.0.1:1883 --device jetson-1 --local DIR     # from a Jetson bundle folder

``--bundle``: ``model.onnx`` + ``config.json`` (the on-device bundle; default: the folder of this file when it is
a bundle); ``--local``: the device's own data,
``local.json`` (``{"device", "n", "size", "labels", "model_id"}``) + ``data.bin`` (n x size int8 inputs).
New models arrive as ONNX with an Ed25519 signature (``--ed25519-public``); unsigned ones are rejected.
The bundle carries the ``firmware_bridge`` modules imported here (docs/jetson.md "Running the agent from the bundle").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from firmware_bridge.device_agent import Agent
from firmware_bridge.errors import LinkError
from firmware_bridge.messages import CAP_ED25519, CAP_FMT_ONNX, CAP_SHA256
from firmware_bridge.mqtt_link import MqttConfig, add_auth_args, auth_from_args
from firmware_bridge.security import Verifier


def make_agent(cfg: MqttConfig, device: str, bundle: Path, local: Path, *, verifier: Verifier | None = None,
               heartbeat_s: float = 30.0) -> Agent:
    try:
        from .runtime import JetsonFineTuner
    except ImportError:  # run from the bundle folder (flat files)
        from runtime import JetsonFineTuner  # type: ignore[no-redef]

    spec: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    loc = json.loads((local / "local.json").read_text())
    raw = (local / "data.bin").read_bytes()
    size = int(loc["size"])
    xs = [raw[i * size:(i + 1) * size] for i in range(int(loc["n"]))]
    model_id = int(loc.get("model_id", 0))
    tuner = JetsonFineTuner(str(bundle / "model.onnx"), spec) if model_id else None

    def load(model: bytes) -> JetsonFineTuner:
        path = bundle / "received.onnx"
        path.write_bytes(model)
        return JetsonFineTuner(str(path), spec)

    import onnxruntime

    return Agent(cfg, device, tuner, xs, [int(v) for v in loc["labels"]], model_id=model_id,
                 caps=CAP_SHA256 | CAP_ED25519 | CAP_FMT_ONNX, board="jetson-orin-nano",
                 firmware=f"onnxruntime {onnxruntime.__version__}", verifier=verifier, heartbeat_s=heartbeat_s,
                 k_max=int(spec.get("k_max", 128)), load=load)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jetson-agent", description="Jetson fleet agent (docs/fleet.md)")
    ap.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT")
    ap.add_argument("--fleet", default="default")
    ap.add_argument("--prefix", default="tinyml")
    ap.add_argument("--device", required=True)
    ap.add_argument("--bundle", default=None, help="bundle folder (default: this file's folder, if a bundle)")
    ap.add_argument("--local", required=True)
    ap.add_argument("--heartbeat", type=float, default=30.0)
    ap.add_argument("--ed25519-public", default=None, help="PEM file of the fleet's model-signing public key")
    add_auth_args(ap)
    a = ap.parse_args(argv)
    try:
        auth = auth_from_args(a)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.bundle is None:
        here = Path(__file__).resolve().parent
        if not (here / "config.json").is_file():
            ap.error("--bundle is required (this agent.py is not inside a bundle folder)")
        a.bundle = str(here)
    host, _, port = a.broker.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        ap.error(f"--broker expects HOST:PORT, got '{a.broker}'")
    verifier = Verifier()
    if a.ed25519_public:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        verifier = Verifier(ed25519_public=load_pem_public_key(Path(a.ed25519_public).read_bytes()))  # type: ignore[arg-type]
    agent = make_agent(MqttConfig(host or "127.0.0.1", int(port), prefix=a.prefix, fleet=a.fleet, **auth), a.device,
                       Path(a.bundle), Path(a.local), verifier=verifier, heartbeat_s=a.heartbeat)
    print(f"jetson agent {a.device} on {a.broker}", file=sys.stderr, flush=True)
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.dev.stop()
    except LinkError as exc:  # refused login, untrusted broker, nothing listening: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
