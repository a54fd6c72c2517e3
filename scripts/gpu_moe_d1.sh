#!/usr/bin/env bash
# One H200 (world 1), issue 16: MoE on the TSP axis at D = 1, bf16 (~3 minutes).
# 1. tests/gpu/test_moe_bf16.py: a small MoE GPT (8 experts, top-2, shared expert) in bf16
#    against float64 with the same weights and routing decisions (relative error <= 2e-2).
# 2. The OLMoE-1B-7B recipe (configs/olmoe_1b_7b_4k.yaml: h = 2048, 64 experts of FFN 1024,
#    top-8, S = 4096) with LAYERS layers at D = 1 (EP = 1) through the driver, bf16, and its
#    shared-expert variant: loss per step, aux / z loss, expert load, peak memory, tokens/s
#    -> $OUT/olmoe_d1.jsonl, $OUT/olmoe_shared_d1.jsonl. Experts: what megatron-core builds
#    without Transformer Engine (SequentialMLP on 0.18+; printed in the pytest line).
# megatron-core comes as a carried wheel in .whl/ (scripts/gpu_env.sh).
# Usage: OUT=dir TSP_COMMIT=sha bash scripts/gpu_moe_d1.sh [LAYERS] [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_moe}; mkdir -p "$OUT"
source scripts/gpu_env.sh
export PYTHONUNBUFFERED=1
LAYERS=${1:-2}; STEPS=${2:-8}
record_device "$OUT/device.txt"
timeout 150 python3 -m pytest -q -rs -s tests/gpu/test_moe_bf16.py > "$OUT/pytest_moe_bf16.log" 2>&1
grep -E "^BF16|passed|failed|skipped|^E " "$OUT/pytest_moe_bf16.log" | sort -u | head -20
for variant in olmoe_1b_7b_4k:olmoe_d1:$STEPS olmoe_1b_7b_shared_4k:olmoe_shared_d1:$(( (STEPS + 1) / 2 )); do
  IFS=: read -r recipe name steps <<< "$variant"
  rm -f "$OUT/$name.jsonl"
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_tsp.cli train \
    "configs/$recipe.yaml" parallel.size=1 parallel.expert_size=1 "model.num_layers=$LAYERS" \
    "train.steps=$steps" train.global_batch_size=4 train.log_interval=1 "train.metrics_file=$OUT/$name.jsonl" \
    > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"; grep -E "step|summary|Error|error" "$OUT/$name.log" | tail -4
done
