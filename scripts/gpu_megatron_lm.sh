#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt.py on the 4-GPU machine: TSP D=4 through megatron_tsp.megatron_lm.run vs native
# TP=4 + sequence parallelism, then TSP through the patched pretrain_gpt.py; mock data, bf16,
# 7B-class width (h=4096, 32 heads, FFN 16384) with few layers. Logs, compare.json and compare.md
# under $OUT (default runs/gpu_megatron_lm).
# Needs (carried, ignored folders): .megatron-lm/ (scripts/prune_megatron_lm.sh at a supported
# tag whose megatron-core is the carried wheel's, e.g. core_v0.19.0 with megatron-core 0.19.x, or
# KEEP_CORE=1) and .whl/ (megatron-core and pydantic wheels; scripts/gpu_env.sh installs them).
# Usage: bash scripts/gpu_megatron_lm.sh        env: RUNS (tsp,tp_sp,patched) ITERS (30)
#        LAYERS (8) SEQ (16384) RECIPE (configs/megatron_lm/7b_16k.yaml) RUN_TIMEOUT (420 s a run)
#        EXTRA_ARGS (more Megatron flags, e.g. "--lr 2e-5 --min-lr 2e-5")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_megatron_lm}; mkdir -p "$OUT"
RUNS=${RUNS:-tsp,tp_sp,patched}; ITERS=${ITERS:-30}; LAYERS=${LAYERS:-8}; SEQ=${SEQ:-16384}
RECIPE=${RECIPE:-configs/megatron_lm/7b_16k.yaml}
source scripts/gpu_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
MLM=$PWD/.megatron-lm
[ -f "$MLM/pretrain_gpt.py" ] || { echo "error: $MLM/pretrain_gpt.py missing: carry .megatron-lm (bash scripts/prune_megatron_lm.sh <Megatron-LM at a tag of patches/>)" >&2; exit 2; }
{ nvidia-smi -L; python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| megatron-core', m.__version__, m.__file__)"
  echo "Megatron-LM $(cat "$MLM/TAG" 2>/dev/null) $(cat "$MLM/PINNED_COMMIT" 2>/dev/null) | megatron-tsp $(git rev-parse --short HEAD 2>/dev/null)"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
python3 -c "import pydantic, megatron.core" || { echo "error: pydantic / megatron-core missing: carry .whl" >&2; exit 2; }
patched_args=()
if [[ ",$RUNS," == *,patched,* ]]; then
  PATCHED=/tmp/megatron-lm-patched; rm -rf "$PATCHED"; cp -r "$MLM" "$PATCHED"
  bash scripts/apply_patches.sh "$PATCHED" 2>&1 | tee "$OUT/apply_patches.log" || exit 2
  patched_args=(--patched-dir "$PATCHED")
fi
python3 scripts/compare_tsp_vs_tpsp.py --megatron-lm "$MLM" --recipe "$RECIPE" --size 4 --iters "$ITERS" \
  --runs "$RUNS" "${patched_args[@]}" --out "$OUT" --timeout "${RUN_TIMEOUT:-420}" \
  -- --num-layers "$LAYERS" --seq-length "$SEQ" --max-position-embeddings "$SEQ" --log-memory-interval "$ITERS" ${EXTRA_ARGS:-}
rc=$?
for f in "$OUT"/*.log; do echo "== $f"; grep -E "Error|error:|iteration +$ITERS/" "$f" | tail -3; done
exit $rc
