# Two entry points (see README): `make build` and `make test`. Everything else is their plumbing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TARGET ?= esp32

.PHONY: build test system micropython lint bench clean

## Set up the Python environment and build the default model for an ESP32 from the embedded MNIST.
build: $(VENV)/.installed
	$(BIN)/toolchain build --target $(TARGET)

## Set up the environment, the system packages the tests use, and run the whole test suite (the hardware-in-the-loop
## conformance suite included, on the emulated boards: QEMU micro:bit + MicroPython WebAssembly, and MicroPython 1.28
## built from the vendored source: unix port + qemu Cortex-M, see docs/device-engine.md). Two workers, one test
## file each at a time (module fixtures stay in one process): 22 min here instead of 29-36 min.
test: $(VENV)/.installed system micropython
	$(BIN)/python -m pytest --board emulated --durations=25 -n 2 --dist loadfile

# Exact pins: requirements.lock constrains every package (torch 2.13.0 CPU comes from the local wheel).
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test,flower]'
	touch $@

## qemu-system-arm + micro:bit MicroPython firmware, mosquitto, and MicroPython WebAssembly (npm).
system:
	bash scripts/setup_system.sh

## MicroPython 1.28 unix port, qemu Cortex-M firmware and mpy-cross from ../shared/vendor, built once into
## .cache/micropython/ (about 3 minutes on 2 cores; later runs only check the files are there).
micropython: system
	bash scripts/build_micropython.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(VENV)/.installed
	$(BIN)/python bench/build_time.py

clean:
	rm -rf build .pytest_cache
