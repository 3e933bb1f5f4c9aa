"""Protocol messages (docs/protocol.md): typed dataclasses, ``encode(msg) -> bytes``, ``decode(bytes) -> msg``.

A message is ``version u8 | type u8 | payload``; all integers little-endian, floats IEEE float32.
The same bytes travel on every transport. ``decode`` raises only :class:`ProtocolError`.
Protocol 1.1: version byte 1 (``VERSION``); 1.1 adds ROUND_UPDATE (0x12) to 1.0 (docs/protocol.md "Versions").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from toolchain.contracts.wire.errors import ProtocolError

VERSION = 1  # the version byte: changes only with an incompatible layout (docs/protocol.md "Versions")
MINOR = 1  # protocol 1.1: 1.0 + ROUND_UPDATE; a 1.0 decoder rejects 0x12 as an unknown type
U30 = 1 << 30  # ids, counts and sizes stay below 2**30 so MicroPython keeps them as small ints
MAX_K = 256
MAX_NAME = 32
MAX_ERROR_TEXT = 48
SHA256_LEN = 32

# Message types.
T_HELLO = 0x01
T_MODEL_BEGIN = 0x02
T_MODEL_CHUNK = 0x03
T_MODEL_COMMIT = 0x04
T_ROUND_START = 0x10
T_ROUND_RESULT = 0x11
T_ROUND_UPDATE = 0x12  # protocol 1.1
T_SIGNED = 0x13  # host -> device: a ROUND_START / ROUND_UPDATE with an HMAC tag (devices with CAP_SIGNED)
T_STATUS = 0x20
T_PING = 0x21
T_ACK = 0x30
T_ERROR = 0x3F

# Model formats (MODEL_BEGIN.fmt).
FMT_SMF = 1
FMT_TFLITE = 2
FMT_ONNX = 3
FORMATS = (FMT_SMF, FMT_TFLITE, FMT_ONNX)

# Model authentication schemes and their tag lengths (MODEL_COMMIT.auth).
AUTH_NONE = 0
AUTH_HMAC_SHA256 = 1
AUTH_ED25519 = 2
TAG_LEN = {AUTH_NONE: 0, AUTH_HMAC_SHA256: 32, AUTH_ED25519: 64}

# HELLO capability bits.
CAP_SHA256 = 0x01  # native hashlib.sha256
CAP_HMAC = 0x02
CAP_ED25519 = 0x04
CAP_FMT_SMF = 0x08
CAP_FMT_TFLITE = 0x10
CAP_FMT_ONNX = 0x20
CAP_SIGNED = 0x40  # holds a per-device key: takes ROUND_START / ROUND_UPDATE only inside SIGNED (0x13)
SIGNED_TAG_LEN = 16

# STATUS states; OFFLINE is what the MQTT last will says.
ST_OFFLINE = 0
ST_IDLE = 1
ST_LOADING = 2
ST_TRAINING = 3
ST_ERROR = 4
STATES = (ST_OFFLINE, ST_IDLE, ST_LOADING, ST_TRAINING, ST_ERROR)

# ROUND_START flags.
RF_EXPLICIT_SEEDS = 0x01

# ERROR codes.
E_BAD_MESSAGE = 1
E_VERSION = 2
E_UNSUPPORTED = 3
E_RANGE = 4
E_NO_MEMORY = 5
E_SEQUENCE = 6
E_HASH = 7
E_AUTH = 8
E_NO_MODEL = 9
E_BUSY = 10
E_INTERNAL = 11


def _u30(name: str, v: int) -> None:
    if not isinstance(v, int) or not 0 <= v < U30:
        raise ProtocolError(f"{name}={v!r} must be an int in 0..2**30-1")


def _uint(name: str, v: int, bits: int) -> None:
    if not isinstance(v, int) or not 0 <= v < (1 << bits):
        raise ProtocolError(f"{name}={v!r} must be an int in 0..2**{bits}-1")


def _ascii(name: str, s: str, limit: int) -> bytes:
    try:
        b = s.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        raise ProtocolError(f"{name} must be an ASCII str") from None
    if len(b) > limit:
        raise ProtocolError(f"{name} longer than {limit} bytes")
    return b


def _f32(v: float) -> float:
    """``v`` rounded to float32, the precision it has on the wire."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except (struct.error, OverflowError, TypeError):
        raise ProtocolError(f"{v!r} is not representable as float32") from None


