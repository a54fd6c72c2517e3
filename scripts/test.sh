#!/usr/bin/env bash
# The test suite: world-1 unit tests, then one torchrun per world size (the ~7 s megatron
# import is paid once per rank), then the SLURM job scripts under a one-node SLURM started here
# (tests/slurm; skipped, with the reason, where SLURM cannot run: see scripts/ci_slurm.sh).
# gloo on CPU, NCCL when GPUs are present.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q tests/unit
for n in 2 4; do
  torchrun --standalone --nproc-per-node "$n" -m pytest -q tests/distributed
done
python -m pytest -q -rs -m slurm tests/slurm
