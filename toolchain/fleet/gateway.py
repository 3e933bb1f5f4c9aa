"""Serial boards onto an MQTT fleet (``toolchain gateway``, docs/fleet.md).

Per serial port: a reliable :class:`SerialLink` to the board and, once the board's HELLO says who it is, an MQTT
device endpoint ``<prefix>/<fleet>/<device>/...`` with its own last will. Message bytes are forwarded unchanged
both ways (``up``; STATUS also retained on ``status``); the serial link adds framing, acks and retransmission.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from toolchain.contracts.wire.errors import ProtocolError
from toolchain.contracts.wire.messages import Hello, Ping, decode, encode
from toolchain.fleet.mqtt_link import MqttConfig, RawMqttDevice
from toolchain.fleet.serial_link import QueuedSender, SerialLink

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
        self._senders: dict[str, QueuedSender] = {}  # down: MQTT -> board, off paho's thread
        self._threads: list[threading.Thread] = []
        for port in ports:
            link = self._links[port] = SerialLink.open(port, baudrate, max_message=max_message, ack_timeout=0.5,
                                                       retries=10)
            t = threading.Thread(target=self._up, args=(port,), daemon=True, name=f"gateway-{port}")
            t.start()
            self._threads.append(t)
            self._senders[port] = QueuedSender(link, name=f"gateway-{port}", on_sent=self._forwarded_down,
                                               on_error=lambda exc, port=port: self.log(f"{port}: {exc}"))
            self._senders[port].put(encode(Ping()))  # boards that booted earlier answer with HELLO

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
                    dev = RawMqttDevice(self.cfg, msg.device_id, self._senders[port].put)
                    dev.start()
                    self.devices[msg.device_id] = dev
                    self.log(f"{port}: {msg.device_id} ({msg.board}, {msg.firmware}) on MQTT")
            if dev is not None:
                dev.publish_up(raw)
                self.forwarded_up += 1

    def _forwarded_down(self) -> None:
        self.forwarded_down += 1

    def close(self) -> None:
        self._stop.set()
        for sender in self._senders.values():
            sender.stop()
        for dev in self.devices.values():
            dev.stop()
        for link in self._links.values():
            link.close()
