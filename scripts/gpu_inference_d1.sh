#!/usr/bin/env bash
# One H200 (world 1), issue 17: TSP prefill at D = 1 of a 7B-width model (configs/7b_16k.yaml,
# LAYERS layers, bf16, random weights) at long contexts, then NEW greedy decode tokens; peak
# memory, time to first token, decode tokens/s -> $OUT/inference_d1.jsonl (benchmarks/inference_d1.py).
# (The inference parity tests are CPU float64 tests: tests/inference, not run here.)
# megatron-core comes as a carried wheel in .whl/ (scripts/gpu_env.sh).
# Usage: OUT=dir TSP_COMMIT=sha bash scripts/gpu_inference_d1.sh [SEQS] [LAYERS] [NEW]
#   e.g. bash scripts/gpu_inference_d1.sh 128K,256K,512K,1M 4 8
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_inference}; mkdir -p "$OUT"
source scripts/gpu_env.sh
export PYTHONUNBUFFERED=1
record_device "$OUT/device.txt"
# one process per S: an out-of-memory at one length leaves no fragmentation for the next
for S in $(echo "${1:-128K,256K,512K,1M}" | tr ',' ' '); do
  timeout 900 python3 benchmarks/inference_d1.py --seq "$S" --layers "${2:-4}" --new "${3:-8}" \
    --out "$OUT/inference_d1.jsonl" 2>&1 | tee -a "$OUT/inference_d1.log" | grep -E "inference_d1|Error|error"
done
