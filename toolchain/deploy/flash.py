"""``toolchain flash``: put a build's on-device bundle on a board and verify it.

* MicroPython boards (ESP32, RP2040, the emulated WebAssembly board): ``mpremote`` copies the bundle;
  ``.mpy`` files are used only when their version/arch match the board's ``sys.implementation._mpy``,
  else the ``.py`` next to them (with a warning).
* micro:bit v1: ``microfs`` over the serial port (works on the QEMU micro:bit); the ``.hex`` in the
  bundle can instead be copied to the MICROBIT USB drive (docs/boards/microbit.md).
* Jetson: a ``.tar.gz`` with an ``install.sh`` (copy it to the Jetson and run it).
* ``--firmware IMAGE`` first writes a MicroPython firmware to an ESP32 with ``esptool`` (v5, subprocess).
* ``--device-id ID --key-master FILE`` also provisions the fleet identity ``app_boot.py`` reads: ``local.json``
  (id, the device's own key ``device_key(master, id)``, model id) and ``model.tag`` (docs/fleet.md, "Provisioning
  at flash time").

Every check (port, board identity, firmware version, ``.mpy`` compatibility, size) runs before the first
byte is written, so a failing flash leaves the board as it was. After copying, every file is verified by
sha256 (computed on the board when it has ``hashlib``, else read back and hashed here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolchain.boards.profiles import BoardProfile, UnknownBoard, get_profile
from toolchain.contracts.errors import BudgetError, ToolchainError
from toolchain.contracts.paths import MICROPYTHON_ENGINE
from toolchain.contracts.wire.security import device_key
from toolchain.deploy.flash_board import (
    EMULATED_PLATFORMS,
    PLATFORMS,
    BoardInfo,
    board_sha256,
    connect,
    identify,
    list_files,
    read_file,
)
from toolchain.deploy.repl import RawRepl, ReplError
from toolchain.package.bundle import check_device_id, model_tag, provisioned_local
from toolchain.package.load import (
    Bundle,
    Log,
    jetson_archive,
    load_bundle,
    mpy_compatible,
    mpy_header,
    stored_size,
)

ENGINE_DIR = MICROPYTHON_ENGINE
ESP_FIRMWARE_OFFSET = {"esp32": "0x1000", "esp32s3": "0x0"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_build(target: str | None, build: str | None) -> tuple[Path, dict, BoardProfile]:
    """(build folder, manifest, board profile) for ``--target``/``--build``, with one-line errors."""
    if target is None and build is None:
        raise ToolchainError("give --target T (uses build/T) or --build DIR; run `toolchain build --target T` first")
    build_dir = Path(build) if build else Path("build") / str(target)
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ToolchainError(f"no manifest.json in {build_dir}; run `toolchain build --target {target or 'T'}` "
                             "(or pass the build folder with --build)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolchainError(f"{manifest_path} is not valid JSON ({exc.msg}); rebuild with `toolchain build`") from None
    name = target or manifest.get("target")
    if target and manifest.get("target") not in (None, target):
        raise ToolchainError(f"{build_dir} was built for {manifest.get('target')}, not {target}; "
                             f"pass --build build/{target} or rebuild")
    try:
        profile = get_profile(str(name))
    except UnknownBoard:
        raise ToolchainError(f"unknown target '{name}'; see `toolchain targets`") from None
    return build_dir, manifest, profile


# --- .mpy compatibility ------------------------------------------------------------------------------

def select_for_board(bundle: Bundle, info: BoardInfo, log: Log = _stderr) -> dict[str, bytes]:
    """Pick ``.mpy`` or ``.py`` per module for this board.

    A ``.mpy`` the board cannot import is replaced by its ``.py`` (from the bundle, else the runtime source in
    ``device_runtime/micropython``), with a warning: the board then compiles it (more heap, slower import).
    """
    out: dict[str, bytes] = {}
    fallback = []
    for name, data in bundle.files.items():
        if not name.endswith(".mpy"):
            if not (name.endswith(".py") and name[:-3] + ".mpy" in bundle.files
                    and mpy_compatible(bundle.files[name[:-3] + ".mpy"], info.mpy)):
                out[name] = data
            continue
        if mpy_compatible(data, info.mpy):
            out[name] = data
            continue
        py = name[:-4] + ".py"
        if py in bundle.files:
            pass  # already taken above
        elif (ENGINE_DIR / py).is_file():
            out[py] = (ENGINE_DIR / py).read_bytes()
        else:
            head = mpy_header(data)
            raise ToolchainError(
                f"{name} is .mpy version {head[0] if head else '?'} but the board ({info.describe()}) cannot "
                "import it and there is no .py for it; rebuild the bundle for this firmware")
        fallback.append(name)
    if fallback:
        head = mpy_header(bundle.files[fallback[0]])
        have = f"mpy {info.mpy & 0xFF}.{(info.mpy >> 8) & 3}" if info.mpy else "no .mpy support"
        log(f"warning: the board's MicroPython {info.version_text} ({have}) cannot import the bundle's .mpy files "
            f"(version {head[0] if head else '?'}.{head[1] if head else '?'}); copying the .py sources instead "
            f"({len(fallback)} modules, compiled on the board: more heap, slower start)")
    return out


# --- checks before writing ---------------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:3] if x.isdigit())


def check_board(info: BoardInfo, profile: BoardProfile) -> list[str]:
    """Raise if the board runs the wrong firmware for ``profile``; return notes."""
    want = PLATFORMS.get(profile.name, profile.name)
    notes = []
    if profile.runtime != "micropython":
        raise ToolchainError(f"target {profile.name} does not run MicroPython; `toolchain flash --target "
                             f"{profile.name}` writes an install archive instead (omit --port)")
    need = _version(profile.micropython)
    if info.platform == want:
        if profile.name == "microbit" and info.version[:2] != need[:2]:
            raise ToolchainError(f"the board on {info.port} runs MicroPython {info.version_text}, the microbit target "
                                 f"expects {profile.micropython} (micro:bit v1); flash the v1 firmware "
                                 "(docs/boards/microbit.md) or use a profile for this board")
        elif profile.name != "microbit" and info.version < (1, 12, 0):
            raise ToolchainError(f"the board on {info.port} runs MicroPython {info.version_text}, too old for the "
                                 f"{profile.name} runtime; flash MicroPython >= {profile.micropython} "
                                 f"(`toolchain flash --firmware IMAGE`, docs/boards/{profile.name}.md)")
    elif info.platform in EMULATED_PLATFORMS and profile.name != "microbit" and info.version[:2] >= need[:2]:
        notes.append(f"emulated board ({info.platform}, MicroPython {info.version_text}) stands in for {profile.name}")
    else:
        raise ToolchainError(f"the board on {info.port} is {info.platform} with MicroPython {info.version_text}, "
                             f"not the firmware target {profile.name} expects ({want}, MicroPython {profile.micropython}); "
                             f"pass the right --target or flash {profile.name}'s firmware (docs/boards/{profile.name}.md)")
    return notes


def check_size(files: dict[str, bytes], info: BoardInfo, profile: BoardProfile, existing: dict[str, int]) -> None:
    total = sum(stored_size(n, b, profile) for n, b in files.items())
    budget = profile.flash_bytes
    if total > budget:
        raise BudgetError(f"the bundle is {total} B, more than the {budget} B {profile.name} has for model files; "
                          f"prune harder (--density) or pick a smaller --model, then rebuild")
    if info.fs_free >= 0:
        reclaimed = sum(existing.get(n, 0) for n in files)
        if total > info.fs_free + reclaimed:
            raise BudgetError(f"the bundle is {total} B but the board's file system has {info.fs_free} B free; "
                              "delete files on the board (mpremote fs rm) or shrink the model")


# --- copying -----------------------------------------------------------------------------------------

def _copy_mpremote(port: str, files: dict[str, bytes], log: Log, timeout: float) -> None:
    mpremote = shutil.which("mpremote") or str(Path(sys.executable).with_name("mpremote"))
    if not Path(mpremote).exists() and shutil.which("mpremote") is None:
        raise ToolchainError("mpremote is not installed; `pip install mpremote`")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [mpremote, "connect", port]
        dirs = sorted({str(Path(n).parent) for n in files if "/" in n})
        for d in dirs:
            cmd += ["exec", f"import os\ntry:\n os.mkdir({d!r})\nexcept OSError:\n pass", "+"]
        for name, data in files.items():
            local = Path(tmp) / name.replace("/", "__")
            local.write_bytes(data)
            cmd += ["fs", "cp", str(local), f":{name}", "+"]
        cmd = cmd[:-1]
        log(f"mpremote: copying {len(files)} files ({sum(map(len, files.values()))} B)")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        start = time.monotonic()
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-5:]
                if line.startswith("cp "):
                    log(f"  {line}")
            if time.monotonic() - start > timeout:
                proc.kill()
                break
        rc = proc.wait()
        if rc != 0:
            last = next((t for t in reversed(tail) if t.strip()), "no output")
            raise ToolchainError(f"mpremote failed to copy the bundle to {port} ({last[:160]}); reset the board and "
                                 "retry (if it keeps failing: docs/boards/, 'could not enter raw repl')")


def _copy_microfs(repl: RawRepl, files: dict[str, bytes], log: Log) -> None:
    import microfs
    import serial

    port = repl.serial.port
    repl.close()
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, serial.Serial(port, 115200, timeout=10, parity="N") as ser:
        for i, (name, data) in enumerate(files.items(), 1):
            if "/" in name:
                raise ToolchainError(f"the micro:bit file system is flat; bundle file {name} is in a folder")
            local = Path(tmp) / name
            local.write_bytes(data)
            log(f"  [{i}/{len(files)}] {name} ({len(data)} B)")
            try:
                microfs.put(str(local), target=name, serial=ser)
            except Exception as exc:  # noqa: BLE001 - microfs raises bare IOError/ValueError on a bad copy
                log(f"    microfs: {str(exc).strip()[:80]}; will copy it through the raw REPL")
                failed.append(name)
    for name in failed:
        _put_repl(repl, name, files[name])


def _reopen(repl: RawRepl) -> None:
    if not repl.serial.is_open:
        repl.serial.open()
        repl.in_raw = False
    if not repl.in_raw:
        try:
            repl.enter_raw()
        except ReplError:
            raise ToolchainError(f"the board on {repl.serial.port} stopped answering after the copy; reset it and "
                                 "run the flash again") from None


def _put_repl(repl: RawRepl, name: str, data: bytes) -> None:
    _reopen(repl)
    try:
        repl.put_file(name, data)
    except ReplError as exc:
        raise ToolchainError(f"copying {name} failed ({str(exc).splitlines()[0][:120]}); reset the board and retry") from None


def verify(repl: RawRepl, info: BoardInfo, files: dict[str, bytes], log: Log) -> dict[str, str]:
    """sha256 of each file on the board; raise if any differs."""
    got = {}
    where = "on the board" if info.has_sha256 else "read back, hashed on the host"
    for name, data in files.items():
        want = hashlib.sha256(data).hexdigest()
        have = board_sha256(repl, name, info)
        got[name] = have
        if have != want:
            raise ToolchainError(f"verification failed: {name} on the board has sha256 {have[:12]}, expected "
                                 f"{want[:12]}; flash again (a noisy cable or a full file system)")
    log(f"verified {len(files)} files by sha256 ({where})")
    return got


# --- esptool -----------------------------------------------------------------------------------------

def write_firmware(port: str, image: Path, profile: BoardProfile, log: Log = _stderr, timeout: float = 300) -> None:
    """Write a MicroPython firmware image to an ESP32 with esptool v5 (subprocess)."""
    if profile.name not in ESP_FIRMWARE_OFFSET:
        raise ToolchainError(f"--firmware writes ESP32 firmware with esptool; for {profile.name} see "
                             f"docs/boards/{profile.name}.md")
    if not image.is_file():
        raise ToolchainError(f"firmware image {image} not found; download it from micropython.org/download")
    esptool = shutil.which("esptool") or str(Path(sys.executable).with_name("esptool"))
    if not Path(esptool).exists():
        raise ToolchainError("esptool is not installed; `pip install esptool` (v5)")
    cmd = [esptool, "--port", port, "--baud", "460800", "--before", "default-reset", "--after", "hard-reset",
           "write-flash", "-z", ESP_FIRMWARE_OFFSET[profile.name], str(image)]
    log("esptool: " + " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            if "Writing at" in line or "Wrote" in line or "Hash of data verified" in line or "Chip is" in line:
                log(f"  {line.strip()}")
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise ToolchainError(f"esptool did not finish within {timeout:.0f} s on {port}; reset the board and retry") from None
    if rc != 0:
        text = "\n".join(lines)
        if "Wrong boot mode" in text or "boot mode" in text.lower():
            raise ToolchainError(f"the ESP32 on {port} is not in download mode (wrong boot mode); hold BOOT, press "
                                 "RESET, release BOOT and retry (docs/boards/esp32.md)")
        if "could not open port" in text.lower() or "No such file" in text:
            raise ToolchainError(f"esptool cannot open {port}; check the port and the udev rules in docs/boards/esp32.md")
        last = next((t for t in reversed(lines) if t.strip()), "no output").strip()
        raise ToolchainError(f"esptool failed on {port} ({last[:140]}); see docs/boards/esp32.md")
    log("firmware written; waiting for MicroPython to boot")
    time.sleep(3.0)


# --- Jetson ------------------------------------------------------------------------------------------

# --- provisioning: the device's key and model.tag (docs/fleet.md, "Provisioning at flash time") ---------------

MASTER_KEY_MAX = 4096  # the same bound as serve's --hmac-key


@dataclass(frozen=True)
class Provision:
    """What ``--device-id`` + ``--key-master`` add to the bundle. Only the derived key is kept: the master never
    leaves the host, so a board that is taken apart gives away its own key and nothing else."""

    device_id: str
    key: bytes = field(repr=False)  # device_key(master, device_id); repr=False keeps it out of logs and tracebacks
    model_id: int = 1


def read_master_key(path: str) -> bytes:
    """The fleet's master key from a file (never argv: it would show in ``ps`` and shell history), read exactly as
    ``serve --per-device-keys --hmac-key`` reads it (bytes, surrounding white space stripped), or the device key
    derived here would not be the one serve signs with."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ToolchainError(f"cannot read --key-master {path}: {exc.strerror or exc}; pass the file with the fleet's "
                             "master key (the one serve --per-device-keys --hmac-key reads)") from None
    if len(data) > MASTER_KEY_MAX:
        raise ToolchainError(f"--key-master {path} is {len(data)} bytes; expected 1..{MASTER_KEY_MAX} (a key file)")
    key = data.strip()
    if not key:
        raise ToolchainError(f"--key-master {path} is empty; put the fleet's master key in it (the file serve "
                             "--per-device-keys --hmac-key reads)")
    return key