class _Reader:
    """Bounds-checked little-endian reader; every overrun becomes a ProtocolError."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ProtocolError("message truncated")
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return v

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("message truncated")
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def name(self, what: str, limit: int) -> str:
        (n,) = self.take("<B")
        if n > limit:
            raise ProtocolError(f"{what} longer than {limit} bytes")
        raw = self.bytes(n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not ASCII") from None

    def rest(self) -> bytes:
        v = self.data[self.pos :]
        self.pos = len(self.data)
        return v

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes after message")


@dataclass(frozen=True)
class Hello:
    """Device -> host on boot/connect: who it is and what it can do."""

    TYPE: ClassVar[int] = T_HELLO
    device_id: str
    board: str
    firmware: str  # e.g. "micropython 1.9.2"
    runtime_version: tuple[int, int, int]  # device_runtime version
    free_heap: int
    max_message: int  # longest message the device can receive
    caps: int = 0
    session: int = 0  # random per boot: a reboot's HELLO differs from the last one

    def payload(self) -> bytes:
        _u30("free_heap", self.free_heap)
        _uint("max_message", self.max_message, 16)
        _uint("caps", self.caps, 16)
        _uint("session", self.session, 16)
        if len(self.runtime_version) != 3:
            raise ProtocolError("runtime_version is (major, minor, patch)")
        for v in self.runtime_version:
            _uint("runtime_version", v, 8)
        if not self.device_id:
            raise ProtocolError("device_id is empty")
        parts = [struct.pack("<HBBBIHH", self.session, *self.runtime_version, self.free_heap, self.max_message, self.caps)]
        for name in ("device_id", "board", "firmware"):
            b = _ascii(name, getattr(self, name), MAX_NAME)
            parts.append(bytes([len(b)]) + b)
        return b"".join(parts)

    @classmethod
    def parse(cls, r: _Reader) -> Hello:
        session, ma, mi, pa, heap, maxmsg, caps = r.take("<HBBBIHH")
        _u30("free_heap", heap)
        dev, board, fw = (r.name(w, MAX_NAME) for w in ("device_id", "board", "firmware"))
        if not dev:
            raise ProtocolError("device_id is empty")
        return cls(dev, board, fw, (ma, mi, pa), heap, maxmsg, caps, session)


@dataclass(frozen=True)
class ModelBegin:
    """Host -> device: a model of ``size`` bytes follows in chunks of at most ``chunk_size`` bytes."""

    TYPE: ClassVar[int] = T_MODEL_BEGIN
    model_id: int
    size: int
    chunk_size: int
    fmt: int = FMT_SMF
    auth: int = AUTH_HMAC_SHA256

    def payload(self) -> bytes:
        _u30("model_id", self.model_id)
        _u30("size", self.size)
        _uint("chunk_size", self.chunk_size, 16)
        self._check()
        return struct.pack("<IIHBB", self.model_id, self.size, self.chunk_size, self.fmt, self.auth)

    def _check(self) -> None:
        if self.size < 1 or self.chunk_size < 1:
            raise ProtocolError("model size and chunk_size must be >= 1")
        if self.fmt not in FORMATS:
            raise ProtocolError(f"unknown model format {self.fmt}")
        if self.auth not in TAG_LEN:
            raise ProtocolError(f"unknown auth scheme {self.auth}")

    @property
    def n_chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    @classmethod
    def parse(cls, r: _Reader) -> ModelBegin:
        m = cls(*r.take("<IIHBB"))
        _u30("model_id", m.model_id)
        _u30("size", m.size)
        m._check()
        return m


@dataclass(frozen=True)
class ModelChunk:
    """Host -> device: bytes ``[index*chunk_size, ...)`` of model ``model_id``."""

    TYPE: ClassVar[int] = T_MODEL_CHUNK
    model_id: int
    index: int
    data: bytes

    def payload(self) -> bytes:
        _u30("model_id", self.model_id)
        _uint("index", self.index, 16)
        if not self.data:
            raise ProtocolError("empty chunk")
        return struct.pack("<IH", self.model_id, self.index) + bytes(self.data)

    @classmethod
    def parse(cls, r: _Reader) -> ModelChunk:
        model_id, index = r.take("<IH")
        _u30("model_id", model_id)
        data = r.rest()
        if not data:
            raise ProtocolError("empty chunk")
        return cls(model_id, index, data)


@dataclass(frozen=True)
class ModelCommit:
    """Host -> device: the model is complete; ``sha256`` of all of it and an auth tag over the bundle header."""

    TYPE: ClassVar[int] = T_MODEL_COMMIT
    model_id: int
    sha256: bytes
    auth: int
    tag: bytes = b""

    def payload(self) -> bytes:
        _u30("model_id", self.model_id)
        self._check()
        return struct.pack("<I", self.model_id) + bytes(self.sha256) + bytes([self.auth]) + bytes(self.tag)

    def _check(self) -> None:
        if len(self.sha256) != SHA256_LEN:
            raise ProtocolError("sha256 must be 32 bytes")
        if self.auth not in TAG_LEN:
            raise ProtocolError(f"unknown auth scheme {self.auth}")
        if len(self.tag) != TAG_LEN[self.auth]:
            raise ProtocolError(f"auth scheme {self.auth} needs a {TAG_LEN[self.auth]}-byte tag")

    @classmethod
    def parse(cls, r: _Reader) -> ModelCommit:
        (model_id,) = r.take("<I")
        _u30("model_id", model_id)
        digest = r.bytes(SHA256_LEN)
        (auth,) = r.take("<B")
        m = cls(model_id, digest, auth, r.rest())
        m._check()
        return m


@dataclass(frozen=True)
class RoundStart:
    """Host -> device: run round ``round_id`` with K perturbations.

    Seeds are either explicit (``seeds``, K of them) or derived on the device from one ``round_seed``
    (derivation in docs/zo.md). Seeds are full u32; devices hold them as two 16-bit halves.
    """

    TYPE: ClassVar[int] = T_ROUND_START
    round_id: int
    k: int
    mu: float
    lr: float
    steps: int = 1
    batch: int = 1
    round_seed: int | None = None
    seeds: tuple[int, ...] = ()

    def payload(self) -> bytes:
        _u30("round_id", self.round_id)
        _uint("steps", self.steps, 16)
        _uint("batch", self.batch, 16)
        if not 1 <= self.k <= MAX_K:
            raise ProtocolError(f"k={self.k} must be in 1..{MAX_K}")
        explicit = self.round_seed is None
        if explicit and len(self.seeds) != self.k:
            raise ProtocolError("give round_seed, or exactly k explicit seeds")
        if not explicit and self.seeds:
            raise ProtocolError("give round_seed or seeds, not both")
        seeds = self.seeds if explicit else (self.round_seed,)
        for s in seeds:
            _uint("seed", s, 32)
        head = struct.pack(
            "<IHBHHff", self.round_id, self.k, RF_EXPLICIT_SEEDS if explicit else 0, self.steps, self.batch,
            _f32(self.mu), _f32(self.lr),
        )
        return head + struct.pack(f"<{len(seeds)}I", *seeds)

    @classmethod
    def parse(cls, r: _Reader) -> RoundStart:
        round_id, k, flags, steps, batch, mu, lr = r.take("<IHBHHff")
        _u30("round_id", round_id)
        if not 1 <= k <= MAX_K:
            raise ProtocolError(f"k={k} must be in 1..{MAX_K}")
        if flags & ~RF_EXPLICIT_SEEDS:
            raise ProtocolError("unknown ROUND_START flags")
        if flags & RF_EXPLICIT_SEEDS:
            return cls(round_id, k, mu, lr, steps, batch, None, r.take(f"<{k}I"))
        return cls(round_id, k, mu, lr, steps, batch, r.take("<I")[0])


@dataclass(frozen=True)
class RoundResult:
    """Device -> host: one float32 per perturbation (``len(scalars) == K``), the loss and the sample count."""

    TYPE: ClassVar[int] = T_ROUND_RESULT
    round_id: int
    scalars: tuple[float, ...]
    loss: float
    n_samples: int

    def payload(self) -> bytes:
        _u30("round_id", self.round_id)
        _u30("n_samples", self.n_samples)
        return struct.pack("<IIf", self.round_id, self.n_samples, _f32(self.loss)) + _pack_scalars(self.scalars)

    @classmethod
    def parse(cls, r: _Reader) -> RoundResult:
        round_id, n, loss = r.take("<IIf")
        _u30("round_id", round_id)
        _u30("n_samples", n)
        return cls(round_id, _parse_scalars(r, "ROUND_RESULT"), loss, n)


def _pack_scalars(values: tuple[float, ...]) -> bytes:
    """The 1..MAX_K float32 scalars that end ROUND_RESULT and ROUND_UPDATE."""
    if not 1 <= len(values) <= MAX_K:
        raise ProtocolError(f"1..{MAX_K} scalars")
    return struct.pack(f"<{len(values)}f", *(_f32(v) for v in values))


def _parse_scalars(r: _Reader, name: str) -> tuple[float, ...]:
    rest = r.rest()
    if len(rest) % 4 or not 1 <= len(rest) // 4 <= MAX_K:
        raise ProtocolError(f"{name} needs 1..{MAX_K} float32 scalars")
    return struct.unpack(f"<{len(rest) // 4}f", rest)


@dataclass(frozen=True)
class RoundUpdate:
    """Host -> every device (protocol 1.1): round ``round_id`` closed; apply ``w -= lr/K sum_k gbar_k z_k``.

    ``seed`` is the round seed the K perturbations derive from (docs/zo.md §6 step 4), ``gbar`` the aggregated
    scalars (``K = len(gbar)``). Devices apply updates in round order and answer ``ACK(0x12, round_id)``; a repeat
    is acknowledged again and not re-applied (docs/protocol.md). Range checks (``lr``, finite scalars, K) are the
    device's (:func:`toolchain.contracts.wire.security.check_update`), as for ROUND_START.
    """

    TYPE: ClassVar[int] = T_ROUND_UPDATE
    round_id: int
    seed: int
    lr: float
    gbar: tuple[float, ...]

    def payload(self) -> bytes:
        _u30("round_id", self.round_id)
        _uint("seed", self.seed, 32)
        return struct.pack("<IIf", self.round_id, self.seed, _f32(self.lr)) + _pack_scalars(self.gbar)

    @classmethod
    def parse(cls, r: _Reader) -> RoundUpdate:
        round_id, seed, lr = r.take("<IIf")
        _u30("round_id", round_id)
        return cls(round_id, seed, lr, _parse_scalars(r, "ROUND_UPDATE"))


@dataclass(frozen=True)
class Signed:
    """Host -> device: ``inner`` (a whole message, ``version | type | payload``: ROUND_START or ROUND_UPDATE) with
    ``tag`` = the first 16 bytes of HMAC-SHA256(device key, ``"TMS1" | session u16 | len(id) u8 | id | inner``)
    (``toolchain.contracts.wire.security.seal``). The device's boot session and id are in the tag, so a message recorded
    for another device or an earlier boot does not verify. The receiver checks the tag before decoding ``inner``.
    """

    TYPE: ClassVar[int] = T_SIGNED
    tag: bytes
    inner: bytes

    def payload(self) -> bytes:
        self._check()
        return bytes(self.tag) + bytes(self.inner)

    def _check(self) -> None:
        if len(self.tag) != SIGNED_TAG_LEN:
            raise ProtocolError(f"SIGNED tag must be {SIGNED_TAG_LEN} bytes")
        if len(self.inner) < 2 or self.inner[1] == T_SIGNED:
            raise ProtocolError("SIGNED carries one whole message, not another SIGNED")

    @classmethod
    def parse(cls, r: _Reader) -> Signed:
        m = cls(r.bytes(SIGNED_TAG_LEN), r.rest())
        m._check()
        return m


@dataclass(frozen=True)
class Status:
    """Device -> host heartbeat (and the retained MQTT status; the last will is ``Status(ST_OFFLINE)``)."""

    TYPE: ClassVar[int] = T_STATUS
    state: int
    uptime_s: int = 0
    free_heap: int = 0
    round_id: int = 0  # last round the device finished
    model_id: int = 0  # model it runs (0: none)

    def payload(self) -> bytes:
        if self.state not in STATES:
            raise ProtocolError(f"unknown state {self.state}")
        for name in ("uptime_s", "free_heap", "round_id", "model_id"):
            _u30(name, getattr(self, name))
        return struct.pack("<BIIII", self.state, self.uptime_s, self.free_heap, self.round_id, self.model_id)

    @classmethod
    def parse(cls, r: _Reader) -> Status:
        m = cls(*r.take("<BIIII"))
        if m.state not in STATES:
            raise ProtocolError(f"unknown state {m.state}")
        for name in ("uptime_s", "free_heap", "round_id", "model_id"):
            _u30(name, getattr(m, name))
        return m


@dataclass(frozen=True)
class Ping:
    """Host -> device: reply with a STATUS."""

    TYPE: ClassVar[int] = T_PING

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, r: _Reader) -> Ping:
        return cls()


@dataclass(frozen=True)
class Ack:
    """Either way: message ``ref_type`` about ``ref_id`` (model id, round id) was accepted."""

    TYPE: ClassVar[int] = T_ACK
    ref_type: int
    ref_id: int = 0

    def payload(self) -> bytes:
        _uint("ref_type", self.ref_type, 8)
        _u30("ref_id", self.ref_id)
        return struct.pack("<BI", self.ref_type, self.ref_id)

    @classmethod
    def parse(cls, r: _Reader) -> Ack:
        m = cls(*r.take("<BI"))
        _u30("ref_id", m.ref_id)
        return m


@dataclass(frozen=True)
class Error:
    """Either way: message ``ref_type`` about ``ref_id`` was rejected with ``code`` (E_*) and a short text."""

    TYPE: ClassVar[int] = T_ERROR
    code: int
    ref_type: int = 0
    ref_id: int = 0
    text: str = field(default="")

    def payload(self) -> bytes:
        _uint("code", self.code, 8)
        _uint("ref_type", self.ref_type, 8)
        _u30("ref_id", self.ref_id)
        return struct.pack("<BBI", self.code, self.ref_type, self.ref_id) + _ascii("text", self.text, MAX_ERROR_TEXT)

    @classmethod
    def parse(cls, r: _Reader) -> Error:
        code, ref_type, ref_id = r.take("<BBI")
        _u30("ref_id", ref_id)
        raw = r.rest()
        if len(raw) > MAX_ERROR_TEXT:
            raise ProtocolError("error text too long")
        try:
            return cls(code, ref_type, ref_id, raw.decode("ascii"))
        except UnicodeDecodeError:
            raise ProtocolError("error text is not ASCII") from None


Message = (Hello | ModelBegin | ModelChunk | ModelCommit | RoundStart | RoundResult | RoundUpdate | Signed | Status | Ping
           | Ack | Error)
MESSAGE_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (Hello, ModelBegin, ModelChunk, ModelCommit, RoundStart, RoundResult, RoundUpdate, Signed, Status, Ping,
                Ack, Error)
}


def encode(msg: Message) -> bytes:
    """The message's bytes: ``VERSION | TYPE | payload``. Raises :class:`ProtocolError` on out-of-range fields."""
    if type(msg) not in MESSAGE_TYPES.values():
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    return bytes((VERSION, msg.TYPE)) + msg.payload()


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse one message; raises :class:`ProtocolError` (and nothing else) on anything malformed."""
    data = bytes(data)
    if len(data) < 2:
        raise ProtocolError("message shorter than its 2-byte header")
    if data[0] != VERSION:
        raise ProtocolError(f"unsupported protocol version {data[0]}")
    cls = MESSAGE_TYPES.get(data[1])
    if cls is None:
        raise ProtocolError(f"unknown message type 0x{data[1]:02x}")
    r = _Reader(data, 2)
    msg = cls.parse(r)
    r.end()
    return msg


_NAMES = {T_HELLO: "HELLO", T_MODEL_BEGIN: "MODEL_BEGIN", T_MODEL_CHUNK: "MODEL_CHUNK", T_MODEL_COMMIT: "MODEL_COMMIT",
          T_ROUND_START: "ROUND_START", T_ROUND_RESULT: "ROUND_RESULT", T_ROUND_UPDATE: "ROUND_UPDATE",
          T_SIGNED: "SIGNED", T_STATUS: "STATUS", T_PING: "PING", T_ACK: "ACK", T_ERROR: "ERROR"}
STATE_NAMES = {ST_OFFLINE: "offline", ST_IDLE: "idle", ST_LOADING: "loading", ST_TRAINING: "training",
               ST_ERROR: "error"}
ERROR_NAMES = {E_BAD_MESSAGE: "BAD_MESSAGE", E_VERSION: "VERSION", E_UNSUPPORTED: "UNSUPPORTED", E_RANGE: "RANGE",
               E_NO_MEMORY: "NO_MEMORY", E_SEQUENCE: "SEQUENCE", E_HASH: "HASH", E_AUTH: "AUTH",
               E_NO_MODEL: "NO_MODEL", E_BUSY: "BUSY", E_INTERNAL: "INTERNAL"}


def describe(msg: Message) -> str:
    """One line for people (``toolchain fleet-status``, logs): the message's name and its fields that matter."""
    name = _NAMES.get(msg.TYPE, f"0x{msg.TYPE:02x}")
    if isinstance(msg, Hello):
        return (f"{name} {msg.device_id} board {msg.board} firmware '{msg.firmware}' caps 0x{msg.caps:02x} "
                f"session {msg.session} max_message {msg.max_message}")
    if isinstance(msg, Status):
        return (f"{name} {STATE_NAMES.get(msg.state, msg.state)} model {msg.model_id} version {msg.round_id} "
                f"uptime {msg.uptime_s}s heap {msg.free_heap}")
    if isinstance(msg, RoundStart):
        seed = f"seed 0x{msg.round_seed:08x}" if msg.round_seed is not None else f"{len(msg.seeds)} seeds"
        return f"{name} round {msg.round_id} k {msg.k} mu {msg.mu:.3g} lr {msg.lr:.3g} batch {msg.batch} {seed}"
    if isinstance(msg, RoundResult):
        return f"{name} round {msg.round_id} loss {msg.loss:.4f} n {msg.n_samples} k {len(msg.scalars)}"
    if isinstance(msg, RoundUpdate):
        big = max((abs(g) for g in msg.gbar), default=0.0)
        return f"{name} round {msg.round_id} lr {msg.lr:.3g} k {len(msg.gbar)} max|gbar| {big:.3g}"
    if isinstance(msg, Signed):
        try:
            inner = describe(decode(msg.inner))
        except ProtocolError as exc:
            inner = f"malformed ({exc})"
        return f"{name}[{inner}]"
    if isinstance(msg, ModelBegin):
        return f"{name} model {msg.model_id} size {msg.size} chunk {msg.chunk_size} fmt {msg.fmt} auth {msg.auth}"
    if isinstance(msg, ModelChunk):
        return f"{name} model {msg.model_id} index {msg.index} ({len(msg.data)} bytes)"
    if isinstance(msg, ModelCommit):
        return f"{name} model {msg.model_id} auth {msg.auth}"
    if isinstance(msg, Ack):
        return f"{name} {_NAMES.get(msg.ref_type, hex(msg.ref_type))} {msg.ref_id}"
    if isinstance(msg, Error):
        return (f"{name} {ERROR_NAMES.get(msg.code, msg.code)} about {_NAMES.get(msg.ref_type, hex(msg.ref_type))} "
                f"{msg.ref_id} '{msg.text}'")
    return name
