"""Board profiles: one TOML file per board. Adding a board is adding a file.

Where profiles come from, later ones overriding earlier ones of the same name:
1. ``toolchain/boards/builtin/*.toml`` (shipped);
2. every folder in the ``TOOLCHAIN_BOARDS`` environment variable (``os.pathsep``-separated), ``*.toml``;
3. ``--board-file FILE`` of ``toolchain build`` (:func:`load_profile`).

Every file is validated (:func:`parse_profile`): a missing key, a wrong type or a negative size is one
line naming the file and the key (docs/boards/README.md, "Your own board").
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolchain.contracts.errors import ToolchainError

BOARDS_DIR = Path(__file__).with_name("builtin")
BOARDS_ENV = "TOOLCHAIN_BOARDS"
RUNTIMES = ("micropython", "onnxruntime", "tflite-micro")


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    arch: str
    runtime: str  # "micropython", "onnxruntime" or "tflite-micro"
    micropython: str
    mpy_march: str
    mpy_abi: int
    ram_bytes: int  # heap/RAM left for the model once the runtime is loaded (toolchain.pipelines.select counts against it)
    flash_bytes: int  # storage available to the model files
    numeric_formats: list[str]
    float_bits: int
    transports: list[str]
    default_transport: str
    serial_baud: int
    weights_in_ram: bool = False
    clock_hz: int = 0  # core clock for the latency estimate (toolchain.boards.latency); 0: unknown / not applicable
    aliases: list[str] = field(default_factory=list)  # other names --target accepts (e.g. "jetson")
    source: str = ""  # the file it was read from
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class UnknownBoard(KeyError):
    pass


class BoardError(ToolchainError):
    """A board file that cannot be used (exit 2)."""


# key -> (type, default); no default = required. Types are checked exactly (a bool is not an int here).
_SCHEMA: dict[str, tuple[type, Any]] = {
    "name": (str, None),
    "description": (str, None),
    "arch": (str, None),
    "runtime": (str, None),
    "ram_bytes": (int, None),
    "flash_bytes": (int, None),
    "micropython": (str, ""),
    "mpy_march": (str, ""),
    "mpy_abi": (int, 0),
    "numeric_formats": (list, ["int8"]),
    "float_bits": (int, 32),
    "transports": (list, ["serial"]),
    "default_transport": (str, ""),
    "serial_baud": (int, 115200),
    "weights_in_ram": (bool, False),
    "clock_hz": (int, 0),
    "aliases": (list, []),
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def parse_profile(data: dict[str, Any], source: str) -> BoardProfile:
    """Validate one board's TOML table; BoardError names the file and the first problem."""
    def bad(msg: str) -> BoardError:
        return BoardError(f"board file {source}: {msg}; see docs/boards/README.md (Your own board)")

    values: dict[str, Any] = {}
    for key, (typ, default) in _SCHEMA.items():
        if key not in data:
            if default is None:
                raise bad(f"missing key '{key}'")
            values[key] = list(default) if isinstance(default, list) else default
            continue
        v = data[key]
        if type(v) is not typ:
            raise bad(f"'{key}' must be {'an integer' if typ is int else 'a ' + typ.__name__}, got {v!r}")
        if typ is list and not all(isinstance(x, str) for x in v):
            raise bad(f"'{key}' must be a list of strings, got {v!r}")
        values[key] = v
    for key in ("ram_bytes", "flash_bytes"):
        if values[key] <= 0:
            raise bad(f"'{key}' must be a positive number of bytes, got {values[key]}")
    for key in ("mpy_abi", "float_bits", "serial_baud", "clock_hz"):
        if values[key] < 0:
            raise bad(f"'{key}' must not be negative, got {values[key]}")
    if not _NAME.match(values["name"]):
        raise bad(f"'name' must be lower-case letters, digits, '.', '-' or '_', got {values['name']!r}")
    if values["runtime"] not in RUNTIMES:
        raise bad(f"'runtime' must be one of {', '.join(RUNTIMES)}, got {values['runtime']!r}")
    if values["runtime"] == "micropython" and not values["micropython"]:
        raise bad("'micropython' (the firmware version, e.g. \"1.29.0\") is required for runtime micropython")
    if not values["transports"]:
        raise bad("'transports' must name at least one of serial, mqtt")
    values["default_transport"] = values["default_transport"] or values["transports"][0]
    if values["default_transport"] not in values["transports"]:
        raise bad(f"'default_transport' {values['default_transport']!r} is not in 'transports' {values['transports']}")
    extra = {k: v for k, v in data.items() if k not in _SCHEMA}
    return BoardProfile(**values, source=source, extra=extra)


def load_profile(path: Path) -> BoardProfile:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BoardError(f"cannot read board file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BoardError(f"board file {path} is not valid TOML ({exc})") from None
    return parse_profile(data, str(path))


def board_dirs() -> list[Path]:
    """Shipped boards first, then the folders of ``TOOLCHAIN_BOARDS``."""
    user = [Path(p).expanduser() for p in os.environ.get(BOARDS_ENV, "").split(os.pathsep) if p]
    for d in user:
        if not d.is_dir():
            raise BoardError(f"{BOARDS_ENV} names {d}, which is not a folder; fix or unset it")
    return [BOARDS_DIR, *user]


def all_profiles() -> dict[str, BoardProfile]:
    profiles: dict[str, BoardProfile] = {}
    for d in board_dirs():
        for p in sorted(d.glob("*.toml")):
            prof = load_profile(p)
            profiles[prof.name] = prof
    return profiles


def resolve(name: str, profiles: dict[str, BoardProfile]) -> BoardProfile:
    if name in profiles:
        return profiles[name]
    for prof in profiles.values():
        if name in prof.aliases:
            return prof
    raise UnknownBoard(name)


def get_profile(name: str) -> BoardProfile:
    """The profile called ``name`` or having it among its ``aliases``."""
    return resolve(name, all_profiles())
