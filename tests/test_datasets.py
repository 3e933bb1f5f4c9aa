"""Dataset loaders: embedded MNIST, user directories, and clear failures on missing/corrupt files."""

import gzip
import lzma
import shutil

import numpy as np
import pytest

from toolchain.contracts.errors import DataError
from toolchain.data.datasets import load_dataset


def test_embedded_mnist_is_complete(mnist):
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.x_train.dtype == np.uint8
    # official class counts (shared/data/README.md)
    assert np.bincount(mnist.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.preprocessing.apply(mnist.x_test[:1]).max() <= 1.0


def test_fashion_mnist_from_user_dir(shared_data):
    d = load_dataset("fashion-mnist", shared_data / "fashion-mnist")
    assert np.bincount(d.y_train).tolist() == [6000] * 10


def test_cifar10_reads_xz_and_plain_bin(shared_data, tmp_path):
    src = shared_data / "cifar10"
    for f in src.glob("*.xz"):
        if f.name.startswith("test"):
            (tmp_path / "test_batch.bin").write_bytes(lzma.open(f).read())  # a plain .bin
        else:
            shutil.copy(f, tmp_path / f.name)
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (50000, 32, 32, 3) and np.bincount(d.y_test).tolist() == [1000] * 10


def test_missing_and_corrupt_files_fail_clearly(tmp_path, shared_data):
    with pytest.raises(DataError, match="missing dataset file"):
        load_dataset("fashion-mnist", tmp_path)
    for f in (shared_data / "mnist").iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as g:
        g.write(raw[:-100])  # truncated
    with pytest.raises(DataError, match="shape|bytes"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_cifar_wrong_record_count(tmp_path):
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}.bin").write_bytes(b"\0" * 3073 * 10)
    with pytest.raises(DataError, match="10000 records"):
        load_dataset("cifar10", tmp_path)
