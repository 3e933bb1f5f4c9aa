"""Layer 5, packaging: every kind of bundle a board receives (MicroPython, micro:bit, Jetson), written and read back."""
