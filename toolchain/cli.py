"""The ``toolchain`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from toolchain import __version__
from toolchain.errors import EXIT_INTERRUPT, EXIT_USAGE, ToolchainError


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong + where to look), not argparse's usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        sys.exit(EXIT_USAGE)


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's default in --help, unless its help already states it or there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required
                or action.default is None or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _add_fl_options(p: argparse.ArgumentParser, *, rounds: int, clients: int, batch: int, lr: float,
                    optimizer: str, model_help: str = "zoo model (default: the largest that fits the target)") -> None:
    p.add_argument("--dataset", default="mnist", help="mnist (embedded), fashion-mnist, cifar10 (default: mnist)")
    p.add_argument("--data", metavar="DIR", help="folder with the dataset files (default: the embedded MNIST)")
    p.add_argument("--density", type=_fraction, default=0.1, help="fraction of prunable weights kept, in (0, 1]")
    p.add_argument("--clients", type=int, default=clients, help="number of simulated clients")
    p.add_argument("--per-round", type=int, default=None, help="clients sampled per round (default: all)")
    p.add_argument("--rounds", type=int, default=rounds, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per client per round")
    p.add_argument("--batch-size", type=int, default=batch, help="local mini-batch size")
    p.add_argument("--lr", type=float, default=lr, help="local learning rate")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=optimizer, help=f"local optimizer (default {optimizer})")
    p.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default=None,
                   help="client data split (default: iid, or dirichlet when --alpha is given)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration (smaller = more skewed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, initial weights and sampling")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--algo-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm option, repeatable (e.g. prune_end=4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _algo_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ToolchainError(f"--algo-opt expects KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _partition(args: argparse.Namespace) -> tuple[str, float]:
    scheme = args.partition or ("dirichlet" if args.alpha is not None else "iid")
    return scheme, args.alpha if args.alpha is not None else 0.5


def cmd_targets(args: argparse.Namespace) -> int:
    from hw.profiles import BOARDS_DIR, all_profiles

    profiles = all_profiles()
    if args.json:
        print(json.dumps({n: p.as_dict() for n, p in profiles.items()}, indent=2))
        return 0
    print(f"{'target':<18} {'runtime':<12} {'RAM for model':>14} {'flash':>12}  {'transport':<9} description")
    for name, p in profiles.items():
        also = f" (also: {', '.join(p.aliases)})" if p.aliases else ""
        user = "" if Path(p.source).parent == BOARDS_DIR else f" [{p.source}]"
        print(f"{name:<18} {p.runtime:<12} {p.ram_bytes:>12} B {p.flash_bytes:>10} B  {p.default_transport:<9} "
              f"{p.description}{also}{user}")
    return 0


# BuildOptions field -> the build option that sets it, where the names differ
_REPLAY_DEST = {"dense_as_conv": "keep_fully_connected", "algo_options": "algo_opt"}
_NOT_REPLAYED = ("out", "quiet", "force")  # where to write, how to show it, and permission are asked anew


def _given(argv: Sequence[str], parser: argparse.ArgumentParser) -> set[str]:
    """Destinations of the options present on the command line (``--opt value`` or ``--opt=value``)."""
    dests = set()
    for action in parser._actions:
        if any(tok == o or tok.startswith(o + "=") for o in action.option_strings for tok in argv):
            dests.add(action.dest)
    return dests


def _replay(opts, path: str, given: set[str]):
    """``opts`` with every option recorded in the manifest's ``config`` that the command line did not give."""
    from dataclasses import fields, replace

    p = Path(path)
    p = p / "manifest.json" if p.is_dir() else p
    try:
        config = json.loads(p.read_text())["config"]
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"cannot read --config {p} ({getattr(exc, 'strerror', None) or exc})") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ToolchainError(f"--config {p} is not a manifest.json written by `toolchain build` (no 'config')") from None
    if "alpha" in given or "partition" in given:
        given = given | {"alpha", "partition"}
    if "target" in given or "board_file" in given:  # a new board: do not carry the old one's file or name
        given = given | {"target", "board_file"}
    keep = {f.name: config[f.name] for f in fields(opts)
            if f.name in config and f.name not in _NOT_REPLAYED and _REPLAY_DEST.get(f.name, f.name) not in given}
    if keep.get("board_file") and not Path(keep["board_file"]).is_file():
        raise ToolchainError(f"the build in {p} used --board-file {keep['board_file']}, which is gone; pass "
                             "--board-file FILE or --target BOARD")
    return replace(opts, **keep)


