#!/usr/bin/env bash
# `megatron-tsp bench` on the 4 x H200 machine: TSP D=4 against TP=4, TP=4+SP, CP=4, TP2 x CP2,
# FSDP over CP=4 and TSP compute-only, 7B-class shapes, S = 16K..128K, MHA (+ GQA for TSP and
# TP+SP). Rows, reports and the workers' log go to ${OUT:-runs/bench} (the folder that comes back).
# Usage: [GPUS=4] [TAG=h200x$GPUS] [BENCH_COMMIT=<sha>] [BENCH_BUDGET=420] bash scripts/gpu_bench.sh [extra bench flags ...]
#   e.g. bash scripts/gpu_bench.sh --layers 4 --seq 16K,32K,64K,128K,256K
# The PNG needs matplotlib (not on the GPU machine): rebuild the reports here afterwards with
#   megatron-tsp bench --from-jsonl <OUT>/bench_h200x4.jsonl --out benchmarks/results
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench}; mkdir -p "$OUT"
source scripts/gpu_env.sh
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/device.txt" 2>&1
export BENCH_COMMIT=${BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}  # pass it in: the GPU copy of .git may be stale
GPUS=${GPUS:-4}
python3 -m megatron_tsp.cli bench --gpus "$GPUS" --tag "${TAG:-h200x$GPUS}" --out "$OUT" --budget "${BENCH_BUDGET:-420}" "$@"
