"""The toolchain's Flower app: entry points only; the strategies come from the installed ``toolchain``."""
