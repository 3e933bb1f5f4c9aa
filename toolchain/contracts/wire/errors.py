"""Exceptions raised by the protocol codecs and links."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Malformed, unsupported or rejected protocol bytes. The only exception decoders raise."""


class LinkError(RuntimeError):
    """A transport could not deliver a message (no ack after all retries, link closed)."""
