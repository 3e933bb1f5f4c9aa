"""Wall time of `toolchain build --target esp32` on the embedded default (acceptance: <= 90 s).

Runs the CLI as a user would (a fresh process, so imports count), `--repeat` times, and writes
bench/results/build_time.json and .md with the machine, the per-stage timings and the accuracies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, machine, parser, write_results


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--target", default="esp32")
    args = ap.parse_args()
    runs = []
    for i in range(args.repeat):
        out = Path(tempfile.mkdtemp()) / args.target
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "build", "--target", args.target, "--out",
                               str(out), "--quiet"], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        m = json.loads((out / "manifest.json").read_text())
        runs.append({"run": i + 1, "wall_s": round(wall, 2), "timings_s": m["timings_s"], "accuracy": m["accuracy"],
                     "density": m["density"], "litert_vs_tflm_identical": m["int8_agreement"]["litert_vs_tflm_identical"],
                     "arena_bytes": m["arena_bytes"], "flash_bytes": m["flash_bytes"]})
        print(f"run {i + 1}: {wall:.1f} s, int8 TFLM accuracy {m['accuracy']['tflm_int8'] * 100:.2f} %")
    result = {"benchmark": "build_time", "command": f"toolchain build --target {args.target}", "limit_s": 90,
              "machine": machine("platform", "python", "cpus", "processor", "load_avg_at_start"), "runs": runs,
              "max_wall_s": max(r["wall_s"] for r in runs)}
    lines = [f"# `{result['command']}` wall time", "",
             f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
             f"load average at start {result['machine']['load_avg_at_start'][0]:.2f}.", "",
             "| run | wall (s) | train (s) | verify (s) | float acc | int8 LiteRT | int8 TFLM | density | LiteRT == TFLM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a = r["accuracy"]
        lines.append(f"| {r['run']} | {r['wall_s']:.1f} | {r['timings_s']['train']:.1f} | {r['timings_s']['verify']:.1f} "
                     f"| {a['float'] * 100:.2f} % | {a['tflite_int8'] * 100:.2f} % | {a['tflm_int8'] * 100:.2f} % "
                     f"| {r['density']:.4f} | {r['litert_vs_tflm_identical']} |")
    lines += ["", f"Limit: 90 s. Slowest run: {result['max_wall_s']:.1f} s.", ""]
    write_results(RESULTS / "build_time", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
