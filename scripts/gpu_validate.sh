#!/usr/bin/env bash
# GPU validation on the 4 x H200 machine: the parity suites under NCCL (float64 blocks and
# float32 model from the `distributed` tests, bfloat16 from tests/gpu) at world sizes 2 and 4, and
# the tiny example. Logs go to ${OUT:-runs/gpu}. megatron-core comes as a carried wheel in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
source scripts/gpu_env.sh
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"; git rev-parse HEAD 2>/dev/null; } > "$OUT/device.txt" 2>&1
status=0
for n in 2 4; do
  torchrun --standalone --nproc-per-node "$n" -m pytest -q -s -rs -m "distributed or gpu" tests > "$OUT/pytest_world$n.log" 2>&1 || status=1
  grep -E "^BF16|passed|failed|^E " "$OUT/pytest_world$n.log" | sort -u | head -40
done
torchrun --standalone --nproc-per-node 4 -m megatron_tsp.training.example --steps 20 --seq-length 1024 2>&1 | tee "$OUT/example_world4.log" | tail -6
exit $status
