#!/usr/bin/env bash
# Quick GPU check after a change to the TSP schedule (4 x H200): the bf16 and NCCL parity tests
# at world 4, the 7B 16K recipe through the driver (TSP vs TP+SP), and a profiled TSP step.
# Usage: OUT=dir bash scripts/gpu_check.sh [SEQ:STEPS ...]   (default 16k:10)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"
source scripts/gpu_env.sh
timeout 240 torchrun --standalone --nproc-per-node 4 -m pytest -q -s -rs tests/gpu \
  tests/tsp/test_blocks.py tests/tsp/test_gpt.py tests/tsp/test_memory.py > "$OUT/pytest_world4.log" 2>&1
grep -E "^BF16|passed|failed|^E " "$OUT/pytest_world4.log" | sort -u | head -40
OUT="$OUT" bash scripts/gpu_train_7b.sh ${*:-16k:10}
timeout 150 torchrun --standalone --nproc-per-node 4 benchmarks/profile_step.py configs/7b_16k.yaml \
  "$OUT/profile_tsp_16k.txt" > "$OUT/profile.log" 2>&1; tail -2 "$OUT/profile.log"
