"""Code that runs on devices: ``micropython/`` (MCUs, MicroPython 1.9.2 - 1.29) and ``jetson/`` (onnxruntime).

The MicroPython files are data for the host (copied to boards as ``.py``/``.mpy``) and importable by
host tests as the reference implementation of the device side.
"""
