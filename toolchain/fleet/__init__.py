"""Host <-> device protocol (docs/protocol.md): messages, serial framing, serial and MQTT links, model security."""

from toolchain.contracts.wire.cobs import cobs_decode, cobs_encode
from toolchain.contracts.wire.crc import crc32
from toolchain.contracts.wire.errors import LinkError, ProtocolError
from toolchain.contracts.wire.framing import Frame, FrameDecoder, encode_frame
from toolchain.contracts.wire.messages import (
    VERSION,
    Ack,
    Error,
    Hello,
    Message,
    ModelBegin,
    ModelChunk,
    ModelCommit,
    Ping,
    RoundResult,
    RoundStart,
    RoundUpdate,
    Signed,
    Status,
    decode,
    encode,
)
from toolchain.contracts.wire.security import (
    ModelReceiver,
    RoundLimits,
    Signer,
    Verifier,
    bundle_header,
    check_round,
    check_update,
    device_key,
    model_transfer,
    seal,
    unseal,
)
from toolchain.fleet.mqtt_link import DeviceSlot, MqttConfig, MqttDevice, MqttHost, TlsOptions
from toolchain.fleet.serial_link import LinkStats, SerialLink

__all__ = [
    "VERSION", "Ack", "DeviceSlot", "Error", "Frame", "FrameDecoder", "Hello", "LinkError", "LinkStats", "Message",
    "ModelBegin", "ModelChunk", "ModelCommit", "ModelReceiver", "MqttConfig", "MqttDevice", "MqttHost", "Ping",
    "ProtocolError", "RoundLimits", "RoundResult", "RoundStart", "RoundUpdate", "SerialLink", "Signed", "Signer", "Status",
    "TlsOptions", "Verifier", "bundle_header", "check_round", "check_update", "cobs_decode", "cobs_encode", "crc32",
    "decode", "device_key", "encode", "encode_frame", "model_transfer", "seal", "unseal",
]
