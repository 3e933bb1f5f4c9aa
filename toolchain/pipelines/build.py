"""``toolchain build``: data -> federated sparse training -> int8 export -> verification -> manifest.

Every stage is real: the model is trained by the federated simulator, exported through TensorFlow
Lite's int8 converter, and checked in LiteRT and TFLite Micro. Output is assembled in a temporary
folder next to ``--out`` and renamed into place only when every stage (budget check included)
succeeded, so a failed build never leaves a half-written folder. ``--out`` itself is checked before
training (:mod:`toolchain.contracts.staging`): a folder this tool did not write is never replaced without ``--force``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain import __version__
from toolchain.boards.profiles import BOARDS_ENV, BoardProfile, UnknownBoard, all_profiles, load_profile, resolve
from toolchain.contracts.errors import EXIT_CHANCE, EXIT_VERIFY, BudgetError, ToolchainError
from toolchain.contracts.manifest import Budget, Manifest, artifact_entry
from toolchain.contracts.staging import check_out, staged
from toolchain.data.datasets import Dataset, load_dataset
from toolchain.export.artifacts import Exported, export_artifacts
from toolchain.export.smf_writer import tflite_to_smf
from toolchain.learning.fl import simulate
from toolchain.learning.fl.local import evaluate
from toolchain.learning.fl.masks import kept_count
from toolchain.learning.fl.quality import chance_accuracy, chance_message
from toolchain.learning.fl.simulator import RoundRecord
from toolchain.learning.options import BUILD_DEFAULTS, FederatedOptions
from toolchain.learning.setup import set_up
from toolchain.models.fold_bn import fold_batchnorm, max_abs_diff
from toolchain.models.zoo import prunable_layers
from toolchain.package.bundle import write_bundle
from toolchain.pipelines.report import add_latency_shares, board_table, confusion, layer_table, write_report
from toolchain.pipelines.select import (
    Estimate,
    Footprint,
    advise,
    board_kind,
    budget_message,
    footprint,
    live_activations,
    preflight,
    select_model,
)
from toolchain.verify.int8 import Int8Run, run_int8


@dataclass(kw_only=True)
class BuildOptions(FederatedOptions):
    """A build: the federated run (:class:`FederatedOptions`, build's defaults) and where it goes."""

    target: str | None  # a board name or alias; None with board_file
    eval_samples: int | None = BUILD_DEFAULTS["eval_samples"]
    out: str | None = None
    dense_as_conv: bool = True
    calibration_samples: int = 300
    force: bool = False  # replace a non-empty --out that is not an earlier build
    board_file: str | None = None  # a user board profile (TOML, the schema of toolchain/boards/builtin/*.toml)


def validate(opts: BuildOptions) -> BoardProfile:
    """Reject bad options before any work is done; returns the board."""
    profile = board_profile(opts)
    opts.validate()
    check_out(out_path(opts, profile), "build", opts.force, [Path(opts.data)] if opts.data else [])
    return profile


def board_profile(opts: BuildOptions) -> BoardProfile:
    """``--board-file`` if given (``--target``, if also given, must name it), else ``--target`` among the
    shipped boards and those of ``TOOLCHAIN_BOARDS``; aliases resolve to the board's name."""
    if opts.board_file:
        profile = load_profile(Path(opts.board_file))
        if opts.target and opts.target not in (profile.name, *profile.aliases):
            raise ToolchainError(f"--target {opts.target} does not match --board-file {opts.board_file}, which "
                                 f"describes '{profile.name}'; drop --target")
        return profile
    if not opts.target:
        raise ToolchainError("give --target BOARD (`toolchain targets` lists them) or --board-file FILE")
    profiles = all_profiles()
    try:
        return resolve(opts.target, profiles)
    except UnknownBoard:
        raise ToolchainError(f"unknown target '{opts.target}'; choose one of: {', '.join(profiles)} "
                             f"(`toolchain targets` lists them), or describe your board in a TOML file: "
                             f"--board-file FILE or a folder in {BOARDS_ENV}") from None


def out_path(opts: BuildOptions, profile: BoardProfile | None = None) -> Path:
    return Path(opts.out or f"build/{profile.name if profile else opts.target}")


class ChanceLevel(ToolchainError):
    """The build finished and wrote its outputs, but the model is no better than guessing (exit 5)."""

    def __init__(self, message: str, manifest: Manifest) -> None:
        super().__init__(message, EXIT_CHANCE)
        self.manifest = manifest


def _stage(timings: dict[str, float], name: str, t0: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - t0, 2)
    return now


def build(opts: BuildOptions, log: Callable[[str], None] = print) -> Manifest:
    """Run every stage; returns the manifest written to ``<out>/manifest.json``.

    validate -> data -> budget gate (estimate) -> train -> [staging: save training, fold, export, verify,
    package, budget, report] -> rename into ``out``. Each stage is a function of the stage before it.
    """
    profile = validate(opts)  # every input and --out, before any work
    out = out_path(opts, profile)
    timings: dict[str, float] = {}
    t = t_start = time.perf_counter()
    data = load_dataset(opts.dataset, opts.data)
    t = _stage(timings, "data", t)

    # the budget gate, before training: the same exporters and counting rules as the final check
    log(f"estimating the model's size on {profile.name} (the exporters on the untrained model)")
    estimate_fn = _estimator(opts, profile, data)
    estimate = select_model(profile, data.input_shape, opts.density, estimate_fn, opts.model)
    log(f"estimate for {estimate.model} at density {opts.density} on {profile.name}: {estimate.footprint.short()} "
        f"(board: {profile.ram_bytes} B RAM, {profile.flash_bytes} B flash)")
    t = _stage(timings, "estimate", t)
    trained = train_stage(opts, data, estimate.model, log)
    t = _stage(timings, "train", t)

    calibration = data.preprocessing.apply(
        data.x_train[np.random.default_rng(opts.seed).permutation(len(data.y_train))[:opts.calibration_samples]])
    with staged(out) as staging:
        save_training(opts, trained, staging)
        x_test = data.preprocessing.apply(data.x_test)  # NHWC float, once for fold, export and verify
        folded, float_acc = fold_stage(trained, x_test, data.y_test)
        t = _stage(timings, "fold_eval", t)
        log(f"exporting: BN folded (float accuracy {float_acc * 100:.2f} %), int8 TFLite, C array, ONNX")
        exported = export_artifacts(folded, data.input_shape, calibration,
                                    torch.from_numpy(x_test[:64]).permute(0, 3, 1, 2), staging, opts.dense_as_conv)
        t = _stage(timings, "export", t)
        log(f"verifying: TFLite Micro arena by bisection, then LiteRT and TFLite Micro on {len(data.y_test)} test "
            "images")
        checked = run_int8(exported.tflite, exported.tflite_path, x_test)
        t = _stage(timings, "verify", t)
        log(f"bundle and budget for {profile.name} (int8 TFLite Micro accuracy "
            f"{checked.accuracy(data.y_test)[1] * 100:.2f} %)")
        bundle_files = package_stage(profile, staging, exported.tflite.data, calibration)
        t = _stage(timings, "bundle", t)
        budget, fp, acts = budget_stage(opts, profile, trained, data, staging, checked.arena, estimate, estimate_fn)
        manifest = _manifest(opts, profile, data, trained, float_acc, exported, checked, budget, fp, acts, staging,
                             bundle_files, timings)
        timings["total"] = round(time.perf_counter() - t_start, 2)
        manifest.timings_s = timings
        manifest.write(staging / "manifest.json")
        log("report: report.md and plots/")
        write_report(staging, manifest.as_dict(), [r.as_dict() for r in trained.history])
    if manifest.quality.get("at_chance"):
        # written on purpose (the user inspects what went wrong), but not reported as a success
        raise ChanceLevel(manifest.quality["message"], manifest)
    return manifest


def _estimator(opts: BuildOptions, profile: BoardProfile, data: Dataset) -> Callable[[str, float], Estimate]:
    """``(model, density) -> Estimate``, memoised: the picker and the advice search ask for the same points."""
    cache: dict[tuple[str, float], Estimate] = {}
    idx = np.random.default_rng(opts.seed).permutation(len(data.y_train))[:32]
    calibration = data.preprocessing.apply(data.x_train[idx])

    def estimate_fn(model: str, density: float) -> Estimate:
        if (model, density) not in cache:
            cache[(model, density)] = preflight(profile, model, density, data.input_shape, data.num_classes,
                                                calibration, opts.dense_as_conv, opts.seed)
        return cache[(model, density)]

    return estimate_fn


@dataclass
class Trained:
    """What training hands to export: the model (eval mode), its masks and the round history."""

    model_name: str
    model: nn.Module
    masks: dict[str, torch.Tensor]
    history: list[RoundRecord]


def train_stage(opts: BuildOptions, data: Dataset, model_name: str, log: Callable[[str], None]) -> Trained:
    run = set_up(opts, data, model_name)
    log(f"training {model_name} on {opts.dataset} with {opts.algo}: {run.cfg.clients} clients, {run.cfg.rounds} "
        f"rounds, target density {opts.density}")
    history = simulate(run.strategy, run.model, run.fed, run.cfg, progress=not opts.quiet)
    return Trained(model_name, run.strategy.model.eval(), run.strategy.masks, history)


def save_training(opts: BuildOptions, trained: Trained, out: Path) -> None:
    """``model.pt`` (arch, weights, masks, options) and ``metrics.jsonl`` (one line per round)."""
    torch.save({"arch": trained.model.arch, "state_dict": trained.model.state_dict(), "masks": trained.masks,
                "algorithm": opts.algo, "config": asdict(opts)}, out / "model.pt")
    with (out / "metrics.jsonl").open("w") as f:
        for rec in trained.history:
            f.write(json.dumps(rec.as_dict()) + "\n")


def fold_stage(trained: Trained, x_test_nhwc: np.ndarray, y_test: np.ndarray) -> tuple[nn.Module, float]:
    """The BN-folded model (checked equal to the trained one) and its float test accuracy."""
    folded = fold_batchnorm(trained.model)
    x_test = torch.from_numpy(x_test_nhwc).permute(0, 3, 1, 2)
    if max_abs_diff(trained.model, folded, x_test[:64]) > 1e-3:
        raise ToolchainError("BN folding changed the model's outputs; please report this model", EXIT_VERIFY)
    float_acc, _ = evaluate(folded, x_test, torch.from_numpy(y_test))
    return folded, float_acc


def package_stage(profile: BoardProfile, out: Path, tflite: bytes, calibration: np.ndarray) -> dict[str, Path]:
    """What the board runs beside the TFLite model: ``model.smf`` on MicroPython boards (pruned weights cost
    nothing there) and the on-device bundle (MicroPython, Jetson); TFLite Micro / C boards take model_data.cc."""
    kind = board_kind(profile)
    if kind == "micropython":
        (out / "model.smf").write_bytes(tflite_to_smf(tflite))
    return {} if kind == "tflm" else write_bundle(out, profile, calibration=calibration)


def budget_stage(opts: BuildOptions, profile: BoardProfile, trained: Trained, data: Dataset, out: Path, arena: int,
                 estimate: Estimate, estimate_fn: Callable[[str, float], Estimate]) -> tuple[Budget, Footprint, Any]:
    """The files as written, counted by the same rules as the estimate; refuses (exit 3, with advice) if the
    board cannot hold them."""
    acts = live_activations(trained.model, data.input_shape)
    fp = footprint(profile, out, arena, acts)
    budget = Budget(profile.ram_bytes, profile.flash_bytes, fp.ram_needed, fp.flash_needed, fp.flash_parts,
                    kind=board_kind(profile), ram_parts=fp.ram_parts, estimate=estimate.as_dict())
    if not budget.fits:
        advice = advise(profile, trained.model_name, opts.density, data.input_shape, estimate_fn, user_model=True)
        raise BudgetError(budget_message(profile, trained.model_name, opts.density, fp, advice, estimated=False))
    return budget, fp, acts


def _manifest(opts: BuildOptions, profile: BoardProfile, data: Dataset, trained: Trained, float_acc: float,
              exported: Exported, checked: Int8Run, budget: Budget, fp: Footprint, acts: Any, staging: Path,
              bundle_files: dict[str, Path], timings: dict[str, float]) -> Manifest:
    model, masks, tfl = trained.model, trained.masks, exported.tflite
    kept, total = kept_count(masks), sum(m.numel() for m in masks.values())
    acc_lite, acc_micro = checked.accuracy(data.y_test)
    chance = chance_accuracy(data.y_test, data.num_classes)
    at_chance = chance_message(acc_micro, chance)
    quality = {"chance": chance, "accuracy": acc_micro, "at_chance": at_chance is not None,
               **({"message": at_chance} if at_chance else {})}
    smf_path = staging / "model.smf"
    layers = layer_table(model, masks, data.input_shape, smf_path.read_bytes() if smf_path.is_file() else None)
    boards = board_table(staging, profile, fp.as_dict(), checked.arena, acts, layers)
    add_latency_shares(layers, boards[profile.name])  # the per-layer column is the target's estimate
    notes = []
    if checked.mismatch:
        notes.append(f"LiteRT and TFLite Micro int8 outputs differ in {checked.mismatch} entries")
    if opts.dense_as_conv:
        notes.append("dense layers are exported as 1x1 CONV_2D: LiteRT's int8 FULLY_CONNECTED rounds differently "
                     "from TFLite Micro's (single vs double rounding)")
    artifacts = {name: artifact_entry(staging, staging / name)
                 for name in ("model.tflite", "model_data.h", "model_data.cc", "model.onnx", "model.smf", "model.pt",
                              "metrics.jsonl") if (staging / name).exists()}
    artifacts.update({name: artifact_entry(staging, path) for name, path in bundle_files.items()})
    return Manifest(
        target=profile.name, algorithm=opts.algo, dataset=opts.dataset,
        model={"name": trained.model_name, "prunable_weights": total, "kept_weights": kept,
               "parameters": sum(p.numel() for p in model.parameters()),
               "layers": [n for n, _ in prunable_layers(model)]},
        density=kept / total,
        accuracy={"float": float_acc, "tflite_int8": acc_lite, "tflm_int8": acc_micro},
        int8_agreement={"litert_vs_tflm_identical": checked.mismatch == 0, "mismatched_outputs": checked.mismatch,
                        "compared_outputs": int(checked.litert.size), "litert_resolver": "BUILTIN_REF"},
        arena_bytes=checked.arena, flash_bytes=len(tfl.data), budget=budget,
        input={"shape": [1, *data.input_shape], "layout": "NHWC", "dtype": "int8",
               "quantization": {"scale": tfl.input_quant.scale, "zero_point": tfl.input_quant.zero_point},
               "preprocessing": data.preprocessing.as_dict()},
        output={"shape": [1, data.num_classes], "dtype": "int8",
                "quantization": {"scale": tfl.output_quant.scale, "zero_point": tfl.output_quant.zero_point}},
        artifacts=artifacts,
        config={**asdict(opts), "train": opts.train_config().as_dict(), "ops": sorted(set(tfl.ops))},
        board=profile.as_dict(), timings_s=timings, toolchain_version=__version__, notes=notes, quality=quality,
        layers=layers, confusion=confusion(data.y_test, checked.tflm.argmax(1), data.num_classes), boards=boards,
    )


def summary_lines(m: Manifest) -> list[str]:
    acc = m.accuracy
    return [
        f"built {m.model['name']} for {m.target} ({m.algorithm}, density {m.density:.4f})",
        f"  accuracy   float {acc['float'] * 100:.2f} %   int8 LiteRT {acc['tflite_int8'] * 100:.2f} %   "
        f"int8 TFLite Micro {acc['tflm_int8'] * 100:.2f} %",
        f"  int8 LiteRT vs TFLite Micro: {m.int8_agreement['mismatched_outputs']} of "
        f"{m.int8_agreement['compared_outputs']} outputs differ",
        f"  on {m.target:<8} RAM {m.budget.ram_needed}/{m.budget.ram_bytes} B, flash {m.budget.flash_needed}/"
        f"{m.budget.flash_bytes} B ({m.budget.kind} rule) -> {'fits' if m.budget.fits else 'DOES NOT FIT'}; "
        f"estimated before training: RAM {m.budget.estimate.get('ram_needed', '-')} B, flash "
        f"{m.budget.estimate.get('flash_needed', '-')} B",
        f"  files      model.tflite {m.flash_bytes} B, TFLite Micro arena {m.arena_bytes} B"
        + (f", model.smf {m.artifacts['model.smf']['bytes']} B" if "model.smf" in m.artifacts else ""),
        f"  time       {m.timings_s.get('total', 0):.1f} s",
    ]
