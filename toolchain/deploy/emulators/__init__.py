"""Emulated boards: MicroPython 1.29 on WebAssembly (Node.js) and the micro:bit v1 firmware on QEMU."""
