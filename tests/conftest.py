"""Shared fixtures. Emulators and brokers are started by the fixtures of the tests that use them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["hil_plugin"]  # --board PORT|emulated for `pytest -m hil` (tests/hil_plugin.py)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TOOLCHAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mnist():
    from toolchain.data.datasets import load_dataset

    return load_dataset("mnist")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared datasets are not at {SHARED_DATA}")
    return SHARED_DATA
