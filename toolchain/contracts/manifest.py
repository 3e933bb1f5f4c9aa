"""``manifest.json``: the contract between ``toolchain build`` and everything after it (spec: docs/manifest.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


def artifact_entry(root: Path, path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"path": str(path.relative_to(root)), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@dataclass
class Budget:
    ram_bytes: int
    flash_bytes: int
    ram_needed: int
    flash_needed: int
    deployed: dict[str, int] = field(default_factory=dict)  # file -> flash bytes it takes on the board
    kind: str = ""  # counting rule (toolchain.pipelines.select): "micropython", "tflm" or "onnx"
    ram_parts: dict[str, int] = field(default_factory=dict)  # what ram_needed counts, by part
    estimate: dict[str, Any] = field(default_factory=dict)  # the same figures estimated before training

    @property
    def fits(self) -> bool:
        return self.ram_needed <= self.ram_bytes and self.flash_needed <= self.flash_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


@dataclass
class Manifest:
    target: str
    algorithm: str
    dataset: str
    model: dict[str, Any]
    density: float
    accuracy: dict[str, float]
    int8_agreement: dict[str, Any]
    arena_bytes: int
    flash_bytes: int
    budget: Budget
    input: dict[str, Any]
    output: dict[str, Any]
    artifacts: dict[str, dict[str, Any]]
    config: dict[str, Any]
    board: dict[str, Any]
    timings_s: dict[str, float]
    toolchain_version: str
    manifest_version: int = MANIFEST_VERSION
    notes: list[str] = field(default_factory=list)
    # chance-level guard (toolchain.learning.fl.quality): chance, accuracy (int8 TFLite Micro), at_chance, message
    quality: dict[str, Any] = field(default_factory=dict)
    # for report.md (toolchain.pipelines.report): per prunable layer, the int8 confusion matrix, this build on every board
    layers: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    boards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget"] = self.budget.as_dict()
        return d

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2, sort_keys=False) + "\n")
