"""Board profiles: one TOML file per board in ``hw/boards/``. Adding a board is adding a file."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

BOARDS_DIR = Path(__file__).with_name("boards")


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    arch: str
    runtime: str  # "micropython" or "onnxruntime"
    micropython: str
    mpy_march: str
    mpy_abi: int
    ram_bytes: int  # RAM available to the model (arena / activations, and weights where weights_in_ram)
    flash_bytes: int  # storage available to the model files
    numeric_formats: list[str]
    float_bits: int
    transports: list[str]
    default_transport: str
    serial_baud: int
    weights_in_ram: bool = False
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class UnknownBoard(KeyError):
    pass


def load_profile(path: Path) -> BoardProfile:
    data = tomllib.loads(path.read_text())
    known = set(BoardProfile.__dataclass_fields__)
    extra = {k: v for k, v in data.items() if k not in known}
    return BoardProfile(**{k: v for k, v in data.items() if k in known}, extra=extra)


def all_profiles() -> dict[str, BoardProfile]:
    profiles = (load_profile(p) for p in sorted(BOARDS_DIR.glob("*.toml")))
    return {p.name: p for p in profiles}


def get_profile(name: str) -> BoardProfile:
    profiles = all_profiles()
    if name not in profiles:
        raise UnknownBoard(name)
    return profiles[name]
