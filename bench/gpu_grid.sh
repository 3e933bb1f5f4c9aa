#!/usr/bin/env bash
# Fill the CIFAR-10 grid (bench/fl_grid.py) on a lent GPU machine, with the vectorised client engine.
#
# The device machine gets the working tree only (64 MiB a call, the tree itself included) and nothing beside it,
# and CIFAR-10 is 139 MB (six .xz files), so the data travels in parts over back-to-back calls while the machine
# stays warm (30 s after each call), the last part with the run itself. `pack` sizes the parts to what the tree
# leaves free and prints the calls:
#
#   here:   bash bench/gpu_grid.sh pack ../shared/data/cifar10      # .gpu/part-* + .gpu/SHA256SUMS, git-ignored
#   device: run(command="bash bench/gpu_grid.sh check", carry=[".gpu/part-aa"])   # + the engine's float64 tests
#           run(command="bash bench/gpu_grid.sh unpack", carry=[".gpu/part-ab"]), and so on,
#           each within 30 s of the last call's end
#   device: run(command="bash bench/gpu_grid.sh run 545 18", carry=[LAST PART, ".gpu/SHA256SUMS"],
#               timeout_s=598)                       # LIMIT_S (all workers done by then), WORKERS; + 45 s to spare
#   here:   mkdir -p /tmp/gpu_back && tar xzf FILES_AT/results.tgz -C /tmp/gpu_back &&
#           cat FILES_AT/checkpoints.tgz.* | tar xzf - -C /tmp/gpu_back
#           python bench/fl_grid.py --grid cifar10 --merge /tmp/gpu_back/bench/results/fl_grid_cifar10
#
# `check` runs tests/test_fl_vectorised.py in float64 on cuda (the engine against the one-by-one CPU engine, every
# hook): a failure there costs one short call, not the run. `run` starts bench/vectorised_check.py (float32 whole
# runs, both engines, on this machine) beside the workers: device time is too short to run it first, and a grid
# filled by an engine that check finds off is not committed. Each run checkpoints every round, so what the time
# limit cuts off resumes anywhere. A second `run` on the still-warm machine continues from the first one's state
# (kept in /tmp: each call's fresh copy of the tree would start over from the committed checkpoints). Results,
# checkpoints and logs come back in $OUT. If the machine went cold between calls, `run` says which parts are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=/tmp/cifar10
PY=${PYTHON:-python3}
DEVICE=${GPU_GRID_DEVICE:-cuda}  # GPU_GRID_DEVICE=cpu: a dry run of the whole flow on a machine without a GPU
# GPU_GRID_METHODS=fedtiny,feddst,...: only these methods' runs (fl_grid.py --methods). Measured on the H200 shared by
# 18 workers, FedMef made 15 s a round against 11 s one by one on this project's CPU: leave it to the CPU workers.

PARTS=/tmp/cifar10_parts

unpack() {  # keep the parts this call carried; assemble the data once all are here
  mkdir -p "$PARTS" "$DATA"
  for p in .gpu/part-*; do [ -e "$p" ] && cp "$p" "$PARTS/"; done
  if [ -f .gpu/SHA256SUMS ]; then cp .gpu/SHA256SUMS "$PARTS/"; fi
  ls "$PARTS"
  if [ -f "$PARTS/SHA256SUMS" ] && (cd "$PARTS" && sha256sum --quiet -c SHA256SUMS); then
    cat "$PARTS"/part-* | tar xf - -C "$DATA"
  fi
}

case "${1:-}" in
pack)
  src=${2:?usage: gpu_grid.sh pack CIFAR10_DIR}
  mkdir -p .gpu && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
  rm -f .gpu/part-* .gpu/SHA256SUMS
  # what travels anyway: tracked files and untracked ones git does not ignore (the device tool's rule)
  tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null \
          | awk '{s += $1} END {print s + 0}')
  part=$(( (62 * 1048576 - tree) / 1048576 ))  # MiB, 2 MiB spare for SHA256SUMS and the transfer's own files
  [ "$part" -ge 8 ] || { echo "the working tree ($((tree / 1048576)) MiB) leaves too little of a call's 64 MiB" \
                              "for the data; commit fewer checkpoints or ignore more" >&2; exit 2; }
  (cd "$src" && tar cf - data_batch_{1,2,3,4,5}.bin.xz test_batch.bin.xz) | split -b "${part}M" - .gpu/part-
  (cd .gpu && sha256sum part-* > SHA256SUMS)
  ls -l .gpu
  parts=(.gpu/part-*)
  echo "tree $((tree / 1048576)) MiB, parts of ${part} MiB; the calls, back to back:"
  echo "  run(command=\"bash bench/gpu_grid.sh check\", carry=[\"${parts[0]}\"])"
  for p in "${parts[@]:1:${#parts[@]}-2}"; do echo "  run(command=\"bash bench/gpu_grid.sh unpack\", carry=[\"$p\"])"; done
  echo "  run(command=\"bash bench/gpu_grid.sh run 545 18\", carry=[\"${parts[-1]}\", \".gpu/SHA256SUMS\"], timeout_s=598)"
  echo "  and with the budget left, within 30 s: run(command=\"GPU_GRID_CHECK=0 bash bench/gpu_grid.sh run L 18\"," \
       "carry=[\".gpu/SHA256SUMS\"], timeout_s=L+45)" ;;
