#!/usr/bin/env bash
# Issues 25, 26, 27 on one GPU (H100 or H200), in parts that each fit one 10-minute device call.
# Each part appends JSON lines under $OUT and resumes from them (copy a part's file back into
# $OUT's place before the next call to go on where a call stopped).
#   OUT=dir TSP_COMMIT=sha bash scripts/gpu_frontier_levers.sh PART
# PART:
#   bracket    the measured frontier with every lever (tiled MLP, TSP's streamed K/V, the CP
#              layouts' ring, the optimizer state on the host), full 7B at 4 ranks, each layout's
#              planner guess and one 6% step (benchmarks/probe_bracket.py; ~1-2 min a probe)
#   levers     each lever's compute cost at 512K, 4 ranks, 2 layers (benchmarks/lever_timing.py)
#   documents  packed-document attention, flex masked vs cuDNN unmasked, per rank at D = 1 and 4
#              (benchmarks/document_attention.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_frontier_levers}; mkdir -p "$OUT"
source scripts/gpu_env.sh
export PYTHONUNBUFFERED=1
record_device "$OUT/device.txt"
case "${1:-}" in
  bracket)
    timeout "${LIMIT_S:-570}" python3 benchmarks/probe_bracket.py --world 4 --layouts "${LAYOUTS:-tsp,tp_sp,fsdp_cp4,tp2_cp2,cp4}" \
      --host-memory-gb "${HOST_GB:-400}" --mlp-chunk-tokens 8192 --tsp-attention-kv streamed --cp-comm-type p2p \
      --optimizer-cpu-offload --out "$OUT/bracket_levers_w4.jsonl" 2>&1 | grep -E "probe_bracket|rror|Traceback" ;;
  levers)
    timeout "${LIMIT_S:-570}" python3 benchmarks/lever_timing.py --world 4 --seq 512K --layers 2 --layouts tsp,tp_sp \
      --out "$OUT/lever_timing_w4.jsonl" 2>&1 | grep -E "lever_timing|rror|Traceback" ;;
  documents)
    timeout "${LIMIT_S:-570}" python3 benchmarks/document_attention.py --cases 128K:1,128K:4,1M:4 \
      --out "$OUT/document_attention.jsonl" 2>&1 | grep -E "document_attention|rror|Traceback" ;;
  *) echo "usage: OUT=dir bash scripts/gpu_frontier_levers.sh bracket|levers|documents" >&2; exit 2 ;;
esac
