"""Dataset loaders: MNIST / Fashion-MNIST (idx ``.gz``) and CIFAR-10 (binary ``.bin`` or ``.bin.xz``).

Every loader validates file sizes, magic numbers and record counts, and raises
:class:`toolchain.contracts.errors.DataError` with a one-line fix when something is missing or corrupt.
Images are returned as uint8 NHWC arrays (raw pixels 0..255); the float preprocessing that the
model expects is described by :class:`Preprocessing` so devices can reproduce it from raw pixels.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.contracts.errors import DataError

EMBEDDED_MNIST = Path(__file__).with_name("mnist")


@dataclass(frozen=True)
class Preprocessing:
    """float_input = (raw / 255 - mean[c]) / std[c] for raw pixels 0..255, per channel c."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, images_u8: np.ndarray) -> np.ndarray:
        x = images_u8.astype(np.float32) / np.float32(255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def as_dict(self) -> dict:
        return {"scale": 1.0 / 255.0, "mean": list(self.mean), "std": list(self.std),
                "formula": "x = (raw * scale - mean[c]) / std[c]"}


@dataclass
class Dataset:
    """A labelled image dataset held in memory as uint8 NHWC arrays."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    preprocessing: Preprocessing

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"missing dataset file {path}; pass --data DIR pointing at a folder that holds it")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"corrupt gzip file {path} ({exc}); download it again") from None


def read_idx(path: Path, magic: int, count: int | None, item_shape: tuple[int, ...]) -> np.ndarray:
    raw = _read_gz(path)
    ndim = len(item_shape) + 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated ({len(raw)} bytes); download it again")
    got_magic, *dims = struct.unpack(f">I{ndim}I", raw[:header])
    if got_magic != magic:
        raise DataError(f"{path} is not an idx file of the expected kind (magic {got_magic:#x}, want {magic:#x})")
    if tuple(dims[1:]) != item_shape or (count is not None and dims[0] != count):
        raise DataError(f"{path} has shape {tuple(dims)}, expected ({count}, {', '.join(map(str, item_shape))})")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes after decompression, expected {expected}; download it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx_family(name: str, root: Path, mean: float, std: float) -> Dataset:
    def pair(prefix: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        x = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x803, count, (28, 28))
        y = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, count, ())
        if y.max() > 9:
            raise DataError(f"{root}/{prefix}-labels-idx1-ubyte.gz has labels outside 0..9; the file is corrupt")
        return x[..., None].copy(), y.astype(np.int64)

    x_tr, y_tr = pair("train", 60000)
    x_te, y_te = pair("t10k", 10000)
    return Dataset(name, x_tr, y_tr, x_te, y_te, 10, Preprocessing((mean,), (std,)))


def load_mnist(root: Path | None = None) -> Dataset:
    return _load_idx_family("mnist", Path(root) if root else EMBEDDED_MNIST, 0.0, 1.0)


def load_fashion_mnist(root: Path | None = None) -> Dataset:
    if root is None:
        raise DataError("fashion-mnist is not embedded; pass --data DIR with the four idx .gz files")
    return _load_idx_family("fashion-mnist", Path(root), 0.0, 1.0)


CIFAR_RECORD = 3073
CIFAR_RECORDS_PER_FILE = 10000


def _cifar_file(root: Path, stem: str) -> np.ndarray:
    plain, xz = root / f"{stem}.bin", root / f"{stem}.bin.xz"
    if plain.is_file():
        raw = plain.read_bytes()
        src = plain
    elif xz.is_file():
        try:
            raw = lzma.open(xz).read()
        except (lzma.LZMAError, EOFError, OSError) as exc:
            raise DataError(f"corrupt xz file {xz} ({exc}); download it again") from None
        src = xz
    else:
        raise DataError(f"missing CIFAR-10 file {stem}.bin (or .bin.xz) in {root}; pass --data DIR holding the binary version")
    if len(raw) != CIFAR_RECORD * CIFAR_RECORDS_PER_FILE:
        raise DataError(f"{src} holds {len(raw)} bytes, expected {CIFAR_RECORD * CIFAR_RECORDS_PER_FILE} (10000 records); download it again")
    rec = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    if rec[:, 0].max() > 9:
        raise DataError(f"{src} has labels outside 0..9; the file is corrupt")
    return rec


def load_cifar10(root: Path | None = None) -> Dataset:
    if root is None:
        raise DataError("cifar10 is not embedded; pass --data DIR with data_batch_1..5.bin[.xz] and test_batch.bin[.xz]")
    root = Path(root)
    train = np.concatenate([_cifar_file(root, f"data_batch_{i}") for i in range(1, 6)])
    test = _cifar_file(root, "test_batch")

    def split(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        return x, rec[:, 0].astype(np.int64)

    x_tr, y_tr = split(train)
    x_te, y_te = split(test)
    pre = Preprocessing((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    return Dataset("cifar10", x_tr, y_tr, x_te, y_te, 10, pre)


DATASETS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load ``name`` from ``data_dir`` (the embedded MNIST copy when ``name == 'mnist'`` and no dir is given)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    root = Path(data_dir) if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"--data {root} is not a directory; pass the folder that holds the {name} files")
    return DATASETS[name](root)
