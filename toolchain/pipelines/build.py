"""``toolchain build``: data -> federated sparse training -> int8 export -> verification -> manifest.

Every stage is real: the model is trained by the federated simulator, exported through TensorFlow
Lite's int8 converter, and checked in LiteRT and TFLite Micro. Output is assembled in a temporary
folder next to ``--out`` and renamed into place only when every stage (budget check included)
succeeded, so a failed build never leaves a half-written folder. ``--out`` itself is checked before
training (:mod:`toolchain.contracts.staging`): a folder this tool did not write is never replaced without ``--force``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from toolchain import __version__
from toolchain.boards.profiles import BOARDS_ENV, BoardProfile, UnknownBoard, all_profiles, load_profile, resolve
from toolchain.contracts.errors import EXIT_CHANCE, EXIT_VERIFY, BudgetError, ToolchainError
from toolchain.contracts.manifest import Budget, Manifest, artifact_entry
from toolchain.contracts.smf import tflite_to_smf
from toolchain.contracts.staging import check_out, replace_dir, staging_dir
from toolchain.data.datasets import Dataset, load_dataset
from toolchain.export.c_array import write_c_array
from toolchain.export.keras_mirror import build_keras_mirror
from toolchain.export.onnx_export import export_onnx, onnx_logits
from toolchain.export.silence import captured_fds
from toolchain.export.tflite import convert_int8, unsupported_ops
from toolchain.learning.fl import Federation, simulate
from toolchain.learning.fl.local import evaluate
from toolchain.learning.fl.masks import kept_count
from toolchain.learning.fl.quality import chance_accuracy, chance_message
from toolchain.learning.fl.simulator import seed_everything
from toolchain.learning.options import BUILD_DEFAULTS, FederatedOptions
from toolchain.learning.pruning import make_strategy
from toolchain.models.fold_bn import fold_batchnorm, max_abs_diff
from toolchain.models.zoo import build_model, prunable_layers
from toolchain.package.bundle import write_bundle
from toolchain.pipelines.report import add_latency_shares, board_table, confusion, layer_table, write_report
from toolchain.pipelines.select import (
    Estimate,
    advise,
    board_kind,
    budget_message,
    footprint,
    live_activations,
    preflight,
    select_model,
)
from toolchain.verify.interpreters import litert_outputs, quantize_input, tflm_min_arena, tflm_outputs


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
    """Run every stage; returns the manifest written to ``<out>/manifest.json``."""
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
    model_name = estimate.model
    log(f"estimate for {model_name} at density {opts.density} on {profile.name}: {estimate.footprint.short()} "
        f"(board: {profile.ram_bytes} B RAM, {profile.flash_bytes} B flash)")
    t = _stage(timings, "estimate", t)
    seed_everything(opts.seed)  # the initial weights are part of the run
    model = build_model(model_name, data.input_shape, data.num_classes)
    cfg = opts.train_config()
    fed = Federation.from_dataset(data, cfg)
    strategy = make_strategy(opts.algo, cfg)
    log(f"training {model_name} on {opts.dataset} with {opts.algo}: {cfg.clients} clients, {cfg.rounds} rounds, "
        f"target density {opts.density}")
    history = simulate(strategy, model, fed, cfg, progress=not opts.quiet)
    t = _stage(timings, "train", t)

    staging = staging_dir(out)
    try:
        manifest = _export_and_verify(opts, profile, data, strategy, model_name, fed, history, staging, timings, t,
                                      estimate, estimate_fn, log)
        timings["total"] = round(time.perf_counter() - t_start, 2)
        manifest.timings_s = timings
        manifest.write(staging / "manifest.json")
        log("report: report.md and plots/")
        write_report(staging, manifest.as_dict(), [r.as_dict() for r in history])
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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


def _export_and_verify(opts: BuildOptions, profile: BoardProfile, data: Dataset, strategy, model_name: str,
                       fed: Federation, history, staging: Path, timings: dict[str, float], t: float,
                       estimate: Estimate, estimate_fn: Callable[[str, float], Estimate],
                       log: Callable[[str], None] = print) -> Manifest:

    model = strategy.model.eval()
    masks = strategy.masks
    kept, total = kept_count(masks), sum(m.numel() for m in masks.values())
    torch.save({"arch": model.arch, "state_dict": model.state_dict(), "masks": masks,
                "algorithm": opts.algo, "config": asdict(opts)}, staging / "model.pt")
    with (staging / "metrics.jsonl").open("w") as f:
        for rec in history:
            f.write(json.dumps(rec.as_dict()) + "\n")

    folded = fold_batchnorm(model)
    x_test_f = data.preprocessing.apply(data.x_test)  # NHWC float
    x_test_t = torch.from_numpy(x_test_f).permute(0, 3, 1, 2)
    if max_abs_diff(model, folded, x_test_t[:64]) > 1e-3:
        raise ToolchainError("BN folding changed the model's outputs; please report this model", EXIT_VERIFY)
    float_acc, _ = evaluate(folded, x_test_t, torch.from_numpy(data.y_test))
    t = _stage(timings, "fold_eval", t)

    log(f"exporting: BN folded (float accuracy {float_acc * 100:.2f} %), int8 TFLite, C array, ONNX")
    calib_idx = np.random.default_rng(opts.seed).permutation(len(data.y_train))[:opts.calibration_samples]
    with captured_fds():
        keras_model = build_keras_mirror(folded, data.input_shape, opts.dense_as_conv)
        tfl = convert_int8(keras_model, data.preprocessing.apply(data.x_train[calib_idx]))
    bad = unsupported_ops(tfl.ops)
    if bad:
        raise ToolchainError(f"the int8 graph uses ops TFLite Micro lacks: {', '.join(bad)}", EXIT_VERIFY)
    tflite_path = staging / "model.tflite"
    tflite_path.write_bytes(tfl.data)
    write_c_array(tfl.data, staging)
    onnx_path = staging / "model.onnx"
    export_onnx(folded, data.input_shape, onnx_path)
    onnx_err = float(np.abs(onnx_logits(onnx_path, x_test_t[:64].numpy())
                            - folded(x_test_t[:64]).detach().numpy()).max())
    if onnx_err > 1e-3:
        raise ToolchainError(f"ONNX export differs from the torch model by {onnx_err:.2e}", EXIT_VERIFY)
    t = _stage(timings, "export", t)

    log(f"verifying: TFLite Micro arena by bisection, then LiteRT and TFLite Micro on {len(data.y_test)} test "
        "images")
    xq = quantize_input(x_test_f, tfl.input_quant.scale, tfl.input_quant.zero_point)
    arena = tflm_min_arena(tflite_path)
    lite = litert_outputs(tfl.data, xq)
    micro = tflm_outputs(tflite_path, xq, arena_size=arena)  # the measured minimum arena runs the whole test set
    mismatch = int((lite != micro).sum())
    acc_lite = float((lite.argmax(1) == data.y_test).mean())
    acc_micro = float((micro.argmax(1) == data.y_test).mean())
    chance = chance_accuracy(data.y_test, data.num_classes)
    at_chance = chance_message(acc_micro, chance)
    quality = {"chance": chance, "accuracy": acc_micro, "at_chance": at_chance is not None,
               **({"message": at_chance} if at_chance else {})}
    t = _stage(timings, "verify", t)

    log(f"bundle and budget for {profile.name} (int8 TFLite Micro accuracy {acc_micro * 100:.2f} %)")
    model_bytes = len(tfl.data)
    kind = board_kind(profile)
    if kind == "micropython":  # MicroPython boards run the sparse model file: pruned weights cost nothing there
        (staging / "model.smf").write_bytes(tflite_to_smf(tfl.data))
    bundle_files: dict[str, Path] = {}
    if kind != "tflm":  # TFLite Micro / C boards take model_data.cc: no on-device bundle

        bundle_files = write_bundle(staging, profile, calibration=data.preprocessing.apply(data.x_train[calib_idx]))
    t = _stage(timings, "bundle", t)
    acts = live_activations(model, data.input_shape)
    fp = footprint(profile, staging, arena, acts)
    budget = Budget(profile.ram_bytes, profile.flash_bytes, fp.ram_needed, fp.flash_needed, fp.flash_parts,
                    kind=kind, ram_parts=fp.ram_parts, estimate=estimate.as_dict())
    if not budget.fits:
        advice = advise(profile, model_name, opts.density, data.input_shape, estimate_fn, user_model=True)
        raise BudgetError(budget_message(profile, model_name, opts.density, fp, advice, estimated=False))
    smf_path = staging / "model.smf"
    layers = layer_table(model, masks, data.input_shape, smf_path.read_bytes() if smf_path.is_file() else None)
    boards = board_table(staging, profile, fp.as_dict(), arena, acts, layers)
    add_latency_shares(layers, boards[profile.name])  # the per-layer column is the target's estimate
    notes = []
    if mismatch:
        notes.append(f"LiteRT and TFLite Micro int8 outputs differ in {mismatch} entries")
    if opts.dense_as_conv:
        notes.append("dense layers are exported as 1x1 CONV_2D: LiteRT's int8 FULLY_CONNECTED rounds differently "
                     "from TFLite Micro's (single vs double rounding)")
    artifacts = {name: artifact_entry(staging, staging / name)
                 for name in ("model.tflite", "model_data.h", "model_data.cc", "model.onnx", "model.smf", "model.pt",
                              "metrics.jsonl") if (staging / name).exists()}
    artifacts.update({name: artifact_entry(staging, path) for name, path in bundle_files.items()})
    return Manifest(
        target=profile.name, algorithm=opts.algo, dataset=opts.dataset,
        model={"name": model_name, "prunable_weights": total, "kept_weights": kept,
               "parameters": sum(p.numel() for p in model.parameters()),
               "layers": [n for n, _ in prunable_layers(model)]},
        density=kept / total,
        accuracy={"float": float_acc, "tflite_int8": acc_lite, "tflm_int8": acc_micro},
        int8_agreement={"litert_vs_tflm_identical": mismatch == 0, "mismatched_outputs": mismatch,
                        "compared_outputs": int(lite.size), "litert_resolver": "BUILTIN_REF"},
        arena_bytes=arena, flash_bytes=model_bytes, budget=budget,
        input={"shape": [1, *data.input_shape], "layout": "NHWC", "dtype": "int8",
               "quantization": {"scale": tfl.input_quant.scale, "zero_point": tfl.input_quant.zero_point},
               "preprocessing": data.preprocessing.as_dict()},
        output={"shape": [1, data.num_classes], "dtype": "int8",
                "quantization": {"scale": tfl.output_quant.scale, "zero_point": tfl.output_quant.zero_point}},
        artifacts=artifacts,
        config={**asdict(opts), "train": opts.train_config().as_dict(), "ops": sorted(set(tfl.ops))},
        board=profile.as_dict(), timings_s=timings, toolchain_version=__version__, notes=notes, quality=quality,
        layers=layers, confusion=confusion(data.y_test, micro.argmax(1), data.num_classes), boards=boards,
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
