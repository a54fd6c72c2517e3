"""What the `megatron-tsp` commands print: known-benign warnings hidden (one info line on rank 0
says so; `--verbose` shows them all), user errors printed once, by rank 0, exit code 2.

The benign ones, by where they come from:
- megatron-core's import on a machine without Transformer Engine / apex / absl ("Falling back to
  Torch optimizers / local implementations / Torch Norm"), and its experimental-API notes;
- the mock dataset's "Unable to save MockGPTDataset indexes because path_to_cache is None";
- "set CUDA_DEVICE_MAX_CONNECTIONS to 1" (sequence parallelism; the driver's TSP exchanges do not
  depend on it);
- torch's "No CUDA runtime is found, using CUDA_HOME" (a CPU machine);
- "`sequence_parallel` is set to `True`, but tensor model parallel size is 1" from the expert
  MLPs of MoE layers on an expert tensor-parallel group of size 1 (see `patches.BENIGN_WARNINGS`);
- torch's distributed checkpoint notes while megatron-core saves and loads ("MCore's async save is
  deprecated", "torch.distributed is disabled ... load in a single process", "The argument order
  of load has been changed").
The filters are the records `patches.BENIGN_WARNINGS` and `patches.BENIGN_LOG_RECORDS`.
Standard library only: the launcher and `--help` import nothing heavy.
"""

from __future__ import annotations

import json
import os
import sys
import time

from . import patches

VERBOSE_ENV = "MEGATRON_TSP_VERBOSE"  # set by `--verbose` for the workers a launcher starts
REPORT_DIR_ENV = "MEGATRON_TSP_REPORT_DIR"  # set by training.launch (not with --verbose): where a failure goes

INFO_LINE = ("megatron-tsp: known-benign notices from megatron-core and torch (Transformer Engine / apex / absl "
             "absent, dataset index cache, CUDA_DEVICE_MAX_CONNECTIONS, sequence parallel off in experts of "
             "expert-TP size 1, checkpoint API notes) are hidden; --verbose shows them")


def rank() -> int:
    """This process's global rank from the launcher's environment (torchrun, SLURM, ours), before
    torch.distributed exists; 0 without one."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def verbose_requested(argv) -> bool:
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV) == "1"


def hide_benign_output(verbose: bool = False, announce: bool = True) -> None:
    """Hide the known-benign warnings (not with `verbose`); rank 0 prints INFO_LINE on stdout once
    when `announce`. Call before megatron-core is imported (its warnings come at import)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    patches.install(patches.BENIGN_WARNINGS)
    patches.install(patches.BENIGN_LOG_RECORDS)
    if announce and rank() == 0:
        print(INFO_LINE, flush=True)


def print_user_error(prog: str, error: BaseException) -> int:
    """A user error (TSPConfigError / RecipeError, raised on every rank before any collective):
    rank 0 prints it, the others stay silent. Returns the exit code, 2."""
    if rank() == 0:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return 2


def write_failure_report(line: str, traceback_text: str, peer_lost: bool) -> bool:
    """In a worker that training.launch started (without --verbose): write this rank's failure
    (its one line, its traceback, whether it only saw a peer die) for the launcher to print or
    hold back. False when there is no report directory (torchrun, srun, --verbose): print it yourself."""
    folder = os.environ.get(REPORT_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    path = os.path.join(folder, f"rank_{rank()}.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump({"line": line, "traceback": traceback_text, "peer_lost": peer_lost, "time": time.time()}, f)
        os.replace(path + ".tmp", path)
    except OSError:  # a full disk, say: the worker prints its error itself
        return False
    return True
