#!/usr/bin/env bash
# The test suite with the `python` on PATH: world-1 unit tests, then one torchrun per world size
# (the ~7 s megatron import is paid once per rank), then the SLURM job scripts under a one-node
# SLURM started here (tests/slurm; skipped, with the reason, where SLURM cannot run: see
# scripts/ci_slurm.sh). gloo on CPU, NCCL when GPUs are present.
# Which tests run where is a marker, not a folder (tests/ mirrors megatron_tsp/): `distributed`
# tests run under torchrun at each world size, the others once at world 1; tests/gpu only on the
# GPU machine (scripts/gpu_*.sh). A part that collects nothing fails (pytest's exit code 5).
# Arguments pick parts: `bash scripts/test.sh unit 2` runs the unit tests and world 2 only;
# no arguments: unit 2 4 slurm.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# TSP_TEST_MARKS: a pytest marker expression for the unit and world parts (default: "not slurm";
# .ci/run's second venv adds "not slow").
mark=${TSP_TEST_MARKS:-not slurm}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(unit 2 4 slurm)
python -c "import importlib.metadata as m, sys; print('megatron-core', m.version('megatron-core'), 'on Python', sys.version.split()[0])"
for part in "${parts[@]}"; do
  case "$part" in
    unit) python -m pytest -q --durations=15 -m "($mark) and not distributed" tests --ignore=tests/gpu ;;
    [0-9]*) python -m torch.distributed.run --standalone --nproc-per-node "$part" -m pytest -q --durations=10 -m "($mark) and distributed" tests --ignore=tests/gpu ;;
    slurm) python -m pytest -q -rs --durations=10 -m slurm tests/slurm ;;
    *) echo "scripts/test.sh: unknown part '$part' (unit, a world size, slurm)" >&2; exit 2 ;;
  esac
done
