"""The toolchain's fleet app for Flower: entry points only; the code comes from the installed ``toolchain``."""
