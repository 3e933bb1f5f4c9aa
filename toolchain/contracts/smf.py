"""The sparse model file (``.smf``): the format's constants, opcodes, encodings and the reader/validator.

Layout and semantics: ``docs/sparse-model-format.md``. The writer (a full-int8 ``.tflite`` -> ``.smf``) and the
quantization arithmetic it shares with TFLite Micro live in the export layer: ``toolchain.export.smf_writer`` and
``toolchain.export.requant``. :data:`KERNELS` and :data:`DECODERS` name the device engine's module for each opcode
and weight encoding.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"SPMF"
VERSION = (1, 0)
HEADER = struct.Struct("<4sBBHIHHHHHH")  # magic, major, minor, flags, size, n_tensors, n_ops, n_buffers, in, out, scratch
TENSOR = struct.Struct("<HHHBbf")  # h, w, c, buffer, zero_point, scale
OP = struct.Struct("<BBHHHI")  # opcode, reserved, in0, in1, out, body_len
WEIGHTS = struct.Struct("<BBHIII")  # encoding, index_bytes, rows, cols, count, payload_len
NO_TENSOR = 0xFFFF

# opcodes
CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, MAX_POOL_2D, AVERAGE_POOL_2D, MEAN, ADD, PAD, RESHAPE, REQUANTIZE = range(1, 11)
OP_NAMES = {CONV_2D: "CONV_2D", DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D", FULLY_CONNECTED: "FULLY_CONNECTED",
            MAX_POOL_2D: "MAX_POOL_2D", AVERAGE_POOL_2D: "AVERAGE_POOL_2D", MEAN: "MEAN", ADD: "ADD", PAD: "PAD",
            RESHAPE: "RESHAPE", REQUANTIZE: "REQUANTIZE"}
# weight encodings
DENSE, BITMAP, CSR, RLE = range(4)
ENCODING_NAMES = {DENSE: "dense", BITMAP: "bitmap", CSR: "csr", RLE: "rle"}

# The device engine (device_runtime/micropython) by opcode: (module, function) of the bytecode kernel; RESHAPE has
# none (the writer aliases its buffers). By weight encoding: the module whose load(d, p, rows, cols) decodes a
# weights block into rows. The one table: the engine's loaders carry generated copies (smf_tables.KERNELS,
# smf_bodies.DECODERS; toolchain.package.load.engine_tables writes them into every bundle, a test checks the
# repository's copies), and the bundles pick the modules a model needs from it (toolchain.package.load).
KERNELS = {CONV_2D: ("smf_conv", "conv"), DEPTHWISE_CONV_2D: ("smf_conv", "conv"), FULLY_CONNECTED: ("smf_fc", "fc"),
           MAX_POOL_2D: ("smf_maxpool", "maxpool"), AVERAGE_POOL_2D: ("smf_avgpool", "avgpool"),
           MEAN: ("smf_mean", "mean"), ADD: ("smf_elementwise", "add"), PAD: ("smf_elementwise", "pad"),
           REQUANTIZE: ("smf_elementwise", "requant")}
DECODERS = {DENSE: "smf_dec_dense", BITMAP: "smf_dec_bitmap", CSR: "smf_dec_csr", RLE: "smf_dec_rle"}


class SmfError(ValueError):
    """A model cannot be encoded, or bytes are not a valid sparse model file."""


# ---------------------------------------------------------------- weight blocks

def decode_weights(data: bytes, pos: int) -> tuple[np.ndarray, int, int]:
    """Decode a weights block at ``pos``: (int8 [rows, cols], encoding, end position)."""
    if pos + WEIGHTS.size > len(data):
        raise SmfError("truncated weights block header")
    enc, ib, rows, cols, count, plen = WEIGHTS.unpack_from(data, pos)
    pos += WEIGHTS.size
    if pos + plen > len(data):
        raise SmfError("truncated weights payload")
    p = np.frombuffer(data, np.uint8, plen, pos)
    n = rows * cols
    flat = np.zeros(n, np.int8)
    if enc == DENSE:
        if plen != n:
            raise SmfError(f"dense weights: {plen} bytes for {rows}x{cols}")
        flat[:] = p.view(np.int8)
    elif enc == BITMAP:
        nb = (n + 7) // 8
        mask = np.unpackbits(p[:nb], bitorder="little")[:n].astype(bool)
        if int(mask.sum()) != count or plen != nb + count:
            raise SmfError("bitmap weights: count does not match the bitmap")
        flat[mask] = p[nb:].view(np.int8)
    elif enc == CSR:
        if ib not in (1, 2) or plen != 2 * rows + (ib + 1) * count:
            raise SmfError("CSR weights: inconsistent sizes")
        counts = p[: 2 * rows].view("<u2").astype(np.int64)
        if int(counts.sum()) != count:
            raise SmfError("CSR weights: row counts do not add up to nnz")
        idx = p[2 * rows : 2 * rows + ib * count].view("<u1" if ib == 1 else "<u2").astype(np.int64)
        if count and int(idx.max()) >= cols:
            raise SmfError("CSR weights: column index out of range")
        row = np.repeat(np.arange(rows), counts)
        flat[row * cols + idx] = p[2 * rows + ib * count :].view(np.int8)
    elif enc == RLE:
        if plen != 2 * count:
            raise SmfError("RLE weights: inconsistent sizes")
        pos_ = -1
        for k in range(count):
            pos_ += int(p[2 * k]) + 1
            if pos_ >= n:
                raise SmfError("RLE weights: run past the end of the matrix")
            flat[pos_] = np.int8(p[2 * k + 1].view(np.int8))
    else:
        raise SmfError(f"unknown weight encoding {enc}")
    return flat.reshape(rows, cols), enc, pos + plen



# ---------------------------------------------------------------- smf -> python objects (tests, inspection)

@dataclass
class SmfTensor:
    shape: tuple[int, int, int]
    buffer: int
    zero_point: int
    scale: float


@dataclass
class SmfOp:
    opcode: int
    inputs: tuple[int, ...]
    output: int
    params: dict = field(default_factory=dict)
    weights: np.ndarray | None = None  # int8 [rows, cols]
    encoding: int | None = None
    weight_bytes: int = 0

    @property
    def name(self) -> str:
        return OP_NAMES[self.opcode]


@dataclass
class SmfModel:
    version: tuple[int, int]
    flags: int
    tensors: list[SmfTensor]
    ops: list[SmfOp]
    buffer_sizes: list[int]
    input: int
    output: int
    scratch: int

    def kept_weights(self) -> int:
        return sum(int(np.count_nonzero(op.weights)) for op in self.ops if op.weights is not None)


def check_smf(data: bytes) -> None:
    """Raise :class:`SmfError` unless ``data`` has a valid header, length and CRC32."""
    if len(data) < HEADER.size + 4:
        raise SmfError(f"not a sparse model file: {len(data)} bytes is shorter than the header")
    magic, major, _, flags, size = HEADER.unpack_from(data, 0)[:5]
    if magic != MAGIC:
        raise SmfError(f"not a sparse model file: magic {magic!r}, expected {MAGIC!r}")
    if major != VERSION[0]:
        raise SmfError(f"sparse model file version {major} is not supported (this reader knows {VERSION[0]})")
    if flags != 0:
        raise SmfError(f"unknown flags 0x{flags:04x} in the sparse model header")
    if size != len(data):
        raise SmfError(f"truncated or padded sparse model file: header says {size} bytes, got {len(data)}")
    want = struct.unpack_from("<I", data, size - 4)[0]
    if zlib.crc32(data[: size - 4]) & 0xFFFFFFFF != want:
        raise SmfError("sparse model file is corrupt: CRC32 mismatch")


def read_smf(data: bytes) -> SmfModel:
    """Decode and validate a sparse model file."""
    data = bytes(data)
    check_smf(data)
    _, major, minor, flags, size, nt, no, nb, inp, out, scratch = HEADER.unpack_from(data, 0)
    pos = HEADER.size
    try:
        buffer_sizes = list(struct.unpack_from(f"<{nb}I", data, pos))
        pos += 4 * nb
        tensors = []
        for _ in range(nt):
            h, w, c, buf, zp, scale = TENSOR.unpack_from(data, pos)
            tensors.append(SmfTensor((h, w, c), buf, zp, scale))
            pos += TENSOR.size
        ops = []
        for _ in range(no):
            code, _, a, b, y, blen = OP.unpack_from(data, pos)
            pos += OP.size
            body_end = pos + blen
            if body_end > size - 4:
                raise SmfError("operator body runs past the end of the file")
            ops.append(_decode_op(data, pos, code, a, b, y, tensors))
            pos = body_end
    except struct.error as exc:
        raise SmfError(f"sparse model file is truncated: {exc}") from exc
    if pos != size - 4:
        raise SmfError(f"{size - 4 - pos} unexpected bytes after the last operator")
    return SmfModel((major, minor), flags, tensors, ops, buffer_sizes, inp, out, scratch)


def _decode_op(data: bytes, pos: int, code: int, a: int, b: int, y: int, tensors: list[SmfTensor]) -> SmfOp:
    ins = (a,) if b == NO_TENSOR else (a, b)
    for t in (*ins, y):
        if t >= len(tensors):
            raise SmfError(f"operator refers to tensor {t}, the file has {len(tensors)}")
    op = SmfOp(code, ins, y)
    if code in (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED):
        if code != FULLY_CONNECTED:
            kh, kw, sh, sw, pt, pl, mult, _ = struct.unpack_from("<8B", data, pos)
            op.params.update(kh=kh, kw=kw, stride=(sh, sw), pad=(pt, pl), depth_multiplier=mult)
            pos += 8
        lo, hi, _ = struct.unpack_from("<bbH", data, pos)
        pos += 4
        rows = tensors[y].shape[2]
        op.params.update(act=(lo, hi))
        op.params["bias"] = np.frombuffer(data, "<i4", rows, pos)
        op.params["multiplier"] = np.frombuffer(data, "<i4", rows, pos + 4 * rows)
        op.params["shift"] = np.frombuffer(data, np.int8, rows, pos + 8 * rows)
        start = pos + 9 * rows
        op.weights, op.encoding, end = decode_weights(data, start)
        op.weight_bytes = end - start
        if op.weights.shape[0] != rows:
            raise SmfError(f"{op.name}: {op.weights.shape[0]} weight rows for {rows} output channels")
    elif code in (MAX_POOL_2D, AVERAGE_POOL_2D):
        fh, fw, sh, sw, pt, pl, lo, hi = struct.unpack_from("<BBBBBBbb", data, pos)
        op.params.update(filter=(fh, fw), stride=(sh, sw), pad=(pt, pl), act=(lo, hi))
    elif code == MEAN:
        m, s = struct.unpack_from("<ib", data, pos)
        op.params.update(multiplier=m, shift=s)
    elif code == ADD:
        m1, m2, mo, s1, s2, so, ls, lo, hi, _ = struct.unpack_from("<iiibbbBbbH", data, pos)
        op.params.update(multipliers=(m1, m2, mo), shifts=(s1, s2, so), left_shift=ls, act=(lo, hi))
    elif code == PAD:
        t, bo, le, ri, v = struct.unpack_from("<BBBBb", data, pos)
        op.params.update(pads=(t, bo, le, ri), value=v)
    elif code == REQUANTIZE:
        m, s = struct.unpack_from("<ib", data, pos)
        op.params.update(multiplier=m, shift=s)
    elif code != RESHAPE:
        raise SmfError(f"unknown opcode {code}")
    return op
