#!/usr/bin/env bash
# The 7B-class recipes on the 4 x H200 machine: TSP D=4 and Megatron TP+SP (size 4, SDPA core
# attention) through `megatron_tsp.training.loop`; per-run logs and one summaries.json under ${OUT:-runs/gpu7b}.
# Usage: bash scripts/gpu_train_7b.sh [SEQ:STEPS ...]   (default: 16k:20 64k:5)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu7b}; mkdir -p "$OUT"
source scripts/gpu_env.sh
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/device.txt" 2>&1
runs=${*:-16k:20 64k:5}
for run in $runs; do
  seq=${run%%:*}; steps=${run##*:}
  for layout in tsp tp_sp; do
    name=${layout}_${seq}
    timeout 300 torchrun --standalone --nproc-per-node 4 -m megatron_tsp.cli train "configs/7b_${seq}.yaml" \
      parallel.layout=$layout train.steps=$steps --summary-json "/tmp/$name.json" > "$OUT/$name.log" 2>&1
    rc=$?
    [ -f "/tmp/$name.json" ] || echo "{\"layout\": \"$layout\", \"seq\": \"$seq\", \"failed_rc\": $rc, \"oom\": $(grep -q 'OutOfMemoryError' "$OUT/$name.log" && echo true || echo false)}" > "/tmp/$name.json"
    grep -E "^summary|error" "$OUT/$name.log" | head -3
  done
done
python3 - "$OUT/summaries.json" /tmp/*_*k.json <<'PY'
import json, sys
json.dump([json.load(open(p)) for p in sys.argv[2:]], open(sys.argv[1], "w"), indent=1)
PY
