"""``report.md`` and its plots, from ``manifest.json`` + ``metrics.jsonl`` alone (``toolchain report DIR``).

The build computes the facts (:func:`layer_table`, :func:`confusion`, :func:`board_table`) and stores them
in the manifest; rendering reads only the manifest and the per-round metrics, so a report can be re-rendered
(or read as JSON) from a build folder at any time. Plots are PNG files in ``plots/``, embedded in the report.

Latency: MicroPython boards get an estimate from the device engine's Cortex-M3 instruction counts and the
board's clock (toolchain.boards.latency), labelled as an estimate everywhere it appears; TFLite Micro and Jetson
boards run engines that were not measured and say "not measured".
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.boards.latency import METHOD, NOT_MEASURED, estimate
from toolchain.boards.profiles import BoardProfile, all_profiles
from toolchain.contracts.errors import ToolchainError
from toolchain.contracts.smf import read_smf
from toolchain.export.smf_writer import tflite_to_smf
from toolchain.models.zoo import prunable_layers
from toolchain.package.bundle import write_bundle
from toolchain.pipelines.select import board_kind, footprint

PLOTS = "plots"


def layer_table(model: nn.Module, masks: dict[str, torch.Tensor], in_shape: tuple[int, int, int],
                smf: bytes | None) -> list[dict[str, Any]]:
    """Per prunable layer: kept weights, density, int8 bytes (dense) and in ``model.smf`` (encoded block), MACs."""
    outs: dict[str, tuple[int, ...]] = {}
    layers = prunable_layers(model)
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, tuple(o.shape))) for n, m in layers]
    with torch.no_grad():
        model.eval()(torch.zeros(1, in_shape[2], in_shape[0], in_shape[1]))
    for h in hooks:
        h.remove()
    blocks: list[int] = []
    if smf is not None:

        blocks = [op.weight_bytes for op in read_smf(smf).ops if op.weights is not None]
    rows = []
    for i, (name, m) in enumerate(layers):
        mask = masks.get(f"{name}.weight")
        n = m.weight.numel()
        kept = int(mask.sum()) if mask is not None else n
        pixels = int(np.prod(outs[name][2:])) if len(outs[name]) == 4 else 1
        rows.append({
            "layer": name, "type": "conv" if isinstance(m, nn.Conv2d) else "dense",
            "shape": list(m.weight.shape), "weights": n, "kept": kept, "density": kept / n,
            "int8_bytes": n, "smf_bytes": blocks[i] if i < len(blocks) and len(blocks) == len(layers) else None,
            "macs_dense": n * pixels, "macs_sparse": kept * pixels
        })
    total = sum(r["macs_sparse"] for r in rows) or 1
    for r in rows:
        r["mac_share"] = r["macs_sparse"] / total
    return rows


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[list[int]]:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm.tolist()


def board_table(build_dir: Path, target: BoardProfile, target_fp: dict[str, Any], arena: int,
                activation_floats: int, layers: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """This build's files counted for every known board (the target's figures are the gate's own), plus a
    generic TFLite Micro (C) board: the same rules as the budget gate (toolchain.pipelines.select.footprint); each
    row's ``latency`` is toolchain.boards.latency's estimate from ``layers`` (:func:`layer_table`)."""
    import shutil

    def row(p: BoardProfile, fp: dict[str, Any]) -> dict[str, Any]:
        fits = not fp.get("problem") and fp["ram_needed"] <= p.ram_bytes and fp["flash_needed"] <= p.flash_bytes
        lat = estimate(p, layers or [])
        return {"runtime": p.runtime, "ram_needed": fp["ram_needed"], "ram_bytes": p.ram_bytes,
                "flash_needed": fp["flash_needed"], "flash_bytes": p.flash_bytes, "fits": fits,
                "problem": fp.get("problem", ""), "latency_ms": lat["latency_ms"], "latency": lat}

    out = {target.name: row(target, target_fp)}
    for name, p in all_profiles().items():
        if name == target.name:
            continue
        kind = board_kind(p)
        try:
            if kind == "micropython":
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copy(build_dir / "model.tflite", Path(tmp) / "model.tflite")
                    if (build_dir / "model.smf").is_file():
                        shutil.copy(build_dir / "model.smf", Path(tmp) / "model.smf")
                    else:  # a TFLite Micro build: the sparse file a MicroPython board would get

                        (Path(tmp) / "model.smf").write_bytes(tflite_to_smf((build_dir / "model.tflite").read_bytes()))
                    write_bundle(Path(tmp), p)
                    fp = footprint(p, Path(tmp)).as_dict()
            else:
                fp = footprint(p, build_dir, arena, activation_floats).as_dict()
        except ToolchainError as exc:
            fp = {"ram_needed": 0, "flash_needed": 0, "problem": str(exc).split("; ")[0]}
        out[name] = row(p, fp)
    tflite = (build_dir / "model.tflite").stat().st_size
    out["(any TFLite Micro board)"] = {"runtime": "tflite-micro", "ram_needed": arena, "ram_bytes": None,
                                       "flash_needed": tflite, "flash_bytes": None, "fits": None, "problem": "",
                                       "latency_ms": NOT_MEASURED,
                                       "latency": {"latency_ms": NOT_MEASURED,
                                                   "method": "tflite-micro engine not measured"}}
    return out


def add_latency_shares(layers: list[dict[str, Any]], target_row: dict[str, Any]) -> None:
    """Each layer's ``latency_share``: its part of the target's estimated instructions (None without one)."""
    lat = target_row.get("latency") or {}
    per_layer, total = lat.get("layer_instructions"), lat.get("instructions")
    for i, ly in enumerate(layers):
        ly["latency_share"] = per_layer[i] / total if per_layer and total else None


def _latency(r: dict[str, Any]) -> str:
    """A board's latency cell: the figure with its engine, or why there is none."""
    lat = r.get("latency") or {}
    ms = r.get("latency_ms", NOT_MEASURED)
    if not isinstance(ms, (int, float)):
        # older manifests carry only the string; a reason is shown when the build gave one
        return f"{ms} ({lat['method']})" if lat.get("method") else str(ms)
    figure = f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"  # no exponent for the micro:bit's seconds
    return f"~{figure} ms ({lat.get('engine', '?')}, {lat.get('instructions', 0) / 1e6:.2f} M instr)"


