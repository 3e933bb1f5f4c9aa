"""MQTT transport (paho-mqtt 2.x, callback API VERSION2): per-device topics, QoS 1, retained status, last will.

Topics (docs/protocol.md, "MQTT"): ``<prefix>/<fleet>/<device>/up`` (device -> host), ``.../down``
(host -> device), ``.../status`` (retained STATUS; the last will is a retained ``Status(ST_OFFLINE)``).
The payload is exactly the message bytes. QoS 1 is at-least-once. The host drops a repeat of the same
``up`` payload seen within ``dedupe_ttl`` seconds (every message carries its own id: round, model, chunk,
boot session, so a real repeat is a no-op there). A device end drops only the broker's *redeliveries*
(DUP flag set) of a payload it saw within ``dedupe_ttl``: the coordinator's re-asks are byte-identical
to its first ask (same ROUND_START, same model transfer), and a device that lost its answer (a reboot,
a broker crash) must get them; every downlink message is idempotent on the device.

The host keys everything by the device id taken from the topic and ignores a HELLO whose id differs,
so a device can only touch its own slot; broker ACLs (docs/protocol.md) stop it publishing elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from toolchain.contracts.wire.errors import LinkError, ProtocolError
from toolchain.contracts.wire.messages import ST_IDLE, ST_OFFLINE, Hello, Message, Status, decode, encode

QOS = 1
UP, DOWN, STATUS = "up", "down", "status"
_BAD_ID_CHARS = set("/+#\x00")


@dataclass(frozen=True)
class TlsOptions:
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False  # skip host-name check (self-signed test brokers); never in production


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "tinyml"
    fleet: str = "default"
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None
    keepalive: int = 30
    dedupe_ttl: float = 30.0

    def topic(self, device: str, leaf: str) -> str:
        check_device_id(device)
        return f"{self.prefix}/{self.fleet}/{device}/{leaf}"


PASSWORD_ENV = "TINYML_MQTT_PASSWORD"
USER_ENV = "TINYML_MQTT_USER"


def add_auth_args(ap: argparse.ArgumentParser) -> None:
    """Broker authentication options of serve, gateway and the Jetson agent (docs/fleet.md "Authenticated
    transport"). There is no password option: argv is visible to every user of the machine (ps, /proc)."""
    g = ap.add_argument_group("MQTT authentication")
    g.add_argument("--mqtt-user", default=None, help=f"broker user name (default: ${USER_ENV})")
    g.add_argument("--mqtt-password-file", default=None,
                   help=f"file holding the broker password (or set ${PASSWORD_ENV}); never on the command line")
    g.add_argument("--tls-ca", default=None, help="CA certificate (PEM) that signed the broker's: turns TLS on")
    g.add_argument("--tls-cert", default=None, help="client certificate (PEM) for brokers that require one")
    g.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")


def _pem(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            if b"-----BEGIN " not in f.read(1 << 20):
                raise ValueError(f"{what} {path} is not a PEM file")
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return path


def auth_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> dict:
    """``username``, ``password`` and ``tls`` for :class:`MqttConfig` from :func:`add_auth_args`' options and the
    environment; a ValueError with a one-line reason for anything unusable."""
    user = args.mqtt_user or env.get(USER_ENV) or None
    password = None
    if args.mqtt_password_file:
        try:
            with open(args.mqtt_password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --mqtt-password-file {args.mqtt_password_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if not password:
            raise ValueError(f"--mqtt-password-file {args.mqtt_password_file} is empty")
    elif env.get(PASSWORD_ENV):
        password = env[PASSWORD_ENV]
    if password is not None and user is None:
        raise ValueError(f"a broker password needs a user name: --mqtt-user or ${USER_ENV}")
    if user is not None and password is None:
        raise ValueError(f"--mqtt-user {user} needs a password: --mqtt-password-file or ${PASSWORD_ENV}")
    if user is not None and (not user.isascii() or not user.isprintable() or len(user) > 128):
        raise ValueError("--mqtt-user must be printable ASCII, at most 128 characters")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_ca or args.tls_cert:
        tls = TlsOptions(ca_certs=_pem(args.tls_ca, "--tls-ca") if args.tls_ca else None,
                         certfile=_pem(args.tls_cert, "--tls-cert") if args.tls_cert else None,
                         keyfile=_pem(args.tls_key, "--tls-key") if args.tls_key else None)
    return {"username": user, "password": password, "tls": tls}


def check_device_id(device: str) -> None:
    if not device or len(device) > 32 or not device.isascii() or _BAD_ID_CHARS & set(device):
        raise ProtocolError(f"bad device id {device!r}: 1..32 ASCII chars, no '/', '+', '#'")


class _Dedupe:
    """Recently seen payloads (by digest) with a time-to-live: QoS 1 redeliveries come within seconds."""

    def __init__(self, ttl: float, size: int = 4096) -> None:
        self.ttl, self.size = ttl, size
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def is_repeat(self, key: str, payload: bytes) -> bool:
        now = time.monotonic()
        while self._seen and (len(self._seen) > self.size or next(iter(self._seen.values())) < now - self.ttl):
            self._seen.popitem(last=False)
        digest = hashlib.blake2b(key.encode() + b"\x00" + payload, digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen[digest] = now
        return False


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    # Small QoS 1 messages otherwise meet Nagle + delayed ACK: ~40 ms per hop instead of < 1 ms.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pass


class _Endpoint:
    """A paho client that reconnects by itself and keeps its session (clean_session=False)."""

    def __init__(self, cfg: MqttConfig, client_id: str) -> None:
        self.cfg = cfg
        self.duplicates = 0
        self.malformed = 0
        self._dedupe = _Dedupe(cfg.dedupe_ttl)
        self._connected = threading.Event()
        self._refused = threading.Event()
        self._lock = threading.Lock()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            c.tls_set(
                ca_certs=cfg.tls.ca_certs, certfile=cfg.tls.certfile, keyfile=cfg.tls.keyfile,
                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            c.tls_insecure_set(cfg.tls.insecure)
        c.reconnect_delay_set(min_delay=0.2, max_delay=2)  # type: ignore[arg-type]  # floats work; paho says int
        c.on_connect = self._on_connect
        c.on_socket_open = _no_delay
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self.connect_refused: str | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.02):
            if self._refused.is_set() or time.monotonic() > deadline:
                break
        if not self._connected.is_set():
            self.client.loop_stop()
            why = self.connect_refused or "no answer"
            if self.cfg.tls is not None and not self.connect_refused:
                why += " (TLS: is the broker's certificate signed by the CA given, for this host name?)"
            raise LinkError(f"MQTT connect to {self.cfg.host}:{self.cfg.port} failed: {why}")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if getattr(rc, "is_failure", False):
            self.connect_refused = str(rc)
            self._refused.set()
            client.disconnect()  # a refused login would otherwise retry forever in the loop thread
            return
        self._subscribe()
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        self._connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        raise NotImplementedError

    def _subscribe(self) -> None:
        raise NotImplementedError

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        # With QoS 1 paho queues the message while disconnected and sends it after reconnecting.
        info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise LinkError(f"MQTT publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def _fresh(self, topic: str, payload: bytes) -> bool:
        with self._lock:
            if self._dedupe.is_repeat(topic, payload):
                self.duplicates += 1
                return False
            return True

    def _fresh_down(self, m: mqtt.MQTTMessage) -> bool:
        """Device side: False only for a broker redelivery (DUP) of a payload seen within the ttl (module doc)."""
        seen_before = not self._fresh(m.topic, m.payload)
        if seen_before and not m.dup:
            with self._lock:
                self.duplicates -= 1  # a re-ask, not a duplicate: handled again
        return not (seen_before and m.dup)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MqttDevice(_Endpoint):
    """The device end (Jetsons, tests, a proxy for a serial board): publishes ``up``/``status``, reads ``down``."""

    def __init__(self, cfg: MqttConfig, device_id: str, *, client_id: str | None = None) -> None:
        check_device_id(device_id)
        super().__init__(cfg, client_id or f"dev-{cfg.fleet}-{device_id}")
        self.device_id = device_id
        self.status = Status(ST_IDLE)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self.client.will_set(cfg.topic(device_id, STATUS), encode(Status(ST_OFFLINE)), qos=QOS, retain=True)

    def _subscribe(self) -> None:
        self.client.subscribe(self.cfg.topic(self.device_id, DOWN), qos=QOS)
        self._publish(self.cfg.topic(self.device_id, STATUS), encode(self.status), retain=True)

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        if not self._fresh_down(m):
            return
        try:
            self._inbox.put(decode(m.payload))
        except ProtocolError:
            self.malformed += 1

    def send(self, msg: Message) -> None:
        self._publish(self.cfg.topic(self.device_id, UP), encode(msg))

    def set_status(self, status: Status) -> None:
        self.status = status
        self._publish(self.cfg.topic(self.device_id, STATUS), encode(status), retain=True)

    def recv(self, timeout: float | None = None) -> Message | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        """Go offline cleanly: a normal disconnect suppresses the will, so say OFFLINE ourselves first."""
        if self.connected:
            info = self.client.publish(self.cfg.topic(self.device_id, STATUS), encode(Status(ST_OFFLINE)), QOS, True)
            info.wait_for_publish(timeout=5)
        super().stop()


class RawMqttDevice(MqttDevice):
    """An :class:`MqttDevice` that hands every fresh ``down`` payload over as bytes, undecoded (gateways, agents)."""

    def __init__(self, cfg: MqttConfig, device_id: str, on_down: Callable[[bytes], None]) -> None:
        super().__init__(cfg, device_id)
        self.on_down = on_down

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        if self._fresh_down(m):
            self.on_down(bytes(m.payload))

    def publish_up(self, raw: bytes) -> None:
        self._publish(self.cfg.topic(self.device_id, UP), raw)
        if len(raw) > 1 and raw[1] == Status.TYPE:
            self._publish(self.cfg.topic(self.device_id, STATUS), raw, retain=True)


@dataclass
class DeviceSlot:
    """Everything the host knows about one device, keyed by the device id in the topic."""

    device_id: str
    hello: Hello | None = None
    status: Status | None = None
    online: bool = False
    last_seen: float = 0.0
    received: int = 0
    rejected: int = 0  # messages dropped because they claimed another device's identity
    malformed: int = 0
    history: list[Message] = field(default_factory=list, repr=False)


class MqttHost(_Endpoint):
    """The host end: subscribes to every device's ``up`` and ``status`` in one fleet."""

    def __init__(self, cfg: MqttConfig, *, client_id: str | None = None, keep_history: bool = False,
                 max_slots: int = 1024) -> None:
        super().__init__(cfg, client_id or f"host-{cfg.prefix}-{cfg.fleet}")
        self.keep_history = keep_history
        self.max_slots = max_slots  # an id flood (anyone may publish without ACLs) must not grow memory forever
        self.evicted = 0
        self.slots: dict[str, DeviceSlot] = {}  # written by paho's thread: read it under self._lock (online())
        self._inbox: queue.Queue[tuple[str, Message]] = queue.Queue()
        self._changed = threading.Condition(self._lock)

    def _subscribe(self) -> None:
        base = f"{self.cfg.prefix}/{self.cfg.fleet}/+/"
        self.client.subscribe([(base + UP, QOS), (base + STATUS, QOS)])

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        parts = m.topic.split("/")
        if len(parts) != 4 or parts[3] not in (UP, STATUS):
            return
        device, leaf = parts[2], parts[3]
        if leaf == UP and not self._fresh(m.topic, m.payload):
            return
        with self._changed:
            slot = self.slots.get(device)
            if slot is None:
                if len(self.slots) >= self.max_slots:  # make room: the least recently seen slot goes
                    del self.slots[min(self.slots.values(), key=lambda s: s.last_seen).device_id]
                    self.evicted += 1
                slot = self.slots[device] = DeviceSlot(device)
            try:
                msg = decode(m.payload)
            except ProtocolError:
                slot.malformed += 1
                self._changed.notify_all()
                return
            if isinstance(msg, Hello) and msg.device_id != device:
                slot.rejected += 1  # identity spoofing: only the topic's device may speak for this slot
                self._changed.notify_all()
                return
            slot.last_seen = time.monotonic()
            if leaf == STATUS:
                if isinstance(msg, Status):
                    slot.status, slot.online = msg, msg.state != ST_OFFLINE
                else:
                    slot.malformed += 1
            else:
                slot.received += 1
                if isinstance(msg, Hello):
                    slot.hello, slot.online = msg, True
                if self.keep_history:
                    slot.history.append(msg)
                self._inbox.put((device, msg))
            self._changed.notify_all()

    def send(self, device_id: str, msg: Message) -> None:
        self.send_raw(device_id, encode(msg))

    def send_raw(self, device_id: str, raw: bytes) -> None:
        """Publish an already encoded message on the device's ``down`` topic (LinkError when paho refuses it)."""
        self._publish(self.cfg.topic(device_id, DOWN), raw)

    def online(self) -> list[str]:
        """Ids of the devices online now (a copy taken under the lock: paho's thread adds slots meanwhile)."""
        with self._lock:
            return sorted(d for d, s in self.slots.items() if s.online)

    def recv(self, timeout: float | None = None) -> tuple[str, Message] | None:
        """Next ``(device_id, message)`` from any device's ``up`` topic, or None after ``timeout``."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_until(self, predicate: Callable[[dict[str, DeviceSlot]], bool], timeout: float) -> bool:
        """Block until ``predicate(slots)`` holds (checked on every incoming message) or ``timeout`` passes."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.slots), timeout=timeout)