def cmd_build(args: argparse.Namespace) -> int:
    from toolchain.build import BuildOptions, ChanceLevel, build, summary_lines

    scheme, alpha = _partition(args)
    opts = BuildOptions(target=args.target, dataset=args.dataset, data=args.data, algo=args.algo,
                        density=args.density, clients=args.clients, per_round=args.per_round, rounds=args.rounds,
                        local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                        partition=scheme,
                        alpha=alpha, seed=args.seed, model=args.model, out=args.out, quiet=args.quiet, threads=args.threads,
                        dense_as_conv=not args.keep_fully_connected, algo_options=_algo_options(args.algo_opt),
                        force=args.force, board_file=args.board_file)
    if args.config:
        opts = _replay(opts, args.config, _given(args.argv, args.parser))
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        manifest = build(opts, log=log)
    except ChanceLevel as exc:  # outputs were written: show them, then fail with the one-line reason
        for line in summary_lines(exc.manifest):
            print(line)
        print(f"  output     {opts.out or f'build/{exc.manifest.target}'}/manifest.json (kept for inspection)")
        raise
    for line in summary_lines(manifest):
        print(line)
    print(f"  output     {opts.out or f'build/{manifest.target}'}/manifest.json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from toolchain.report import load_build, summary_json, write_report

    folder = Path(args.dir)
    m, rounds = load_build(folder)
    if args.json:
        print(json.dumps(summary_json(m, rounds), indent=1))
        return 0
    try:
        write_report(folder, m, rounds)
    except OSError as exc:
        raise ToolchainError(f"cannot write the report into {folder} ({exc.strerror or exc})") from None
    print(f"{folder / 'report.md'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from toolchain.train import TrainOptions, train

    scheme, alpha = _partition(args)
    opts = TrainOptions(algo=args.algo, model=args.model or "lenet5", dataset=args.dataset, data=args.data,
                        density=args.density, clients=args.clients, per_round=args.per_round, rounds=args.rounds,
                        local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                        partition=scheme,
                        alpha=alpha, seed=args.seed, out=args.out, quiet=args.quiet, threads=args.threads,
                        eval_samples=args.eval_samples, algo_options=_algo_options(args.algo_opt),
                        engine=args.engine, superlink=args.superlink, superlink_ca=args.superlink_ca,
                        insecure=args.insecure, force=args.force)
    summary = train(opts)
    print(f"{opts.algo} {opts.model} on {opts.dataset}: accuracy {summary['accuracy'] * 100:.2f} % at density "
          f"{summary['density']:.4f}; device memory {summary['device_memory_bytes']['total']} B; "
          f"up {summary['bytes_up_per_round']:.0f} B / round; output {opts.out}")
    if summary.get("quality", {}).get("at_chance"):
        print(f"warning: {summary['quality']['message']}", file=sys.stderr)
    return 0


def make_parser() -> argparse.ArgumentParser:
    from toolchain.pruning import ALGORITHMS

    parser = OneLineParser(prog="toolchain", description="Federated pruning -> int8 TinyML models -> devices.")
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("targets", help="list the boards (hw/boards/*.toml and TOOLCHAIN_BOARDS folders)",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--json", action="store_true", help="every profile field, as JSON")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("build", help="train, prune, quantize, export and verify a model for a board",
                       formatter_class=DefaultsFormatter,
                       epilog="exit codes: 0 built, 2 bad input, 3 does not fit the board, 4 verification failed, "
                              "5 built but at chance level (files kept), 130 interrupted")
    p.add_argument("--config", metavar="MANIFEST", default=None,
                   help="replay the build recorded in a manifest.json (or its folder); options given here "
                        "override it, --out defaults to build/<target> as usual")
    p.add_argument("--target", default=None,
                   help="board name or alias (`toolchain targets`); required unless --board-file is given")
    p.add_argument("--board-file", metavar="FILE", default=None,
                   help="your own board profile (TOML, the keys of hw/boards/*.toml; docs/boards/README.md)")
    p.add_argument("--algo", default="gmp", help=f"pruning algorithm: {', '.join(ALGORITHMS)} (default: gmp)")
    p.add_argument("--out", default=None, help="output folder (default: build/<target>)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a non-empty folder that is not an earlier build")
    p.add_argument("--keep-fully-connected", action="store_true",
                   help="export dense layers as FULLY_CONNECTED instead of 1x1 CONV_2D")
    _add_fl_options(p, rounds=5, clients=10, batch=64, lr=0.08, optimizer="sgd")
    p.set_defaults(func=cmd_build, parser=p)

    p = sub.add_parser("report", help="re-render a build's report.md and plots from its manifest.json",
                       formatter_class=DefaultsFormatter)
    p.add_argument("dir", metavar="DIR", help="a `toolchain build` output folder")
    p.add_argument("--json", action="store_true", help="print the report's facts as JSON instead of writing files")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", help="run a federated pruning algorithm in simulation",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--algo", required=True, help=f"one of: {', '.join(ALGORITHMS)}")
    p.add_argument("--out", required=True, help="output folder for metrics.jsonl, summary.json, model.pt, plot")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a non-empty folder that is not an earlier training run")
    p.add_argument("--eval-samples", type=int, default=None, help="test samples for per-round evaluation")
    p.add_argument("--engine", choices=["inprocess", "flower-sim", "flower"], default="inprocess",
                   help="inprocess (default), flower-sim (Flower simulation, Ray) or flower (SuperLink; docs/flower.md)")
    p.add_argument("--superlink", metavar="HOST:PORT", default=None, help="--engine flower: the SuperLink address")
    p.add_argument("--superlink-ca", metavar="PEM", default=None,
                   help="--engine flower: the SuperLink's CA certificate (TLS; docs/flower.md)")
    p.add_argument("--insecure", action="store_true",
                   help="--engine flower: connect without TLS (only on a trusted network)")
    # Adam (AMSGrad) 0.01, batch 32: with them every method leaves chance at 1-5 % density; SGD 0.05 left random
    # ERK LeNet-5 at 1 % on 37.9 % after 5 rounds, batch 64 magnitude at 57.8 % (docs/training.md "Defaults")
    _add_fl_options(p, rounds=20, clients=10, batch=32, lr=0.01, optimizer="adam",
                    model_help="zoo model (default: lenet5)")
    p.set_defaults(func=cmd_train)

    from hw import emulate, flash
    from hw.hil import cli as hil_cli

    flash.add_parser(sub)
    emulate.add_parser(sub)
    hil_cli.add_parser(sub)
    from toolchain import serve as fleet

    fleet.add_parsers(sub, _fraction)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which options were given (build --config)
    try:
        return args.func(args)
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # the reader went away (`toolchain report --json | head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
