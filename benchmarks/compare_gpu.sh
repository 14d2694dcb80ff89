#!/usr/bin/env bash
# The GPU preset of benchmarks/compare.py, one process per seed sharing one GPU (a ResNet18 step at
# this size leaves the GPU mostly idle waiting for kernel launches, so three processes overlap well).
# Sized for one 10-minute window on an H100/H200: each process starts no new unit after
# TIME_BUDGET seconds; compare.py is resumable, so running this again finishes what is left.
#
#   bash benchmarks/compare_gpu.sh [OUT_DIR] [extra compare.py options...]
#
# A smoke run (tiny data, one epoch) goes first and stops everything if it fails.
set -euo pipefail
out=${1:-bench-out/compare-gpu}
shift || true
budget=${TIME_BUDGET:-420}
threads=$(( $(nproc) / 3 ))
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${threads:-1}
criteria=(convsim-taylor convsim lamp taylor l1 l2 fpgm random)
mkdir -p "$(dirname "$out")"

python3 benchmarks/compare.py --preset gpu --device cuda --subset 1000 --val-split 500 --epochs 1 \
    --finetune-epochs 1 --criteria convsim convsim-taylor lamp --targets 0.25 --seeds 0 \
    --out "$out-smoke" "$@" > "$out-smoke.log" 2>&1 || { tail -40 "$out-smoke.log"; exit 1; }
echo "smoke run passed"

pids=()
for seed in 0 1 2; do
    python3 benchmarks/compare.py --preset gpu --device cuda --seeds "$seed" --shard "s$seed" \
        --criteria "${criteria[@]}" --time-budget "$budget" --out "$out" "$@" > "$out-s$seed.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python3 benchmarks/compare.py --preset gpu --device cuda --criteria "${criteria[@]}" --out "$out" --table-only "$@" \
    > "$out-table.log" 2>&1 || status=1
cat "$out-table.log"
exit $status
