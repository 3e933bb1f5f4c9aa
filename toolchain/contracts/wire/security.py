"""Model bundles and round-parameter policy (docs/protocol.md, "Security").

A model is authenticated through its *bundle header* ``b"TMB1" | model_id u32 | fmt u8 | size u32 | sha256``
(45 bytes): Ed25519-signed for hosts/Jetsons, HMAC-SHA256 with a provisioned per-device key for MicroPython
ports (which cannot verify Ed25519 in their heap). Receivers reject unsigned or tampered models and
out-of-range round parameters.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from toolchain.contracts.wire.errors import ProtocolError
from toolchain.contracts.wire.messages import (
    AUTH_ED25519,
    AUTH_HMAC_SHA256,
    AUTH_NONE,
    E_AUTH,
    E_HASH,
    E_NO_MEMORY,
    E_RANGE,
    E_SEQUENCE,
    FMT_SMF,
    MAX_K,
    SIGNED_TAG_LEN,
    T_MODEL_COMMIT,
    Ack,
    Error,
    Message,
    ModelBegin,
    ModelChunk,
    ModelCommit,
    RoundStart,
    RoundUpdate,
    Signed,
    encode,
)

BUNDLE_MAGIC = b"TMB1"


def bundle_header(model_id: int, fmt: int, size: int, sha256: bytes) -> bytes:
    """The 45 bytes that the model's HMAC tag or Ed25519 signature covers."""
    if len(sha256) != 32:
        raise ProtocolError("sha256 must be 32 bytes")
    return BUNDLE_MAGIC + struct.pack("<IBI", model_id, fmt, size) + sha256


def hmac_tag(key: bytes, header: bytes) -> bytes:
    return hmac.new(key, header, hashlib.sha256).digest()


def device_key(master: bytes, device_id: str) -> bytes:
    """The per-device HMAC key provisioned on device ``device_id`` (its ``local.json`` ``key``, the Jetson agent's
    ``--round-key``): HMAC-SHA256(master, "tinyml-device-key" 0x00 id). The host keeps only ``master``; a device
    holds only its own key, so a key taken from one board neither signs models nor rounds for another."""
    return hmac.new(master, b"tinyml-device-key\x00" + device_id.encode("ascii"), hashlib.sha256).digest()


def _signed_input(device_id: str, session: int, inner: bytes) -> bytes:
    d = device_id.encode("ascii")
    return b"TMS1" + struct.pack("<HB", session & 0xFFFF, len(d)) + d + bytes(inner)


def seal(key: bytes, device_id: str, session: int, msg: Message | bytes) -> Signed:
    """``msg`` (ROUND_START / ROUND_UPDATE) for device ``device_id`` in boot session ``session``, tagged."""
    inner = encode(msg) if not isinstance(msg, bytes | bytearray) else bytes(msg)
    tag = hmac.new(key, _signed_input(device_id, session, inner), hashlib.sha256).digest()[:SIGNED_TAG_LEN]
    return Signed(tag, inner)


def unseal(key: bytes, device_id: str, session: int, msg: Signed) -> bytes | None:
    """The inner message bytes if the tag verifies (constant-time compare), else None."""
    want = hmac.new(key, _signed_input(device_id, session, msg.inner), hashlib.sha256).digest()[:SIGNED_TAG_LEN]
    return bytes(msg.inner) if hmac.compare_digest(want, bytes(msg.tag)) else None


@dataclass(frozen=True)
class Signer:
    """What the host signs models with: an HMAC key (MicroPython devices) or an Ed25519 private key."""

    hmac_key: bytes | None = None
    ed25519_key: Ed25519PrivateKey | None = None

    @property
    def auth(self) -> int:
        if self.ed25519_key is not None:
            return AUTH_ED25519
        return AUTH_HMAC_SHA256 if self.hmac_key is not None else AUTH_NONE

    def tag(self, header: bytes) -> bytes:
        if self.ed25519_key is not None:
            return self.ed25519_key.sign(header)
        if self.hmac_key is not None:
            return hmac_tag(self.hmac_key, header)
        return b""


def model_transfer(
    model: bytes, model_id: int, signer: Signer, *, chunk_size: int = 128, fmt: int = FMT_SMF
) -> list[ModelBegin | ModelChunk | ModelCommit]:
    """The messages that install ``model`` on a device: MODEL_BEGIN, the chunks in order, MODEL_COMMIT."""
    begin = ModelBegin(model_id, len(model), chunk_size, fmt, signer.auth)
    digest = hashlib.sha256(model).digest()
    chunks = [ModelChunk(model_id, i, model[i * chunk_size : (i + 1) * chunk_size]) for i in range(begin.n_chunks)]
    tag = signer.tag(bundle_header(model_id, fmt, len(model), digest))
    return [begin, *chunks, ModelCommit(model_id, digest, signer.auth, tag)]


