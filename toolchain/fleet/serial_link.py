"""Reliable message link over a pyserial port: stop-and-wait with seq numbers, ack, retransmit, dedupe.

Each side numbers its DATA frames (16-bit seq, random start); the receiver answers every good DATA
frame with an ACK frame carrying the same seq, and delivers a frame only if its seq differs from the
last one it delivered from that peer (a retransmission whose ACK was lost). One message is in flight
per direction, so a single remembered seq is a complete dedupe window.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import serial

from toolchain.contracts.wire.errors import LinkError, ProtocolError
from toolchain.contracts.wire.framing import DEFAULT_MAX_MESSAGE, SEQ_MOD, Frame, FrameDecoder, encode_frame
from toolchain.contracts.wire.messages import Message, decode, encode


@dataclass
class LinkStats:
    sent: int = 0  # messages acknowledged by the peer
    retransmits: int = 0
    received: int = 0  # messages delivered to the application
    duplicates: int = 0  # retransmitted frames dropped by seq
    acks_sent: int = 0
    bytes_out: int = 0


class SerialLink:
    """``send`` blocks until the peer acks (or raises :class:`LinkError`); ``recv`` returns delivered messages."""

    def __init__(
        self,
        port: serial.SerialBase,
        *,
        ack_timeout: float = 0.3,
        retries: int = 8,
        max_message: int = DEFAULT_MAX_MESSAGE,
        initial_seq: int | None = None,
        owns_port: bool = False,
    ) -> None:
        self.port = port
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.max_message = max_message
        self.owns_port = owns_port
        self.decoder = FrameDecoder(max_message)
        self.stats = LinkStats()
        # A random first seq makes a restarted sender unlikely (1/65536) to repeat the peer's last seen seq.
        self._tx_seq = random.randrange(SEQ_MOD) if initial_seq is None else initial_seq % SEQ_MOD
        self._rx_last: int | None = None
        self._inbox: queue.Queue[bytes] = queue.Queue()
        self._write_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ack_cv = threading.Condition()
        self._acked: int | None = None
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="serial-link-reader", daemon=True)
        self._reader.start()

    @classmethod
    def open(cls, path: str, baudrate: int = 115200, **kw: object) -> SerialLink:
        port = serial.Serial(path, baudrate=baudrate, timeout=0.02, write_timeout=5)
        return cls(port, owns_port=True, **kw)  # type: ignore[arg-type]

    # -- sending ------------------------------------------------------------------------------------
    def send(self, message: bytes) -> None:
        """Deliver ``message`` (protocol message bytes) exactly once or raise :class:`LinkError`."""
        if not message or len(message) > self.max_message:
            raise ProtocolError(f"message length {len(message)} not in 1..{self.max_message}")
        with self._send_lock:
            seq = self._tx_seq
            self._tx_seq = (seq + 1) % SEQ_MOD
            frame = encode_frame(Frame(seq, bytes(message)))
            # Time to wait: the fixed allowance plus both directions' transmission time at the port's baud rate.
            wait = self.ack_timeout + 2 * 10 * (len(frame) + 12) / max(1, self.port.baudrate or 115200)
            for attempt in range(self.retries + 1):
                if self._stop.is_set():
                    raise LinkError("link closed")
                # A leading 0x00 ends any garbage the receiver holds, so this frame parses on its own.
                self._write((b"\x00" if attempt else b"") + frame)
                with self._ack_cv:
                    if self._ack_cv.wait_for(lambda: self._acked == seq or self._stop.is_set(), timeout=wait):
                        if self._acked == seq:
                            self.stats.sent += 1
                            return
                if attempt < self.retries:
                    self.stats.retransmits += 1
            raise LinkError(f"no ack for seq {seq} after {self.retries + 1} attempts")

    def send_message(self, msg: Message) -> None:
        self.send(encode(msg))

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            self.port.write(data)
            self.stats.bytes_out += len(data)

    # -- receiving ----------------------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> bytes | None:
        """Next delivered message's bytes, or None after ``timeout`` seconds."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def recv_message(self, timeout: float | None = None) -> Message | None:
        """Like :meth:`recv` but decoded; a malformed message raises :class:`ProtocolError`."""
        raw = self.recv(timeout)
        return None if raw is None else decode(raw)

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.port.read(max(1, self.port.in_waiting))
            except (serial.SerialException, OSError, TypeError):
                if self._stop.is_set():
                    return
                continue
            if data:
                for frame in self.decoder.feed(data):
                    self._on_frame(frame)

    def _on_frame(self, frame: Frame) -> None:
        if frame.ack:
            with self._ack_cv:
                self._acked = frame.seq
                self._ack_cv.notify_all()
            return
        self._write(encode_frame(Frame(frame.seq, ack=True)))  # ack every copy: the last ack may have been lost
        self.stats.acks_sent += 1
        if frame.seq == self._rx_last:
            self.stats.duplicates += 1
            return
        self._rx_last = frame.seq
        self.stats.received += 1
        self._inbox.put(frame.message)

    def close(self) -> None:
        self._stop.set()
        with self._ack_cv:
            self._ack_cv.notify_all()
        self._reader.join(timeout=2)
        if self.owns_port:
            self.port.close()

    def __enter__(self) -> SerialLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QueuedSender:
    """Sends messages over a :class:`SerialLink` from its own thread, in the order queued, so that whoever queues
    (the coordinator, a paho callback in the gateway) never waits for the link's acks and retransmissions.

    ``on_sent()`` runs after each acknowledged message, ``on_error(exc)`` when one fails (the peer is gone, or the
    message does not fit); the thread carries on with the next. ``stop`` ends it after the message in flight."""

    def __init__(self, link: SerialLink, *, name: str = "serial-sender", on_sent: Callable[[], None] | None = None,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.link = link
        self._on_sent = on_sent or (lambda: None)
        self._on_error = on_error or (lambda _exc: None)
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, raw: bytes) -> None:
        """Queue ``raw`` (protocol message bytes); never blocks."""
        self._queue.put(raw)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)

    def _run(self) -> None:
        while not self._stop.is_set():
            raw = self._queue.get()
            if raw is None:
                return
            try:
                self.link.send(raw)
            except (LinkError, ProtocolError) as exc:
                self._on_error(exc)
            else:
                self._on_sent()