# --- rendering -----------------------------------------------------------------------------------------

def _kb(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 10 << 20:
        return f"{n / (1 << 20):.0f} MB"
    return f"{n} B" if n < 10240 else f"{n / 1024:.1f} KB"


def _share(ly: dict[str, Any]) -> str:
    share = ly.get("latency_share")
    return NOT_MEASURED if share is None else f"{share * 100:.1f} %"


def _pct(a: int, b: int | None) -> str:
    return f"{100 * a / b:.0f} %" if b else "-"


def write_plots(m: dict[str, Any], rounds: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    """PNG plots into ``folder/plots``: accuracy and density per round, per-layer density, memory per board."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    (folder / PLOTS).mkdir(exist_ok=True)
    files: dict[str, str] = {}

    pts = [r for r in rounds if r.get("accuracy") == r.get("accuracy")]
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        ax.plot([r["round"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o", ms=3, color="tab:blue")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)", color="tab:blue")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax2 = ax.twinx()
        ax2.plot([r["round"] for r in rounds], [r["density"] for r in rounds], marker="s", ms=3, color="tab:orange")
        ax2.set_ylabel("density (kept fraction)", color="tab:orange")
        ax2.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(f"{m['algorithm']} / {m['model']['name']} / {m['dataset']}")
        fig.tight_layout()
        fig.savefig(folder / PLOTS / "rounds.png", dpi=110)
        plt.close(fig)
        files["rounds"] = f"{PLOTS}/rounds.png"

    layers = m.get("layers") or []
    if layers:
        fig, ax = plt.subplots(figsize=(6.4, 3.0))
        names = [ly["layer"] for ly in layers]
        ax.bar(names, [100 * ly["density"] for ly in layers], color="tab:green")
        ax.axhline(100 * m["density"], color="k", lw=0.8, ls="--", label=f"overall {100 * m['density']:.1f} %")
        ax.set_ylabel("kept weights (%)")
        ax.legend(frameon=False)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(folder / PLOTS / "layers.png", dpi=110)
        plt.close(fig)
        files["layers"] = f"{PLOTS}/layers.png"

    boards = {k: v for k, v in (m.get("boards") or {}).items() if v.get("ram_bytes") and not v.get("problem")}
    if boards:
        fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.8))
        for ax, key, cap in ((axes[0], "ram_needed", "ram_bytes"), (axes[1], "flash_needed", "flash_bytes")):
            names = list(boards)[::-1]  # the target (first) on top
            used = [100 * boards[n][key] / boards[n][cap] for n in names]
            bars = ax.barh(names, used, color=["tab:red" if u > 100 else "tab:blue" for u in used])
            ax.bar_label(bars, labels=[f"{u:.2g} %" for u in used], padding=2, fontsize=7)
            ax.axvline(100, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(f"{'RAM' if key == 'ram_needed' else 'flash'} used (% of the board's budget)")
            ax.grid(alpha=0.3, axis="x")
        axes[1].set_yticklabels([])
        fig.tight_layout()
        fig.savefig(folder / PLOTS / "memory.png", dpi=110)
        plt.close(fig)
        files["memory"] = f"{PLOTS}/memory.png"
    return files


def render(m: dict[str, Any], rounds: list[dict[str, Any]], plots: dict[str, str]) -> str:
    acc, b, q = m["accuracy"], m["budget"], m.get("quality") or {}
    cfg = m.get("config", {})
    lines = [
        f"# Build report: {m['model']['name']} for {m['target']}",
        "",
        f"`{m['algorithm']}` on `{m['dataset']}`: {cfg.get('rounds', '?')} rounds x {cfg.get('clients', '?')} clients, "
        f"density {m['density']:.4f} ({m['model']['kept_weights']} of {m['model']['prunable_weights']} prunable "
        f"weights kept); toolchain {m['toolchain_version']}.",
        "",
    ]
    if q.get("at_chance"):
        lines += [f"**Not usable: {q['message']}** (exit code 5; the files are kept for inspection.)", ""]
    lines += [
        "## Accuracy (test set)", "",
        "| float (BN folded) | int8 LiteRT | int8 TFLite Micro | chance (majority class) |",
        "|---|---|---|---|",
        f"| {acc['float'] * 100:.2f} % | {acc['tflite_int8'] * 100:.2f} % | {acc['tflm_int8'] * 100:.2f} % | "
        + (f"{q['chance'] * 100:.2f} % |" if "chance" in q else "- |"),
        "",
        f"LiteRT vs TFLite Micro int8 outputs: "
        f"{'identical' if m['int8_agreement']['litert_vs_tflm_identical'] else 'differ'} "
        f"({m['int8_agreement']['mismatched_outputs']} of {m['int8_agreement']['compared_outputs']} differ).",
        "",
        f"## On the board: {m['target']}", "",
        f"{m['board'].get('description', '')}. Counted as the board loads it (`{b.get('kind', '?')}` rule, "
        "docs/build.md).",
        "",
        "| | needed | available | used | estimated before training |",
        "|---|---|---|---|---|",
    ]
    est = b.get("estimate") or {}
    for label, need, have in (("RAM", "ram_needed", "ram_bytes"), ("flash", "flash_needed", "flash_bytes")):
        lines.append(f"| {label} | {_kb(b[need])} | {_kb(b[have])} | {_pct(b[need], b[have])} | "
                     f"{_kb(est.get(need)) if est else '-'} |")
    ram_rule = {"micropython": " (the engine's heap for this model, from its data layout; the firmware and engine "
                               "code are outside the board's figure)",
                "tflm": " (the TFLite Micro arena, measured)", "onnx": " (ONNX weights + float32 activations)"}
    target_row = (m.get("boards") or {}).get(m["target"]) or {}
    lines += [f"| latency (estimate) | {_latency(target_row)} | | | |", "", f"**{'Fits' if b['fits'] else 'Does not fit'}.** "
              f"RAM: {', '.join(f'{k} {v} B' for k, v in (b.get('ram_parts') or {}).items())}"
              f"{ram_rule.get(b.get('kind', ''), '')}.", ""]
    flash_parts = b.get("deployed") or {}
    if flash_parts:
        model_files = {k: v for k, v in flash_parts.items() if k.startswith("model") or k.endswith((".smc", ".bin"))}
        code = sum(v for k, v in flash_parts.items() if k.endswith((".mpy", ".py", ".sh")) and k not in model_files)
        rest = sum(flash_parts.values()) - sum(model_files.values()) - code
        lines += ["Flash: " + ", ".join([*(f"`{k}` {v} B" for k, v in model_files.items()),
                                          *([f"runtime code {code} B"] if code else []),
                                          *([f"other {rest} B"] if rest else [])]) + ".", ""]

    boards = m.get("boards") or {}
    if boards:
        lines += ["## Every board (this build's files, the same counting rules)", "",
                  "| board | runtime | RAM needed / available | flash needed / available | fits | latency (estimate) |",
                  "|---|---|---|---|---|---|"]
        for name, r in boards.items():
            if r.get("problem"):
                lines.append(f"| {name} | {r['runtime']} | cannot run: {r['problem']} | | no | - |")
                continue
            fits = "-" if r["fits"] is None else "yes" if r["fits"] else "no"
            lines.append(f"| {name} | {r['runtime']} | {_kb(r['ram_needed'])} / {_kb(r['ram_bytes'])} | "
                         f"{_kb(r['flash_needed'])} / {_kb(r['flash_bytes'])} | {fits} | {_latency(r)} |")
        lines += ["", f"Latency: {METHOD}, from bench/results/engine_speed.json (toolchain/boards/latency.py): the "
                  "MicroPython engine's instructions per inference measured on a Cortex-M3 under QEMU, fitted per "
                  "layer, divided by the board's `clock_hz`; native viper kernels where the bundle is compiled for "
                  "the board (`mpy_march`), bytecode elsewhere. Not a measurement on the board.", ""]
    if "memory" in plots:
        lines += [f"![RAM and flash per board]({plots['memory']})", ""]

    layers = m.get("layers") or []
    if layers:
        lines += ["## Layers", "",
                  "| layer | type | weight shape | kept | density | int8 bytes (dense) | `.smf` bytes | MACs dense | "
                  "MACs sparse | share of sparse MACs | share of latency (estimate) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for ly in layers:
            lines.append(f"| {ly['layer']} | {ly['type']} | {'x'.join(map(str, ly['shape']))} | {ly['kept']} | "
                         f"{ly['density'] * 100:.1f} % | {ly['int8_bytes']} | "
                         f"{'-' if ly['smf_bytes'] is None else ly['smf_bytes']} | {ly['macs_dense']} | "
                         f"{ly['macs_sparse']} | {ly['mac_share'] * 100:.1f} % | {_share(ly)} |")
        eng = target_row.get("latency", {}).get("engine")
        lines += ["", f"Sparse MACs in all: {sum(ly['macs_sparse'] for ly in layers)} "
                  f"(dense {sum(ly['macs_dense'] for ly in layers)}). The engine visits kept weights only. Share of "
                  + (f"latency: the layer's part of the {m['target']} estimate ({eng} engine), the rest is the "
                     "operators between layers; an estimate, not a measured time." if eng else
                     f"latency: {NOT_MEASURED} on {m['target']} (its engine's speed was not measured)."), ""]
        if "layers" in plots:
            lines += [f"![kept weights per layer]({plots['layers']})", ""]

    cm = m.get("confusion")
    if cm:
        k = len(cm)
        lines += ["## Confusion matrix (int8 TFLite Micro, test set; rows: true class, columns: predicted)", "",
                  "| | " + " | ".join(str(j) for j in range(k)) + " | recall |",
                  "|---|" + "---|" * (k + 1)]
        for i, row in enumerate(cm):
            total = sum(row) or 1
            lines.append(f"| **{i}** | " + " | ".join(f"**{v}**" if j == i else str(v) for j, v in enumerate(row))
                         + f" | {100 * row[i] / total:.1f} % |")
        lines.append("")

    lines += ["## Rounds", ""]
    if "rounds" in plots:
        lines += [f"![accuracy and density per round]({plots['rounds']})", ""]
    lines += ["| round | accuracy | density | bytes up / client | bytes down / client |", "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['accuracy'] * 100:.2f} % | {r['density']:.4f} | {r['bytes_up_per_client']:.0f} | "
              f"{r['bytes_down_per_client']:.0f} |" for r in rounds]
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in (m.get("timings_s") or {}).items()]
    lines += ["", "## Artifacts", "", "| file | bytes | sha256 |", "|---|---|---|"]
    arts = m["artifacts"].values()
    lines += [f"| {a['path']} | {a['bytes']} | `{a['sha256'][:16]}...` |" for a in arts
              if not a["path"].startswith("bundle/")]
    bundle = [a for a in arts if a["path"].startswith("bundle/")]
    if bundle:
        lines.append(f"| bundle/ ({len(bundle)} files: what `toolchain flash` copies; each with its sha256 in "
                     f"manifest.json) | {sum(a['bytes'] for a in bundle)} | |")
    if m.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in m["notes"]]
    lines.append("")
    return "\n".join(lines)


def write_report(folder: Path, m: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    plots = write_plots(m, rounds, folder)
    (folder / "report.md").write_text(render(m, rounds, plots))


def load_build(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, per-round metrics) of a build folder, with one-line errors."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ToolchainError(f"no manifest.json in {folder}; pass a `toolchain build` output folder")
    try:
        m = json.loads(mpath.read_text())
        rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ToolchainError(f"cannot read {folder} ({exc.strerror or exc}); rebuild with `toolchain build`") from None
    except json.JSONDecodeError as exc:
        raise ToolchainError(f"{folder} holds invalid JSON ({exc.msg}); rebuild with `toolchain build`") from None
    for key in ("target", "model", "accuracy", "budget", "artifacts"):
        if key not in m:
            raise ToolchainError(f"{mpath} has no '{key}'; it is not a manifest written by `toolchain build`")
    return m, rounds


def summary_json(m: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """What the report shows, for machines."""
    keys = ("target", "algorithm", "dataset", "density", "accuracy", "quality", "budget", "boards", "layers",
            "confusion", "timings_s", "int8_agreement", "toolchain_version")
    return {**{k: m.get(k) for k in keys}, "model": m["model"]["name"],
            "rounds": [{k: r.get(k) for k in ("round", "accuracy", "density", "bytes_up_per_client",
                                                 "bytes_down_per_client")} for r in rounds]}