@dataclass
class Verifier:
    """What a device trusts: a provisioned HMAC key and/or an Ed25519 public key. Unsigned is never accepted."""

    hmac_key: bytes | None = None
    ed25519_public: Ed25519PublicKey | None = None

    def check(self, header: bytes, auth: int, tag: bytes) -> bool:
        if auth == AUTH_HMAC_SHA256 and self.hmac_key is not None:
            return hmac.compare_digest(hmac_tag(self.hmac_key, header), tag)
        if auth == AUTH_ED25519 and self.ed25519_public is not None:
            try:
                self.ed25519_public.verify(tag, header)
                return True
            except InvalidSignature:
                return False
        return False


class ModelReceiver:
    """Receiving side of a model transfer (Jetsons/hosts; the MicroPython device follows the same rules).

    ``handle`` answers each MODEL_* message with None (keep going), an ACK (model committed; it is in
    ``model``) or an ERROR; a failed transfer is discarded whole.
    """

    def __init__(self, verifier: Verifier, max_size: int = 1 << 24) -> None:
        self.verifier = verifier
        self.max_size = max_size
        self.model: bytes | None = None
        self.model_id = 0
        self._begin: ModelBegin | None = None
        self._buf = bytearray()
        self._next = 0

    def handle(self, msg: ModelBegin | ModelChunk | ModelCommit) -> Ack | Error | None:
        if isinstance(msg, ModelBegin):
            if msg == self._begin:
                return None  # a repeat of the transfer in progress (QoS 1 re-delivers; devices do not drop it)
            if msg.size > self.max_size:
                return Error(E_NO_MEMORY, msg.TYPE, msg.model_id, "model too large")
            self._begin, self._buf, self._next = msg, bytearray(), 0
            return None
        b = self._begin
        if b is None or msg.model_id != b.model_id:
            return Error(E_SEQUENCE, msg.TYPE, msg.model_id, "no MODEL_BEGIN for this model")
        if isinstance(msg, ModelChunk):
            if msg.index < self._next:
                return None  # a repeat (QoS 1 redelivery); chunks are idempotent
            if msg.index != self._next or len(msg.data) > b.chunk_size or len(self._buf) + len(msg.data) > b.size:
                return self._fail(msg, E_SEQUENCE, "chunk out of order or too long")
            self._buf += msg.data
            self._next += 1
            return None
        if len(self._buf) != b.size:
            return self._fail(msg, E_SEQUENCE, "model incomplete")
        digest = hashlib.sha256(self._buf).digest()
        if not hmac.compare_digest(digest, msg.sha256):
            return self._fail(msg, E_HASH, "sha256 mismatch")
        if not self.verifier.check(bundle_header(b.model_id, b.fmt, b.size, digest), msg.auth, msg.tag):
            return self._fail(msg, E_AUTH, "unsigned or bad signature")
        self.model, self.model_id = bytes(self._buf), b.model_id
        self._begin, self._buf = None, bytearray()
        return Ack(T_MODEL_COMMIT, self.model_id)

    def _fail(self, msg: ModelChunk | ModelCommit, code: int, text: str) -> Error:
        self._begin, self._buf = None, bytearray()
        return Error(code, msg.TYPE, msg.model_id, text)


@dataclass(frozen=True)
class RoundLimits:
    """Round parameters a device accepts; devices narrow ``max_k`` etc. to what fits them."""

    max_k: int = MAX_K
    mu_min: float = 1e-7
    mu_max: float = 1.0
    lr_max: float = 10.0
    max_steps: int = 10000
    max_batch: int = 1024


def check_round(msg: RoundStart, limits: RoundLimits = RoundLimits()) -> Error | None:  # noqa: B008 - frozen
    """None if ``msg`` is within ``limits``, else the ERROR(E_RANGE) the device answers with."""
    problems = []
    if not 1 <= msg.k <= limits.max_k:
        problems.append("k")
    if not (math.isfinite(msg.mu) and limits.mu_min <= msg.mu <= limits.mu_max):
        problems.append("mu")
    if not (math.isfinite(msg.lr) and 0.0 <= msg.lr <= limits.lr_max):
        problems.append("lr")
    if not 1 <= msg.steps <= limits.max_steps:
        problems.append("steps")
    if not 1 <= msg.batch <= limits.max_batch:
        problems.append("batch")
    if not problems:
        return None
    return Error(E_RANGE, msg.TYPE, msg.round_id, "out of range: " + ",".join(problems))


def check_update(msg: RoundUpdate, limits: RoundLimits = RoundLimits()) -> Error | None:  # noqa: B008 - frozen
    """None if ROUND_UPDATE ``msg`` is within ``limits`` (K, ``0 <= lr <= lr_max``, finite scalars), else ERROR(RANGE)."""
    problems = []
    if not 1 <= len(msg.gbar) <= limits.max_k:
        problems.append("k")
    if not (math.isfinite(msg.lr) and 0.0 <= msg.lr <= limits.lr_max):
        problems.append("lr")
    if not all(math.isfinite(g) for g in msg.gbar):
        problems.append("gbar")
    if not problems:
        return None
    return Error(E_RANGE, msg.TYPE, msg.round_id, "out of range: " + ",".join(problems))
