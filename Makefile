# Two entry points (see README): `make build` and `make test`. Everything else is their plumbing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TARGET ?= esp32

.PHONY: build test system lint bench clean

## Set up the Python environment and build the default model for an ESP32 from the embedded MNIST.
build: $(VENV)/.installed
	$(BIN)/toolchain build --target $(TARGET)

## Set up the environment, the system packages the tests use, and run the whole test suite (the hardware-in-the-loop
## conformance suite included, on the emulated boards: QEMU micro:bit + MicroPython WebAssembly).
test: $(VENV)/.installed system
	$(BIN)/python -m pytest --board emulated

# Exact pins: requirements.lock constrains every package (torch 2.13.0 CPU comes from the local wheel).
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test,flower]'
	touch $@

## qemu-system-arm + micro:bit MicroPython firmware, mosquitto, and MicroPython WebAssembly (npm).
system:
	bash scripts/setup_system.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python bench/build_time.py

clean:
	rm -rf build .pytest_cache
