"""What travels each round, shaped like Flower's Message API: instructions down, results up.

The simulator moves these as bytes (``to_bytes``/``from_bytes``), so the byte counts it reports
are the real sizes of the encoded payloads and both sides work on decoded copies.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from toolchain.learning.fl import codec


def pack_blobs(*blobs: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def unpack_blobs(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


@dataclass
class TrainIns:
    """Server -> client: global weights (sparse under ``masks``), the masks when they changed, config."""

    round: int
    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    mask_travels: bool = True

    def to_bytes(self) -> bytes:
        meta = json.dumps({"round": self.round, "config": self.config}).encode()
        return pack_blobs(meta, codec.encode(self.weights, self.masks, self.mask_travels))

    @classmethod
    def from_bytes(cls, data: bytes, known_masks: dict[str, torch.Tensor]) -> TrainIns:
        meta_b, weights_b = unpack_blobs(data)
        meta = json.loads(meta_b)
        weights, travelled = codec.decode(weights_b, known_masks)
        return cls(meta["round"], weights, {**known_masks, **travelled}, meta["config"], bool(travelled))


@dataclass
class TrainRes:
    """Client -> server: trained weights (kept entries only), sample count, metrics, optional extras.

    ``extras`` holds sparse vectors as ``{name: (flat_indices, values, shape)}`` (e.g. top-K gradients).
    """

    client_id: int
    weights: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = field(default_factory=dict)

    def to_bytes(self, masks: dict[str, torch.Tensor]) -> bytes:
        meta = json.dumps({"client": self.client_id, "n": self.num_examples, "metrics": self.metrics}).encode()
        extras = codec.encode_sparse_vectors(self.extras) if self.extras else b""
        return pack_blobs(meta, codec.encode(self.weights, masks, mask_travels=False), extras)

    @classmethod
    def from_bytes(cls, data: bytes, masks: dict[str, torch.Tensor]) -> TrainRes:
        meta_b, weights_b, extras_b = unpack_blobs(data)
        meta = json.loads(meta_b)
        weights, _ = codec.decode(weights_b, masks)
        extras: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        if extras_b:
            dense, sparse_masks = codec.decode(extras_b)
            for name, m in sparse_masks.items():
                idx = torch.nonzero(m.flatten()).flatten()
                extras[name] = (idx, dense[name].flatten()[idx], tuple(m.shape))
        return cls(meta["client"], weights, meta["n"], meta["metrics"], extras)