unpack)
  unpack ;;
check)
  unpack
  { nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || echo "no nvidia-smi"; }
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  TOOLCHAIN_TEST_DEVICE=$DEVICE PYTHONPATH=$PWD timeout 150 $PY -m pytest -q -p no:cacheprovider \
    --durations=5 tests/test_fl_vectorised.py -k "not train_device_flag" ;;  # (the CLI needs TF, flwr: absent there)
run)
  limit=${2:-480}; workers=${3:-12}
  out=${OUT:-/tmp/gpu_grid_out}; mkdir -p "$out"
  unpack
  [ "$(ls "$DATA"/*.xz 2>/dev/null | wc -l)" = 6 ] || {
    echo "CIFAR-10 is not complete in $DATA (parts here: $(ls "$PARTS" | tr '\n' ' ')): the machine went cold" \
         "between calls; carry the parts again"; exit 2; }
  { nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || echo "no nvidia-smi"; } | tee "$out/gpu.txt"
  export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
  logs=/tmp/gpu_grid_logs; rm -rf "$logs"; mkdir -p "$logs"; cp "$out/gpu.txt" "$logs/"
  state=/tmp/gpu_grid_state  # an earlier `run` on this machine: continue from it
  if [ -d "$state/fl_grid_cifar10" ]; then $PY bench/fl_grid.py --grid cifar10 --merge "$state/fl_grid_cifar10"; fi
  if [ "${GPU_GRID_CHECK:-1}" = 1 ]; then  # GPU_GRID_CHECK=0: every CPU for the workers (the check ran before)
    timeout $((limit - 30)) $PY bench/vectorised_check.py --data "$DATA" --device "$DEVICE" \
      > "$out/check.txt" 2>&1 &
  fi
  # what bounds the workers, for sizing the next lease: GPU utilisation and the CPUs' load every 20 s
  { while sleep 20; do echo "$(date +%s) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader \
      2>/dev/null || echo n/a) load $(cut -d' ' -f1 /proc/loadavg)"; done; } > "$logs/utilisation.txt" 2>&1 &
  sampler=$!
  for i in $(seq "$workers"); do
    # started 2 s apart, each stops 2 s earlier: all are done by LIMIT_S, so the call's timeout_s needs only
    # LIMIT_S plus the merge, report and archives (about 45 s), not the stagger as well
    timeout $((limit - 2 * (i - 1))) $PY bench/fl_grid.py --grid cifar10 --data "$DATA" --device "$DEVICE" \
      ${GPU_GRID_METHODS:+--methods "$GPU_GRID_METHODS"} > "$logs/worker$i.log" 2>&1 &
    sleep 2
  done
  for j in $(jobs -p); do [ "$j" = "$sampler" ] || wait "$j" || true; done
  kill "$sampler" 2>/dev/null || true
  $PY bench/fl_grid.py --grid cifar10 --report > /dev/null || true
  rm -rf "$state" && mkdir -p "$state" && cp -r bench/results/fl_grid_cifar10 "$state/"
  # at most 8 files of 16 MB come back: one archive of results and logs, the checkpoints in 15 MB pieces
  shopt -s nullglob  # (the engine check's files are absent if its time ran out)
  tar czf "$out/results.tgz" bench/results/fl_grid_cifar10.* bench/results/fl_grid_cifar10/*.json \
    bench/results/vectorised_engine_"${DEVICE//:/}".* -C /tmp gpu_grid_logs
  tar czf - bench/results/fl_grid_cifar10/checkpoints | split -b 15M - "$out/checkpoints.tgz."
  tail -n 3 "$logs"/worker*.log ;;
*)
  echo "usage: bash bench/gpu_grid.sh pack DIR | check | unpack | run [LIMIT_S] [WORKERS]" >&2; exit 2 ;;
esac
