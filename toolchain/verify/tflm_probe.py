"""``python -m toolchain.verify.tflm_probe MODEL ARENA``: exit 0 if TFLite Micro can allocate and invoke
MODEL with an ARENA-byte tensor arena (run in a child process: TFLM may crash on a too-small arena)."""

import os
import sys

import numpy as np


def main() -> int:
    path, arena = sys.argv[1], int(sys.argv[2])
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # TFLM reports allocation failures on stderr
    from tflite_micro import runtime

    try:
        it = runtime.Interpreter.from_file(path, arena_size=arena)
        details = it.get_input_details(0)
        it.set_input(np.zeros(details["shape"], details["dtype"]), 0)
        it.invoke()
    except (RuntimeError, ValueError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
