#!/usr/bin/env bash
# Build real MicroPython 1.28.0 ports from the vendored source, once, into .cache/micropython/ (git-ignored):
#   unix/micropython      unix port, x64 native/viper emitter; `-X heapsize=N` is a real heap bound
#   qemu-an385.elf        qemu port, BOARD=MPS2_AN385 (Cortex-M3, armv7m, thumb/viper emitter, 256 KB heap)
#   qemu-microbit.elf     qemu port, BOARD=MICROBIT (nRF51, Cortex-M0 = armv6m, the RP2040's ISA) with the
#                         thumb emitter turned back on (the port turns it off for nRF51 only to save flash)
#   mpy-cross             the cross compiler of the same source (its .mpy version matches the ports)
# Each artefact is rebuilt only if missing; a missing ARM toolchain skips the qemu builds with a message
# (the tests that need them skip with the same reason). Usage: scripts/build_micropython.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.28.0
TARBALL=${MICROPYTHON_TARBALL:-../shared/vendor/micropython-$VERSION-src.tar.gz}
SHA256=00a4d1a6130a9ee6c5e4e12ea88c24ed827db4d99c8cfbbba6ddbead05560dcf
OUT=.cache/micropython
SRC=$OUT/src-$VERSION
JOBS=${MICROPYTHON_JOBS:-2}
NICE="nice -n 10"

[ "${1:-}" = "--force" ] && rm -rf "$OUT"
mkdir -p "$OUT"
# the sources sit inside this repository: stop git there so the firmware banner says v1.28.0, not our commit
export GIT_CEILING_DIRECTORIES="$(realpath "$OUT")"

if [ ! -f "$SRC/py/mpconfig.h" ]; then
  [ -f "$TARBALL" ] || { echo "build_micropython: $TARBALL not found; MicroPython port tests will skip" >&2; exit 0; }
  echo "$SHA256  $TARBALL" | sha256sum -c --quiet -
  rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
  tar xzf "$TARBALL" -C "$SRC.tmp" --strip-components=1
  mv "$SRC.tmp" "$SRC"
fi

# Common make flags: no frozen micropython-lib (not vendored), no submodule-backed modules.
if [ ! -x "$OUT/mpy-cross" ]; then
  echo "build_micropython: mpy-cross $VERSION"
  $NICE make -s -C "$SRC/mpy-cross" -j"$JOBS" >/dev/null
  cp "$SRC/mpy-cross/build/mpy-cross" "$OUT/mpy-cross"
fi

if [ ! -x "$OUT/unix/micropython" ]; then
  echo "build_micropython: unix port (x64)"
  $NICE make -s -C "$SRC/ports/unix" -j"$JOBS" FROZEN_MANIFEST= MICROPY_PY_BTREE=0 MICROPY_PY_SSL=0 \
    MICROPY_PY_FFI=0 >/dev/null
  mkdir -p "$OUT/unix"
  cp "$SRC/ports/unix/build-standard/micropython" "$OUT/unix/micropython"
fi

if ! command -v arm-none-eabi-gcc >/dev/null; then
  echo "build_micropython: arm-none-eabi-gcc missing (apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi);" \
    "qemu Cortex-M ports not built" >&2
  exit 0
fi

# The AN385 has 4 MB of RAM; its heap is 256 KB instead of the port's 140 KB because the test harness keeps the
# engine's files in a RAM file system (~40 KB) that a board keeps in flash. (Heap bounds are measured on the unix
# port.) A changed flag set rebuilds (the stamp file holds the flags).
AN385_FLAGS="BOARD=MPS2_AN385 FROZEN_MANIFEST= MICROPY_HEAP_SIZE=262144"
if [ ! -f "$OUT/qemu-an385.elf" ] || [ "$(cat "$OUT/qemu-an385.flags" 2>/dev/null)" != "$AN385_FLAGS" ]; then
  echo "build_micropython: qemu port MPS2_AN385 (Cortex-M3, 256 KB heap)"
  rm -rf "$SRC/ports/qemu/build-MPS2_AN385"
  # shellcheck disable=SC2086
  $NICE make -s -C "$SRC/ports/qemu" -j"$JOBS" $AN385_FLAGS >/dev/null
  cp "$SRC/ports/qemu/build-MPS2_AN385/firmware.elf" "$OUT/qemu-an385.elf"
  echo "$AN385_FLAGS" > "$OUT/qemu-an385.flags"
fi

if [ ! -f "$OUT/qemu-microbit.elf" ]; then
  echo "build_micropython: qemu port MICROBIT (Cortex-M0, armv6m, thumb emitter on)"
  # mpconfig.h only defaults these when undefined; ARMV7M=0 keeps the emitter to Cortex-M0 (armv6m) instructions
  $NICE make -s -C "$SRC/ports/qemu" -j"$JOBS" BOARD=MICROBIT FROZEN_MANIFEST= \
    CFLAGS_EXTRA="-DMICROPY_EMIT_THUMB=1 -DMICROPY_EMIT_THUMB_ARMV7M=0" >/dev/null
  cp "$SRC/ports/qemu/build-MICROBIT/firmware.elf" "$OUT/qemu-microbit.elf"
fi
