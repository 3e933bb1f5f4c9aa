"""The wire encoding of model payloads between server and clients, used for byte accounting.

Byte counts in ``metrics.jsonl`` are ``len()`` of these blobs, not formulas. Layout (little-endian),
specified in ``docs/fl-wire-format.md``:

    b"TCW1" | u16 count | count x tensor
    tensor := u8 name_len | name | u8 encoding | u8 ndim | u32 dims[ndim] | payload
    encoding 0 DENSE      : f32 values[numel]
    encoding 1 KNOWN_MASK : f32 values[nnz]               (receiver already holds the mask)
    encoding 2 BITMAP     : u8 bitmap[ceil(numel/8)] | f32 values[nnz]
    encoding 3 INDEX      : u32 nnz | uI idx[nnz] | f32 values[nnz]   (I = 2 if numel <= 65536 else 4)

The sender picks BITMAP or INDEX, whichever is smaller, when the mask travels.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

DENSE, KNOWN_MASK, BITMAP, INDEX = 0, 1, 2, 3
MAGIC = b"TCW1"


def index_dtype(numel: int) -> np.dtype:
    return np.dtype("<u2") if numel <= 65536 else np.dtype("<u4")


def section_header(key: bytes, enc: int, dims: tuple[int, ...]) -> bytes:
    return struct.pack(f"<B{len(key)}sBB{len(dims)}I", len(key), key, enc, len(dims), *dims)


def _encode_one(name: str, t: torch.Tensor, mask: torch.Tensor | None, mask_travels: bool) -> bytes:
    arr = t.detach().cpu().float().numpy().ravel()
    key, dims = name.encode(), tuple(t.shape)
    if mask is None:
        return section_header(key, DENSE, dims) + arr.astype("<f4").tobytes()
    m = mask.detach().cpu().numpy().ravel().astype(bool)
    values = arr[m].astype("<f4").tobytes()
    if not mask_travels:
        return section_header(key, KNOWN_MASK, dims) + values
    bitmap = np.packbits(m, bitorder="little").tobytes()
    idx = np.flatnonzero(m).astype(index_dtype(m.size)).tobytes()
    if len(bitmap) <= 4 + len(idx):
        return section_header(key, BITMAP, dims) + bitmap + values
    return section_header(key, INDEX, dims) + struct.pack("<I", int(m.sum())) + idx + values


def encode(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
           mask_travels: bool = True) -> bytes:
    """Serialise ``tensors``; entries named in ``masks`` are sent sparse (only kept values)."""
    masks = masks or {}
    parts = [MAGIC, struct.pack("<H", len(tensors))]
    parts += [_encode_one(n, t, masks.get(n), mask_travels) for n, t in tensors.items()]
    return b"".join(parts)


def encode_sparse_vectors(entries: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]) -> bytes:
    """Serialise (flat indices, values, shape) triples, e.g. top-K gradients, with INDEX encoding."""
    parts = [MAGIC, struct.pack("<H", len(entries))]
    for name, (idx, val, shape) in entries.items():
        key = name.encode()
        numel = int(np.prod(shape))
        i = idx.detach().cpu().numpy().astype(index_dtype(numel))
        v = val.detach().cpu().float().numpy().astype("<f4")
        parts.append(section_header(key, INDEX, tuple(shape)))
        parts.append(struct.pack("<I", len(i)) + i.tobytes() + v.tobytes())
    return b"".join(parts)


def decode(blob: bytes, known_masks: dict[str, torch.Tensor] | None = None
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode`; returns (tensors, the masks that travelled in the payload)."""
    known_masks = known_masks or {}
    if blob[:4] != MAGIC:
        raise ValueError("not a TCW1 payload")
    (count,) = struct.unpack_from("<H", blob, 4)
    pos = 6
    tensors: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for _ in range(count):
        n = blob[pos]
        name = blob[pos + 1:pos + 1 + n].decode()
        pos += 1 + n
        enc, ndim = blob[pos], blob[pos + 1]
        dims = struct.unpack_from(f"<{ndim}I", blob, pos + 2)
        pos += 2 + 4 * ndim
        numel = int(np.prod(dims)) if dims else 1
        if enc == DENSE:
            vals = np.frombuffer(blob, "<f4", numel, pos)
            pos += 4 * numel
            tensors[name] = torch.from_numpy(vals.copy()).view(dims)
            continue
        if enc == KNOWN_MASK:
            m = known_masks[name].numpy().ravel().astype(bool)
        elif enc == BITMAP:
            nb = (numel + 7) // 8
            m = np.unpackbits(np.frombuffer(blob, np.uint8, nb, pos), bitorder="little")[:numel].astype(bool)
            pos += nb
        elif enc == INDEX:
            (nnz,) = struct.unpack_from("<I", blob, pos)
            dt = index_dtype(numel)
            idx = np.frombuffer(blob, dt, nnz, pos + 4).astype(np.int64)
            pos += 4 + nnz * dt.itemsize
            m = np.zeros(numel, bool)
            m[idx] = True
        else:
            raise ValueError(f"unknown encoding {enc} for {name}")
        nnz = int(m.sum())
        vals = np.frombuffer(blob, "<f4", nnz, pos)
        pos += 4 * nnz
        full = np.zeros(numel, np.float32)
        full[m] = vals
        tensors[name] = torch.from_numpy(full).view(dims)
        if enc != KNOWN_MASK:
            masks[name] = torch.from_numpy(m.copy()).view(dims)
    return tensors, masks
