"""Board profiles (``hw/boards/*.toml``), emulators, flashing and hardware-in-the-loop support."""
