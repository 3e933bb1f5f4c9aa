"""Fleet transports for the coordinator (docs/fleet.md): many devices behind one interface.

* ROUND_UPDATE (type 0x12, the server's broadcast of docs/zo.md §6 step 4) is a protocol 1.1 message now:
  :class:`toolchain.contracts.wire.messages.RoundUpdate`, re-exported here with ``T_ROUND_UPDATE`` and ``decode_any``
  (= :func:`toolchain.contracts.wire.messages.decode`) for existing imports.
* :class:`SerialFleet`: one :class:`SerialLink` per port; device ids come from HELLO (devices answer PING with
  HELLO + STATUS, so a host that starts after the boards learns who is where).
* :class:`MqttFleet`: an :class:`MqttHost`; raw message bytes on ``<prefix>/<fleet>/<device>/down``.

Both deliver ``(device_id, message)`` from :meth:`recv` and take raw message bytes in :meth:`send` (never block).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from toolchain.contracts.wire.errors import LinkError, ProtocolError
from toolchain.contracts.wire.messages import MAX_K, T_ROUND_UPDATE, U30, Hello, Message, Ping, RoundUpdate, encode
from toolchain.contracts.wire.messages import decode as decode_any
from toolchain.fleet.mqtt_link import MqttConfig, MqttHost
from toolchain.fleet.serial_link import QueuedSender, SerialLink

__all__ = ["MAX_K", "T_ROUND_UPDATE", "U30", "FleetStats", "MqttFleet", "OnlyDevices", "RoundUpdate", "SerialFleet",
           "decode_any", "wait_for"]


@dataclass
class FleetStats:
    bytes_down: dict[str, int] = field(default_factory=dict)  # message bytes (without framing) per device
    bytes_up: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    send_failures: int = 0


class SerialFleet:
    """Devices on serial ports (real boards, emulators' ptys, the gateway's side of a relay)."""

    def __init__(self, ports: list[str], *, baudrate: int = 115200, max_message: int = 600,
                 ack_timeout: float = 0.5, retries: int = 10) -> None:
        self.stats = FleetStats()
        self._inbox: queue.Queue[tuple[str, Message | RoundUpdate]] = queue.Queue()
        self._links: dict[str, SerialLink] = {}
        self._senders: dict[str, QueuedSender] = {}  # send() never waits for a board's acks
        self._ids: dict[str, str] = {}  # port -> device id (from HELLO)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for port in ports:
            link = SerialLink.open(port, baudrate, max_message=max_message, ack_timeout=ack_timeout, retries=retries)
            self._links[port] = link
            t = threading.Thread(target=self._reader, args=(port,), daemon=True, name=f"serial-fleet-{port}")
            t.start()
            self._threads.append(t)
            self._senders[port] = QueuedSender(link, name=f"serial-fleet-{port}", on_error=self._send_failed)
            self._senders[port].put(encode(Ping()))  # a board that booted before us answers with its HELLO

    def _reader(self, port: str) -> None:
        link = self._links[port]
        while not self._stop.is_set():
            raw = link.recv(0.2)
            if raw is None:
                continue
            try:
                msg = decode_any(raw)
            except ProtocolError:
                self.stats.malformed += 1
                continue
            if isinstance(msg, Hello):
                self._ids[port] = msg.device_id
            dev = self._ids.get(port)
            if dev is None:
                continue  # nothing before a HELLO says who this is
            self.stats.bytes_up[dev] = self.stats.bytes_up.get(dev, 0) + len(raw)
            self._inbox.put((dev, msg))

    def _send_failed(self, _exc: Exception) -> None:
        self.stats.send_failures += 1  # the device is gone; the coordinator re-sends what matters

    def send(self, device: str, raw: bytes) -> None:
        for port, dev in self._ids.items():
            if dev == device:
                self.stats.bytes_down[device] = self.stats.bytes_down.get(device, 0) + len(raw)
                self._senders[port].put(raw)
                return

    def devices(self) -> list[str]:
        return sorted(set(self._ids.values()))

    def recv(self, timeout: float) -> tuple[str, Message | RoundUpdate] | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def link_stats(self) -> dict[str, dict[str, int]]:
        return {p: {"frames_bad": link.decoder.frames_bad, "retransmits": link.stats.retransmits,
                    "duplicates": link.stats.duplicates, "bytes_out": link.stats.bytes_out,
                    "bytes_in": link.decoder.bytes_in} for p, link in self._links.items()}

    def close(self) -> None:
        self._stop.set()
        for sender in self._senders.values():
            sender.stop()
        for link in self._links.values():
            link.close()


class MqttFleet:
    """Devices behind an MQTT broker (Jetson agents, gateways for serial boards, boards with umqtt)."""

    def __init__(self, cfg: MqttConfig, *, client_id: str | None = None) -> None:
        self.cfg = cfg
        self.stats = FleetStats()
        self.host = MqttHost(cfg, client_id=client_id)
        self.host.start()

    def send(self, device: str, raw: bytes) -> None:
        self.stats.bytes_down[device] = self.stats.bytes_down.get(device, 0) + len(raw)
        # raw bytes (already encoded by the coordinator), not re-decoded
        try:
            self.host.send_raw(device, raw)
        except LinkError:
            self.stats.send_failures += 1  # paho's queue is full (a flood): the coordinator re-sends what matters

    def devices(self) -> list[str]:
        return self.host.online()  # (iterating host.slots here raced paho's thread: "dictionary changed size")

    def recv(self, timeout: float) -> tuple[str, Message | RoundUpdate] | None:
        got = self.host.recv(timeout)
        if got is not None:
            dev, msg = got
            self.stats.bytes_up[dev] = self.stats.bytes_up.get(dev, 0) + len(encode(msg))
        return got

    def close(self) -> None:
        self.host.stop()


class OnlyDevices:
    """A fleet seen through a list of device ids (a Flower fleet node's ``devices``): whatever another id sends is
    refused here, counted in ``refused`` and never reaches the coordinator, and nothing is sent to it. The
    coordinator's own rules still apply to the listed ids (only results it asked for count)."""

    def __init__(self, fleet: SerialFleet | MqttFleet, allowed: list[str]) -> None:
        self.fleet = fleet
        self.allowed = frozenset(allowed)
        self.refused: dict[str, int] = {}  # device id -> messages refused

    def send(self, device: str, raw: bytes) -> None:
        if device in self.allowed:
            self.fleet.send(device, raw)

    def devices(self) -> list[str]:
        return [d for d in self.fleet.devices() if d in self.allowed]

    def recv(self, timeout: float) -> tuple[str, Message | RoundUpdate] | None:
        end = time.monotonic() + timeout
        while True:
            got = self.fleet.recv(max(0.0, end - time.monotonic()))
            if got is None or got[0] in self.allowed:
                return got
            if len(self.refused) < 1024 or got[0] in self.refused:  # (an id flood: the table stays bounded)
                self.refused[got[0]] = self.refused.get(got[0], 0) + 1
            if time.monotonic() >= end:
                return None

    def close(self) -> None:
        self.fleet.close()


def wait_for(pred: object, timeout: float, step: float = 0.05) -> bool:
    """Poll ``pred()`` until true or ``timeout`` seconds pass (helpers and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(step)
    return bool(pred())  # type: ignore[operator]
