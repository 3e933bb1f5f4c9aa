"""Host <-> device wire protocol (docs/protocol.md): COBS + CRC framing, messages, authentication (docs/fleet.md)."""
