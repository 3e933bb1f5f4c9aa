"""``toolchain flash``: copy a build's bundle to a board (or write a Jetson archive) and verify it."""

from __future__ import annotations

import argparse

from toolchain.deploy.flash import flash


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flash", help="copy a build's bundle to a board (or write a Jetson archive) and verify it")
    p.add_argument("--target", help="board name (`toolchain targets`); default: the build's target")
    p.add_argument("--port", help="serial port of the board (e.g. /dev/ttyUSB0; `toolchain emulate` prints emulated ones)")
    p.add_argument("--build", metavar="DIR", help="build folder (default: build/<target>)")
    p.add_argument("--firmware", metavar="IMAGE", help="ESP32: write this MicroPython firmware with esptool first")
    p.add_argument("--method", choices=["auto", "mpremote", "microfs", "repl"], default="auto",
                   help="copy tool (default: microfs for micro:bit, mpremote otherwise)")
    p.add_argument("--device-id", metavar="ID",
                   help="provision this fleet device id: local.json gets it and its own key, plus model.tag")
    p.add_argument("--key-master", metavar="FILE",
                   help="file with the fleet's master key (as serve --per-device-keys --hmac-key); the board gets "
                        "only device_key(master, ID)")
    p.add_argument("--model-id", type=int, default=1,
                   help="model id written to local.json and tagged in model.tag (serve's --model-id; default 1)")
    p.set_defaults(func=cmd_flash)


def cmd_flash(args: argparse.Namespace) -> int:
    result = flash(args.target, args.port, args.build, args.firmware, args.method, device_id=args.device_id,
                   key_master=args.key_master, model_id=args.model_id)
    if result.archive is not None:
        print(f"bundle archive {result.archive}; copy it to the Jetson, `tar xzf` it and run install.sh")
        return 0
    assert result.board is not None
    print(f"flashed {len(result.files)} files to {result.board.port} ({result.board.platform}, MicroPython "
          f"{result.board.version_text}) with {result.method}; sha256 verified"
          + (f"; provisioned as device {args.device_id}" if args.device_id else ""))
    return 0
