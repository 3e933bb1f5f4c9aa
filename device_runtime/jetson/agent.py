"""Jetson fleet agent (docs/fleet.md): ``JetsonFineTuner`` as an MQTT fleet device (``toolchain.fleet.device_agent``).

    python -m device_runtime.jetson.agent --broker 127.0.0.1:1883 --device jetson-1 --bundle DIR --local DIR
    ./run_agent.sh --broker 127.0.0.1:1883 --device jetson-1 --local DIR     # from a Jetson bundle folder

``--bundle``: ``model.onnx`` + ``config.json`` (the on-device bundle; default: the folder of this file when it is
a bundle); ``--local``: the device's own data,
``local.json`` (``{"device", "n", "size", "labels", "model_id"}``, optionally ``"key"``: the device's round key
in hex) + ``data.bin`` (n x size int8 inputs).
New models arrive as ONNX with an Ed25519 signature (``--ed25519-public``); unsigned ones are rejected.
The bundle carries the ``toolchain.fleet`` modules imported here (docs/jetson.md "Running the agent from the bundle").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from toolchain.contracts.wire.errors import LinkError
from toolchain.contracts.wire.messages import AUTH_ED25519, CAP_ED25519, CAP_FMT_ONNX, CAP_SHA256, FMT_ONNX
from toolchain.contracts.wire.security import Verifier, bundle_header
from toolchain.fleet.device_agent import Agent
from toolchain.fleet.mqtt_link import MqttConfig, add_auth_args, auth_from_args

try:  # in the repository: the package device_runtime.jetson
    from .runtime import JetsonFineTuner
except ImportError:  # from the bundle folder: flat files on PYTHONPATH
    from runtime import JetsonFineTuner  # type: ignore[no-redef]


def check_model(path: Path, model_id: int, public: Any = None) -> None:
    """Verify the bundle's model before loading it (ValueError with a one-line reason): its line in the bundle's
    ``SHA256SUMS`` (written by ``toolchain flash --target jetson``, checked again here because the agent starts
    from the installed copy, which nothing re-checks), and with the fleet's Ed25519 public key its signature
    ``<model>.sig`` over the bundle header (docs/protocol.md section 5), as for models received over the link."""
    import hashlib

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).digest()
    sums = path.parent / "SHA256SUMS"
    if sums.is_file():
        want = [ln.split()[0] for ln in sums.read_text(errors="replace").splitlines()
                if len(ln.split()) == 2 and ln.split()[1].lstrip("*") == path.name]
        if want and want[0] != digest.hex():
            raise ValueError(f"{path} does not match its SHA256SUMS line (corrupted or changed); reinstall the bundle")
    sig = path.with_name(path.name + ".sig")
    if public is not None or sig.is_file():
        if public is None:
            raise ValueError(f"{sig} is there but no --ed25519-public key to check it with")
        if not sig.is_file():
            raise ValueError(f"{path} has no signature {sig.name}; sign it (Signer(ed25519_key=...)) or reinstall")
        if not Verifier(ed25519_public=public).check(bundle_header(model_id, FMT_ONNX, len(data), digest),
                                                     AUTH_ED25519, sig.read_bytes()):
            raise ValueError(f"{path} does not match its signature {sig.name} (model {model_id}); not loading it")


def make_agent(cfg: MqttConfig, device: str, bundle: Path, local: Path, *, verifier: Verifier | None = None,
               heartbeat_s: float = 30.0) -> Agent:
    spec: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    loc = json.loads((local / "local.json").read_text())
    raw = (local / "data.bin").read_bytes()
    size = int(loc["size"])
    xs = [raw[i * size:(i + 1) * size] for i in range(int(loc["n"]))]
    model_id = int(loc.get("model_id", 0))
    tuner = None
    if model_id:
        check_model(bundle / "model.onnx", model_id, verifier.ed25519_public if verifier else None)
        try:
            tuner = JetsonFineTuner(str(bundle / "model.onnx"), spec)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, ...) have no common base
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(f"{bundle / 'model.onnx'} does not load: {first}") from None

    def load(model: bytes) -> JetsonFineTuner:
        path = bundle / "received.onnx"
        path.write_bytes(model)
        return JetsonFineTuner(str(path), spec)

    import onnxruntime

    # local.json "key" (hex): the device's own key (security.device_key of the fleet's master, provisioned with
    # its data); with it, ROUND_START / ROUND_UPDATE are taken only signed (docs/fleet.md "Keys per device")
    round_key = bytes.fromhex(loc["key"]) if loc.get("key") else None
    return Agent(cfg, device, tuner, xs, [int(v) for v in loc["labels"]], model_id=model_id, round_key=round_key,
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

        try:
            public = load_pem_public_key(Path(a.ed25519_public).read_bytes())
        except (OSError, ValueError) as exc:
            print(f"error: cannot use --ed25519-public {a.ed25519_public}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        verifier = Verifier(ed25519_public=public)  # type: ignore[arg-type]
    try:
        agent = make_agent(MqttConfig(host or "127.0.0.1", int(port), prefix=a.prefix, fleet=a.fleet, **auth),
                           a.device, Path(a.bundle), Path(a.local), verifier=verifier, heartbeat_s=a.heartbeat)
    except (ValueError, OSError, KeyError) as exc:  # a bad model, bundle or local data set: one line, no traceback
        why = str(exc) if not isinstance(exc, KeyError) else f"local.json or config.json lacks {exc}"
        print(f"error: {why.splitlines()[0] if why else type(exc).__name__}", file=sys.stderr)
        return 2
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
