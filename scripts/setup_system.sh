#!/usr/bin/env bash
# Install what the test suite runs against, only when missing:
#   qemu-system-arm + firmware-microbit-micropython (emulated micro:bit v1), mosquitto (MQTT broker),
#   Node.js + @micropython/micropython-webassembly-pyscript (MicroPython 1.29 as WebAssembly),
#   gcc-arm-none-eabi + libnewlib-arm-none-eabi (to build MicroPython 1.28's qemu port: scripts/build_micropython.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
[ -f /usr/share/firmware-microbit-micropython/firmware.hex ] || need_apt+=(firmware-microbit-micropython)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v node >/dev/null || need_apt+=(nodejs npm)
# MicroPython's qemu Cortex-M port is cross-compiled (scripts/build_micropython.sh)
command -v arm-none-eabi-gcc >/dev/null || need_apt+=(gcc-arm-none-eabi)
[ -d /usr/lib/arm-none-eabi/newlib ] || need_apt+=(libnewlib-arm-none-eabi)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing system packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -f node_modules/@micropython/micropython-webassembly-pyscript/micropython.mjs ]; then
  echo "installing MicroPython WebAssembly (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
fi

# umqtt.simple (micropython-lib) for the device MQTT tests: the sha256-pinned sdist from PyPI, unpacked into
# .cache/umqtt/ (git-ignored; not vendored). A network failure only warns (those tests skip); a hash mismatch fails.
PYTHONPATH="$PWD" python3 -m toolchain.deploy.emulators.wasm_net || [ $? -eq 2 ]
