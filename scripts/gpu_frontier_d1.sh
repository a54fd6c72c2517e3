#!/usr/bin/env bash
# One H200 (world 1): the GPU parity checks that run on one GPU (bf16 TSP at D = 1 against
# Megatron's layers; the lean norms' CUDA kernels; the local LM head), then rows of
# benchmarks/frontier_d1.py (issue 14, "On one H200 GPU"), appended to $OUT/frontier_d1.jsonl.
# megatron-core comes as a carried wheel in .whl/ (scripts/gpu_env.sh).
# Usage: OUT=dir TSP_COMMIT=sha bash scripts/gpu_frontier_d1.sh [--tests] SEQS MODES [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_frontier}; mkdir -p "$OUT"
source scripts/gpu_env.sh
export PYTHONUNBUFFERED=1
record_device "$OUT/device.txt"
if [ "${1:-}" = "--tests" ]; then
  shift
  timeout 240 python3 -m pytest -q -rs -s tests/gpu tests/tsp/test_norm.py > "$OUT/pytest_world1.log" 2>&1
  grep -E "^BF16|passed|failed|^E " "$OUT/pytest_world1.log" | sort -u | head -30
  timeout 120 torchrun --standalone --nproc-per-node 1 -m pytest -q -x tests/tsp/test_lm_head.py \
    tests/training/test_recompute.py > "$OUT/pytest_dist_world1.log" 2>&1
  tail -3 "$OUT/pytest_dist_world1.log"
fi
python3 benchmarks/frontier_d1.py --seq "${1:-128K}" --modes "${2:-save}" --steps "${3:-2}" --warmup 1 \
  --out "$OUT/frontier_d1.jsonl" 2>&1 | tee "$OUT/frontier_d1.log" | grep -E "frontier_d1|Error|error"
