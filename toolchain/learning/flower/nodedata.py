"""Node-local data: a SuperNode that holds only its own shard, in the file formats ``--data`` reads.

A shard folder holds the training split of one client only:
- ``mnist`` / ``fashion-mnist``: ``train-images-idx3-ubyte.gz`` + ``train-labels-idx1-ubyte.gz`` (idx, any
  number of samples);
- ``cifar10``: ``data_batch_1.bin`` (or ``.bin.xz``), more ``data_batch_N`` files optional (3073-byte records).

:func:`export_shards` cuts a run's dataset exactly as the in-process engine does (same partition, same
order) and writes one folder per client, so a deployment with node-local data gives the same results.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolchain.contracts.errors import ToolchainError
from toolchain.data.datasets import Dataset, Preprocessing, read_idx
from toolchain.data.partition import partition

if TYPE_CHECKING:
    from toolchain.learning.flower.driver import RunSpec

# The loaders' per-dataset normalisation (toolchain/data/datasets.py); a shard folder cannot go through them
# because they insist on the full split sizes.
PREPROCESSING = {"mnist": Preprocessing((0.0,), (1.0,)), "fashion-mnist": Preprocessing((0.0,), (1.0,)),
                 "cifar10": Preprocessing((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
CIFAR_RECORD = 3073


def _check(dataset: str) -> None:
    if dataset not in PREPROCESSING:
        raise ToolchainError(f"node-local data is not supported for dataset '{dataset}'; "
                             f"choose one of: {', '.join(PREPROCESSING)}")


def write_shard(folder: str | Path, dataset: str, x_u8: np.ndarray, y: np.ndarray) -> Path:
    """Write one client's training samples (uint8 NHWC images, labels) as a shard folder."""
    _check(dataset)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dataset == "cifar10":
        rec = np.concatenate([y.astype(np.uint8)[:, None],
                              x_u8.transpose(0, 3, 1, 2).reshape(len(y), -1).astype(np.uint8)], axis=1)
        (folder / "data_batch_1.bin").write_bytes(rec.tobytes())
        return folder
    n = len(y)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + np.ascontiguousarray(x_u8[..., 0], np.uint8).tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(struct.pack(">II", 0x801, n) + y.astype(np.uint8).tobytes())
    return folder


def read_shard(folder: str | Path, dataset: str) -> Dataset:
    """A shard folder as a ``Dataset`` (training split only; the test split is empty: evaluation is the
    server's)."""
    _check(dataset)
    root = Path(folder)
    if not root.is_dir():
        raise ToolchainError(f"local-data {root} is not a directory; give each SuperNode the folder with its shard")
    if dataset == "cifar10":
        files = sorted(root.glob("data_batch_*.bin")) or sorted(root.glob("data_batch_*.bin.xz"))
        if not files:
            raise ToolchainError(f"no data_batch_N.bin[.xz] in {root}")
        raw = b"".join(lzma.open(f).read() if f.suffix == ".xz" else f.read_bytes() for f in files)
        if len(raw) % CIFAR_RECORD:
            raise ToolchainError(f"{root}: CIFAR-10 records are {CIFAR_RECORD} bytes; the files hold {len(raw)}")
        rec = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
        x = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        y = rec[:, 0].astype(np.int64)
    else:
        x = read_idx(root / "train-images-idx3-ubyte.gz", 0x803, None, (28, 28))[..., None].copy()
        y = read_idx(root / "train-labels-idx1-ubyte.gz", 0x801, None, ()).astype(np.int64)
        if len(x) != len(y):
            raise ToolchainError(f"{root}: {len(x)} images but {len(y)} labels")
    return Dataset(dataset, x, y, x[:0], y[:0], 10, PREPROCESSING[dataset])


def export_shards(spec: RunSpec, out: str | Path) -> list[Path]:
    """Cut the run's training set as the in-process engine does (``Federation.from_dataset``: same
    partition, same order) and write ``out/node-I`` for every client I; returns the folders."""
    data, cfg = spec.dataset(), spec.config()
    parts = partition(data.y_train, cfg.clients, cfg.partition, cfg.seed, cfg.alpha, cfg.shards_per_client)
    return [write_shard(Path(out) / f"node-{i}", data.name, data.x_train[p], data.y_train[p])
            for i, p in enumerate(parts)]
