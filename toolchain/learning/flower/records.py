"""Encoded payloads <-> named numpy arrays, the content of Flower's ``ArrayRecord`` (no ``flwr`` import here).

A ``TrainIns``/``TrainRes`` payload is ``meta JSON | TCW1 weights | TCW1 extras`` (toolchain/learning/fl/messages.py,
docs/fl-wire-format.md). :func:`split` lays every tensor of it out as its own array, exactly the values the
codec would carry: a dense tensor keeps its shape; a sparse one travels as its kept values (1-D float32)
plus, when its mask travels, ``NAME#bitmap`` (uint8) or ``NAME#index`` (uint16/32); top-K extras are
``extras/NAME`` + ``extras/NAME#index``. :func:`join` is the exact inverse (same bytes back), so the
receiver decodes with the class's own ``from_bytes`` and the engines stay bit-identical, while Flower
client mods see (and may change) real weight arrays: the kept values of the update.

Classes with their own byte layout (ZO rounds: seeds and scalars; NTK pruning bitmaps) carry no weights
tensor by tensor; their payload travels as one uint8 array named ``payload``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch

from toolchain.learning.fl import codec
from toolchain.learning.fl.messages import TrainIns, TrainRes, pack_blobs, unpack_blobs

EXTRAS = "extras/"
PAYLOAD = "payload"


def structured(cls: type) -> bool:
    """True for classes that use the standard ``TrainIns``/``TrainRes`` layout (subclasses included)."""
    return getattr(cls, "to_bytes", None) in (TrainIns.to_bytes, TrainRes.to_bytes)


def _split_tcw(blob: bytes, prefix: str, masks: dict[str, torch.Tensor], arrays: dict[str, np.ndarray]
               ) -> list[list[Any]]:
    if blob[:4] != codec.MAGIC:
        raise ValueError("not a TCW1 payload")
    (count,) = struct.unpack_from("<H", blob, 4)
    pos, layout = 6, []
    for _ in range(count):
        n = blob[pos]
        name = blob[pos + 1:pos + 1 + n].decode()
        pos += 1 + n
        enc, ndim = blob[pos], blob[pos + 1]
        dims = list(struct.unpack_from(f"<{ndim}I", blob, pos + 2))
        pos += 2 + 4 * ndim
        numel = int(np.prod(dims)) if dims else 1
        key = prefix + name
        if enc == codec.DENSE:
            nnz = numel
        elif enc == codec.KNOWN_MASK:
            nnz = int(masks[name].bool().sum())  # the blob does not say: the sender's mask does
        elif enc == codec.BITMAP:
            nb = (numel + 7) // 8
            bitmap = np.frombuffer(blob, np.uint8, nb, pos).copy()
            arrays[key + "#bitmap"] = bitmap
            nnz = int(np.unpackbits(bitmap, bitorder="little")[:numel].sum())
            pos += nb
        elif enc == codec.INDEX:
            (nnz,) = struct.unpack_from("<I", blob, pos)
            dt = codec.index_dtype(numel)
            arrays[key + "#index"] = np.frombuffer(blob, dt, nnz, pos + 4).copy()
            pos += 4 + nnz * dt.itemsize
        else:
            raise ValueError(f"unknown encoding {enc} for {name}")
        vals = np.frombuffer(blob, "<f4", nnz, pos).copy()
        pos += 4 * nnz
        arrays[key] = vals.reshape(dims) if enc == codec.DENSE else vals
        layout.append([name, int(enc), dims])
    return layout


def _join_tcw(layout: list[list[Any]], prefix: str, arrays: dict[str, np.ndarray]) -> bytes:
    parts = [codec.MAGIC, struct.pack("<H", len(layout))]
    for name, enc, dims in layout:
        key = prefix + name
        parts.append(codec.section_header(name.encode(), enc, tuple(dims)))
        if enc == codec.BITMAP:
            parts.append(np.asarray(arrays[key + "#bitmap"]).astype(np.uint8).tobytes())
        elif enc == codec.INDEX:
            numel = int(np.prod(dims)) if dims else 1
            idx = np.asarray(arrays[key + "#index"]).astype(codec.index_dtype(numel))
            parts.append(struct.pack("<I", len(idx)) + idx.tobytes())
        # a mod may hand back float64 (e.g. Flower's clipping): the wire format is float32
        parts.append(np.asarray(arrays[key]).astype("<f4").ravel().tobytes())
    return b"".join(parts)


def split(blob: bytes, cls: type, masks: dict[str, torch.Tensor] | None = None, float_masks: bool = False
          ) -> tuple[dict[str, np.ndarray], str]:
    """``blob`` (encoded by ``cls``, with ``masks`` the sender holds) -> (arrays, layout JSON for :func:`join`).

    ``float_masks``: bitmaps and indices as float64 (exact): Flower's clipping mods scale every array of
    the update in place, which numpy refuses for integer arrays (their update is zero, so nothing changes).
    """
    arrays: dict[str, np.ndarray] = {}
    if not structured(cls):
        arrays[PAYLOAD] = np.frombuffer(blob, np.uint8).copy()
        return arrays, json.dumps(None)
    meta, *sections = unpack_blobs(blob)
    layout: dict[str, Any] = {"meta": meta.decode(), "sections": []}
    for i, sec in enumerate(sections):  # TrainIns: weights; TrainRes: weights, extras (maybe empty)
        prefix = EXTRAS if i else ""
        layout["sections"].append(_split_tcw(sec, prefix, masks or {}, arrays) if sec else None)
    if float_masks:
        arrays = {k: v.astype(np.float64) if "#" in k else v for k, v in arrays.items()}
    return arrays, json.dumps(layout)


def join(arrays: dict[str, np.ndarray], layout_json: str) -> bytes:
    """The exact inverse of :func:`split` (keys not named in the layout, e.g. echoed masks, are ignored)."""
    layout = json.loads(layout_json)
    if layout is None:
        return np.asarray(arrays[PAYLOAD]).astype(np.uint8).tobytes()
    sections = [_join_tcw(sec, EXTRAS if i else "", arrays) if sec is not None else b""
                for i, sec in enumerate(layout["sections"])]
    return pack_blobs(layout["meta"].encode(), *sections)


def metrics_of(layout_json: str) -> dict[str, float]:
    """The numeric metrics of a ``TrainRes`` payload (for Flower's ``MetricRecord``)."""
    layout = json.loads(layout_json)
    if layout is None:
        return {}
    meta = json.loads(layout["meta"])
    out = {k: float(v) for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))}
    if "n" in meta:
        out["num-examples"] = int(meta["n"])
    return out
