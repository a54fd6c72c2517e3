#!/usr/bin/env bash
# One H200 (world 1): a change to the training step or the offload path, checked on CUDA against
# the commit before it. The GPU parity tests (tests/gpu), the distributed tests of the step, recompute,
# offload and memory at world 1 on the GPU, then benchmarks/frontier_d1.py rows (peak memory, step
# time, loss) run from this tree and from OLD (a `git archive` tarball of the older commit,
# carried as .gpu_old.tar), to compare: same loss bit for bit, same peak, same time within noise.
# Usage: OUT=dir TSP_COMMIT=sha bash scripts/gpu_regress_d1.sh [SEQ] [MODES] [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_regress}; mkdir -p "$OUT"
source scripts/gpu_env.sh
export PYTHONUNBUFFERED=1
record_device "$OUT/device.txt"
timeout 200 python3 -m pytest -q -rs -s tests/gpu > "$OUT/pytest_gpu.log" 2>&1
grep -E "^BF16|passed|failed|^E " "$OUT/pytest_gpu.log" | sort -u | head -20
timeout 240 torchrun --standalone --nproc-per-node 1 -m pytest -q -x -m distributed tests/training/test_recompute.py \
  tests/tsp/test_memory.py tests/training/test_loop.py > "$OUT/pytest_dist_world1.log" 2>&1
tail -3 "$OUT/pytest_dist_world1.log"
SEQ=${1:-128K}; MODES=${2:-full_uniform,offload}; STEPS=${3:-2}
python3 benchmarks/frontier_d1.py --seq "$SEQ" --modes "$MODES" --steps "$STEPS" --warmup 1 \
  --out "$OUT/new.jsonl" 2>&1 | tee "$OUT/new.log" | grep -E "frontier_d1|Error|error"
if [ -f .gpu_old.tar ]; then
  rm -rf /tmp/old && mkdir -p /tmp/old && tar -xf .gpu_old.tar -C /tmp/old
  (cd /tmp/old && PYTHONPATH=/tmp/site:/tmp/old python3 benchmarks/frontier_d1.py --seq "$SEQ" --modes "$MODES" \
    --steps "$STEPS" --warmup 1 --out "$OUT/old.jsonl" 2>&1) | tee "$OUT/old.log" | grep -E "frontier_d1|Error|error"
  python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
load = lambda n: {(r["mode"], r["seq_len"]): r["measured"] for r in map(json.loads, open(f"{out}/{n}.jsonl")) if "mode" in r}
old, new = load("old"), load("new")
for k in sorted(new):
    o, n = old.get(k), new[k]
    print("compare", k, "loss", o and o["loss"], n["loss"], "same" if o and o["loss"] == n["loss"] else "DIFFERENT",
          "peak GiB", o and round(o["peak_allocated_gib"], 3), round(n["peak_allocated_gib"], 3),
          "step s", o and round(o["step_time_s"], 3), round(n["step_time_s"], 3))
PY
fi