def check_provision(device_id: str | None, key_master: str | None, model_id: int = 1) -> Provision | None:
    """The provisioning asked for, every input checked (one-line errors) before the port is touched; None when
    neither flag is given (flash then behaves as it always did)."""

    if device_id is None and key_master is None:
        return None
    if device_id is None or key_master is None:
        raise ToolchainError("--device-id and --key-master go together: the device's key is derived from the master "
                             "for that id")
    check_device_id(device_id)
    if not 1 <= model_id < 1 << 30:
        raise ToolchainError(f"--model-id {model_id} is out of range: use 1..{(1 << 30) - 1} (serve's --model-id)")
    return Provision(device_id, device_key(read_master_key(key_master), device_id), model_id)


def provision_files(repl: RawRepl, existing: dict[str, int], smf: bytes, prov: Provision, log: Log) -> dict[str, bytes]:
    """``local.json`` (merged into the board's own, which keeps its data shard), ``model.tag`` for ``smf`` and, on a
    board without one, an empty ``data.bin`` (``app_boot.py`` opens it unconditionally)."""

    old = None
    if "local.json" in existing:
        try:
            old = json.loads(read_file(repl, "local.json"))
        except (ValueError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise ToolchainError("local.json on the board is not a JSON object; fix it or remove it (mpremote fs rm "
                                 ":local.json) and flash again")
    loc = provisioned_local(old, prov.device_id, prov.key, prov.model_id)
    files = {"local.json": json.dumps(loc, separators=(",", ":")).encode(),
             "model.tag": model_tag(prov.key, prov.model_id, smf)}
    if "data.bin" not in existing:
        files["data.bin"] = b""
    how = "merged into the board's" if old else "new; no local data yet (n 0): provision data.bin, n, size, labels"
    log(f"provisioning device {prov.device_id}: local.json ({how}; its own key), model.tag (model id {prov.model_id})")
    return files


# --- the command -------------------------------------------------------------------------------------

@dataclass
class FlashResult:
    board: BoardInfo | None
    files: dict[str, str]  # name -> sha256 verified on the board
    method: str
    notes: list[str]
    archive: Path | None = None


def flash(target: str | None, port: str | None, build: str | None = None, firmware: str | None = None,
          method: str = "auto", log: Log = _stderr, timeout: float = 600.0, device_id: str | None = None,
          key_master: str | None = None, model_id: int = 1) -> FlashResult:
    build_dir, manifest, profile = resolve_build(target, build)
    prov = check_provision(device_id, key_master, model_id)
    if prov is not None and (profile.runtime != "micropython" or profile.name == "microbit"):
        # app_boot.py (local.json + model.tag) runs on the hashlib boards only; the others keep their key elsewhere
        where = ("its gateway's --device-keys DIR/<id>.key" if profile.name == "microbit"
                 else "the agent's --local local.json \"key\"")
        raise ToolchainError(f"--device-id/--key-master provision app_boot.py boards; {profile.name}'s key goes in {where}"
                             " (docs/fleet.md)")
    if profile.runtime != "micropython":
        return FlashResult(None, {}, "archive", [], jetson_archive(build_dir, manifest, profile, None, log))
    if port is None:
        raise ToolchainError(f"--port is required for {profile.name}; pass the board's serial port "
                             "(e.g. /dev/ttyUSB0; `toolchain emulate` prints emulated ones)")
    bundle = load_bundle(build_dir, manifest, profile, log)
    for note in bundle.notes:
        log(f"note: {note}")
    if prov is not None and "model.smf" not in bundle.files:
        raise ToolchainError(f"{bundle.source} has no model.smf to tag; rebuild with `toolchain build --target "
                             f"{profile.name}`")
    if firmware:
        write_firmware(port, Path(firmware), profile, log)
    repl = connect(port)
    try:
        info = identify(repl)
        log(f"board on {port}: {info.describe()}")
        notes = check_board(info, profile)
        for note in notes:
            log(f"note: {note}")
        files = select_for_board(bundle, info, log)
        existing = list_files(repl)
        if prov is not None:  # read-only until check_size: a failing flash still leaves the board as it was
            files.update(provision_files(repl, existing, bundle.files["model.smf"], prov, log))
        check_size(files, info, profile, existing)
        if method == "auto":
            method = "microfs" if info.platform == "microbit" else "mpremote"
        log(f"flashing {len(files)} files, {sum(map(len, files.values()))} B from {bundle.source} ({method})")
        if method == "mpremote":
            repl.close()
            _copy_mpremote(port, files, log, timeout)
            _reopen(repl)
        elif method == "microfs":
            _copy_microfs(repl, files, log)
            _reopen(repl)
        elif method == "repl":
            for i, (name, data) in enumerate(files.items(), 1):
                log(f"  [{i}/{len(files)}] {name} ({len(data)} B)")
                _put_repl(repl, name, data)
        else:
            raise ToolchainError(f"unknown --method {method}; use auto, mpremote, microfs or repl")
        try:
            hashes = verify(repl, info, files, log)
        except ToolchainError:
            if method == "repl":
                raise
            log("verification failed after the copy; copying the differing files again through the raw REPL")
            for name, data in files.items():
                if board_sha256(repl, name, info) != hashlib.sha256(data).hexdigest():
                    _put_repl(repl, name, data)
            hashes = verify(repl, info, files, log)
        return FlashResult(info, hashes, method, notes)
    finally:
        repl.close()
