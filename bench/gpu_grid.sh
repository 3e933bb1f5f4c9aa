#!/usr/bin/env bash
# Fill the CIFAR-10 grid (bench/fl_grid.py) on a lent GPU machine, with the vectorised client engine.
#
# The device machine gets the working tree only (64 MiB a call) and nothing beside it, and CIFAR-10 is 133 MB
# (six .xz files), so the data travels in parts over back-to-back calls while the machine stays warm:
#
#   here:   bash bench/gpu_grid.sh pack ../shared/data/cifar10      # .gpu/part1..3, ignored by git
#   device: run(command="bash bench/gpu_grid.sh unpack", carry=[".gpu/part1"])    # then part2, part3, each
#           within the machine's warm window (30 s) of the last call
#   device: run(command="bash bench/gpu_grid.sh run 480 12", timeout_s=600)     # limit s, worker processes
#   here:   tar xzf FILES_AT/results.tgz; cat FILES_AT/checkpoints.tgz.* | tar xzf -   (from the repo root)
#           python bench/fl_grid.py --grid cifar10 --report
#
# `run` first checks the engine on this GPU against the one-by-one CPU engine (2 rounds of every method on a
# 2000-sample slice), stops if they disagree, then starts the workers; each run checkpoints every round, so
# what the time limit cuts off resumes anywhere. Results, checkpoints and logs come back in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=/tmp/cifar10
PY=${PYTHON:-python3}

case "${1:-}" in
pack)
  src=${2:?usage: gpu_grid.sh pack CIFAR10_DIR}
  mkdir -p .gpu && grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  (cd "$src" && tar cf - data_batch_1.bin.xz data_batch_2.bin.xz) > .gpu/part1
  (cd "$src" && tar cf - data_batch_3.bin.xz data_batch_4.bin.xz) > .gpu/part2
  (cd "$src" && tar cf - data_batch_5.bin.xz test_batch.bin.xz) > .gpu/part3
  ls -l .gpu ;;
unpack)
  mkdir -p "$DATA"
  for p in .gpu/part*; do tar xf "$p" -C "$DATA"; done
  ls "$DATA" ;;
run)
  limit=${2:-480}; workers=${3:-12}
  out=${OUT:-/tmp/gpu_grid_out}; mkdir -p "$out"
  [ "$(ls "$DATA"/*.xz | wc -l)" = 6 ] || { echo "CIFAR-10 is not complete in $DATA: unpack all three parts first"; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
  export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
  logs=/tmp/gpu_grid_logs; mkdir -p "$logs"; cp "$out/gpu.txt" "$logs/"
  if ! { TOOLCHAIN_TEST_DEVICE=cuda timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_fl_vectorised.py &&
         timeout 150 $PY bench/vectorised_check.py --data "$DATA" --device cuda; } 2>&1 | tee "$out/check.txt"; then
    echo "the engine check failed on this GPU: not filling the grid"; exit 1
  fi
  for i in $(seq "$workers"); do
    timeout "$limit" $PY bench/fl_grid.py --grid cifar10 --data "$DATA" --device cuda > "$logs/worker$i.log" 2>&1 &
    sleep 2
  done
  wait || true
  $PY bench/fl_grid.py --grid cifar10 --report > /dev/null || true
  # at most 8 files of 16 MB come back: one archive of results and logs, the checkpoints in 15 MB pieces
  tar czf "$out/results.tgz" bench/results/fl_grid_cifar10.* bench/results/fl_grid_cifar10/*.json \
    bench/results/vectorised_engine_cuda.* "$logs"
  tar czf - bench/results/fl_grid_cifar10/checkpoints | split -b 15M - "$out/checkpoints.tgz."
  tail -n 3 "$logs"/worker*.log ;;
*)
  echo "usage: bash bench/gpu_grid.sh pack DIR | unpack | run [LIMIT_S] [WORKERS]" >&2; exit 2 ;;
esac
