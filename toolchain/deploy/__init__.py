"""Layer 6, deploy: flashing, REPLs, emulated boards and the hardware-in-the-loop suite."""
