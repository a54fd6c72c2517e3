"""What a user sees: `megatron-tsp train --nproc-per-node 2` (our own launcher, no torchrun) prints
no warning lines on stderr (the known-benign ones are hidden; rank 0 says so in one stdout line),
and each bad input prints its error exactly once (rank 0), exit code 2, with no traceback and no
torchrun ChildFailedError wall. Plus the pieces: the filters, the rank-0 error print, the
`--nproc-per-node` parsing."""

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from megatron_tsp import output
from megatron_tsp.training.launch import split_nproc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID")
WARNING_LINE = re.compile(r"warn|^W\d{4} |Unable to save|CUDA_DEVICE_MAX_CONNECTIONS", re.IGNORECASE)


def _train(*args, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("TORCHELASTIC", "ROLE_", "PYTHONWARNINGS"))}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop(output.VERBOSE_ENV, None)
    return subprocess.run([sys.executable, "-m", "megatron_tsp.cli", "train", "--nproc-per-node", "2", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_split_nproc():
    assert split_nproc(["--nproc-per-node", "2", "a.yaml", "x=1"]) == (2, ["a.yaml", "x=1"])
    assert split_nproc(["a.yaml", "--nproc-per-node=4"]) == (4, ["a.yaml"])
    assert split_nproc(["a.yaml"]) == (None, ["a.yaml"])
    for bad in (["--nproc-per-node"], ["--nproc-per-node", "0"], ["--nproc-per-node=two"]):
        with pytest.raises(ValueError, match="--nproc-per-node"):
            split_nproc(bad)


def test_benign_warnings_hidden_others_kept(monkeypatch, capsys):
    monkeypatch.delenv(output.VERBOSE_ENV, raising=False)
    monkeypatch.setenv("RANK", "1")  # not rank 0: no info line
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        output.hide_benign_output()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("When using sequence parallelism it is recommended to set the environment variable "
                      "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")
        warnings.warn("`sequence_parallel` is set to `True`, but tensor model parallel size is 1. Disabling "
                      "sequence parallel.")  # Megatron's expert MLPs on an expert-TP group of size 1
        warnings.warn("`sequence_parallel` is set to `True`, but tensor model parallel size is 2.")  # not this one
        warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                      "in a single process.")  # megatron-core loading a checkpoint's common part: every resume
        warnings.warn("The argument order of load has been changed. Please check the document to avoid future "
                      "breakages.")
        warnings.warn("something the user must see")
    kept = ["`sequence_parallel` is set to `True`, but tensor model parallel size is 2.", "something the user must see"]
    assert [str(w.message) for w in seen] == kept
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("megatron.core.datasets.gpt_dataset")
    log.addHandler(handler)
    try:
        log.warning("Unable to save MockGPTDataset indexes because path_to_cache is None")
        log.warning("Build and save the MockGPTDataset train indices")
        saver = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
        saver.addHandler(handler)
        saver.warning("MCore's async save is deprecated and will be removed in the future releases.")
    finally:
        for one in (log, saver):
            one.removeHandler(handler)
            for f in list(one.filters):
                one.removeFilter(f)
    assert [r.getMessage() for r in records] == ["Build and save the MockGPTDataset train indices"]
    assert capsys.readouterr().out == ""


def test_user_error_printed_by_rank0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert output.print_user_error("megatron-tsp train", ValueError("bad key")) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert output.print_user_error("megatron-tsp train", ValueError("bad key")) == 2
    assert capsys.readouterr().err == "megatron-tsp train: error: bad key\n"


def _assert_one_error(res, needle):
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr


@pytest.mark.parametrize("args,needle", [
    (["train.nosuch=1"], "unknown key train.nosuch"),        # the recipe reader, before torch.distributed
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),  # argparse
])
def test_bad_input_printed_once(args, needle):
    _assert_one_error(_train("parallel.size=2", *args), needle)


@pytest.mark.slow
def test_bad_input_after_init_printed_once():
    """A check that needs the world size (after torch.distributed starts): still once, exit 2."""
    _assert_one_error(_train("parallel.size=4", "train.steps=1"), "parallel.size")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["parallel.size=2"], ["configs/tiny_moe.yaml", "model.num_layers=1"]],
                         ids=["tiny", "tiny_moe"])
def test_tiny_run_stderr_has_no_warning_lines(recipe):
    res = _train(*recipe, "train.steps=1", "train.progress_bar=false")
    assert res.returncode == 0, res.stderr
    bad = [ln for ln in res.stderr.splitlines() if WARNING_LINE.search(ln)]
    assert not bad, "\n".join(bad)
    assert res.stdout.count(output.INFO_LINE) == 1, res.stdout
    assert "summary: 1 steps" in res.stdout
