#!/usr/bin/env bash
# Issue 25 on one GPU (H200 when lent, else H100): the probe's GPU tests, the memory-mode check
# (real vs stand-in kernels, every layout), the compute-time profile, then the measured frontier.
# Usage: OUT=dir TSP_COMMIT=sha bash scripts/gpu_probe.sh PARTS   (PARTS: comma-separated of
# tests,calibrate,check,profile,rows2,rows4,rows8,bracket4,bracket8,frontier4,frontier8; each part appends to its file under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_probe}; mkdir -p "$OUT"
source scripts/gpu_env.sh
export PYTHONUNBUFFERED=1
record_device "$OUT/device.txt"
PARTS=${1:-tests,check}
SEQ=${SEQ:-256K}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has tests; then
  timeout 150 python3 -m pytest -q tests/probe/test_probe.py tests/probe/test_standins.py > "$OUT/pytest_probe.log" 2>&1; tail -3 "$OUT/pytest_probe.log"
fi
if has calibrate; then
  python3 -c "from megatron_tsp.probe.standins import calibrate; import json, torch; print(json.dumps(calibrate(torch.device('cuda')), indent=1, default=str))" \
    > "$OUT/calibrate.json" 2>&1; tail -40 "$OUT/calibrate.json"
fi
if has check; then
  python3 benchmarks/probe_gpu.py --jobs check --seq "$SEQ" --layers 4 --world 4 --out "$OUT/check.jsonl" 2>&1 | grep -E "probe_gpu|Error|error"
fi
if has profile; then
  python3 benchmarks/probe_gpu.py --jobs profile --seq "$SEQ" --layers 2 --world 4 --out "$OUT/profile.jsonl" 2>&1 | grep -E "probe_gpu|Error|error"
fi
for W in 4 8; do
  if has bracket$W; then
    python3 benchmarks/probe_bracket.py --world $W --layouts ${LAYOUTS:-tsp,fsdp_cp4,tp_sp} --host-memory-gb ${HOST_GB:-400} \
      --out "$OUT/bracket_w$W.jsonl" 2>&1 | grep -E "probe_bracket|rror"
  fi
done
for W in 2 4 8; do
  if has rows$W; then
    python3 benchmarks/probe_gpu.py --jobs rows --mode all --seq 64K,256K,1M --layers 4,32 --world $W \
      --out "$OUT/rows_w$W.jsonl" 2>&1 | grep -E "probe_gpu|Error|error"
  fi
  if has frontier$W; then
    # host memory: the reference node's 512 GiB per 4 GPUs is 128 GiB per rank, all of this machine's
    # RAM; HOST_GB per node leaves this process room (100 GiB per rank at 4 GPUs)
    python3 -m megatron_tsp.cli probe configs/7b_16k.yaml train.global_batch_size=1 train.micro_batch_size=1 \
      --world $W --frontier --start-seq auto --host-memory-gb ${HOST_GB:-400} --gpus-per-node $W \
      --layouts ${LAYOUTS:-tsp,fsdp_cp4,tp_sp,tp2_cp2} ${FRONTIER_ARGS:-} \
      --out "$OUT/frontier_w$W.jsonl" --json > "$OUT/frontier_w$W.json" 2> "$OUT/frontier_w$W.err"
    grep -E "probe --frontier|tokens|rror" "$OUT/frontier_w$W.err" | tail -30
  fi
done
