"""Serial boards onto an MQTT fleet (``toolchain gateway``, docs/fleet.md).

Per serial port: a reliable :class:`SerialLink` to the board and, once the board's HELLO says who it is, an MQTT
device endpoint ``<prefix>/<fleet>/<device>/...`` with its own last will. Message bytes are forwarded unchanged
both ways (``up``; STATUS also retained on ``status``); the serial link adds framing, acks and retransmission.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from toolchain.contracts.wire.errors import LinkError, ProtocolError
from toolchain.contracts.wire.messages import Hello, Ping, decode, encode
from toolchain.fleet.mqtt_link import MqttConfig, RawMqttDevice
from toolchain.fleet.serial_link import SerialLink

__all__ = ["Gateway", "RawMqttDevice"]  # RawMqttDevice lives in mqtt_link (the Jetson bundle has no serial_link)


class Gateway:
    def __init__(self, ports: list[str], cfg: MqttConfig, *, baudrate: int = 115200, max_message: int = 600,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda _m: None)
        self.devices: dict[str, RawMqttDevice] = {}
        self.forwarded_up = 0
        self.forwarded_down = 0
        self._stop = threading.Event()
        self._links: dict[str, SerialLink] = {}
        self._queues: dict[str, queue.Queue[bytes | None]] = {}
        self._threads: list[threading.Thread] = []
        for port in ports:
            self._links[port] = SerialLink.open(port, baudrate, max_message=max_message, ack_timeout=0.5, retries=10)
            self._queues[port] = queue.Queue()
            for target in (self._up, self._down):
                t = threading.Thread(target=target, args=(port,), daemon=True, name=f"gateway-{port}")
                t.start()
                self._threads.append(t)
            self._queues[port].put(encode(Ping()))  # boards that booted earlier answer with HELLO

    def _up(self, port: str) -> None:
        link = self._links[port]
        dev: RawMqttDevice | None = None
        while not self._stop.is_set():
            raw = link.recv(0.2)
            if raw is None:
                continue
            try:
                msg = decode(raw)
            except ProtocolError:
                continue
            if isinstance(msg, Hello) and (dev is None or dev.device_id != msg.device_id):
                dev = self.devices.get(msg.device_id)
                if dev is None:
                    q = self._queues[port]
                    dev = RawMqttDevice(self.cfg, msg.device_id, q.put)
                    dev.start()
                    self.devices[msg.device_id] = dev
                    self.log(f"{port}: {msg.device_id} ({msg.board}, {msg.firmware}) on MQTT")
            if dev is not None:
                dev.publish_up(raw)
                self.forwarded_up += 1

    def _down(self, port: str) -> None:
        link, q = self._links[port], self._queues[port]
        while not self._stop.is_set():
            raw = q.get()
            if raw is None:
                return
            try:
                link.send(raw)
                self.forwarded_down += 1
            except (LinkError, ProtocolError) as exc:
                self.log(f"{port}: {exc}")

    def close(self) -> None:
        self._stop.set()
        for q in self._queues.values():
            q.put(None)
        for dev in self.devices.values():
            dev.stop()
        for link in self._links.values():
            link.close()
