"""train.collective_timeout_s: it reaches the default process group (init_distributed) and every
Megatron group the driver makes, a bad value is refused, and a failed collective is reported with
this rank, its host and node. The whole-job behaviour (a lost node ends the job): tests/slurm."""

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megatron_tsp.training.recipe import RecipeError, load_recipe
from megatron_tsp.training.loop import collective_failure, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


@pytest.mark.slow  # a whole (one-step) driver run
def test_megatron_groups_get_the_timeout():
    """The driver's run makes Megatron's groups with the recipe's timeout (Megatron's own
    default is 30 minutes)."""
    from megatron.core import parallel_state as mpu

    if torch.cuda.is_available():
        pytest.skip("reads the gloo backend's options")
    run(load_recipe(TINY, ["parallel.size=1", "train.steps=1", "train.collective_timeout_s=42", "train.log_interval=100"]))
    for get in (mpu.get_data_parallel_group, mpu.get_tensor_model_parallel_group,
                mpu.get_pipeline_model_parallel_group, mpu.get_model_parallel_group):
        assert _timeout(get()) == timedelta(seconds=42), get.__name__


def test_default_group_gets_the_timeout(tmp_path):
    """init_distributed(timeout_s) from torchrun's environment: the default group (the one the
    per-step stop check all-reduces over) fails after that long. A fresh process: this one's
    default group exists already."""
    code = ("import datetime, torch; import torch.distributed as dist\n"
            "from megatron_tsp.training.build import init_distributed\n"
            "init_distributed(7.5)\n"
            "print(dist.group.WORLD._get_backend(torch.device('cpu')).options._timeout)\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29000 + os.getpid() % 1000), CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0:00:07.500000"


@pytest.mark.parametrize("value", ["0", "-5"])
def test_timeout_must_be_positive(value):
    with pytest.raises(RecipeError, match=f"train.collective_timeout_s = {float(value)} must be > 0"):
        load_recipe(TINY, [f"train.collective_timeout_s={value}"]).check()


def test_failure_message_names_rank_host_and_node(monkeypatch):
    monkeypatch.setenv("GROUP_RANK", "1")
    error = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.233.7.12]:4312\nmore")
    line = collective_failure(error, 90)
    assert line.startswith(f"megatron-tsp train: rank {dist.get_rank()} of {dist.get_world_size()} on host ")
    assert "(node rank 1) failed: [gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.233.7.12]:4312 -- " in line
    assert "train.collective_timeout_s = 90 s" in line and "more" not in line


def test_a_local_error_does_not_blame_a_peer():
    """A bug or a device error on this rank (the first GPU MoE run met one) is not a lost peer."""
    error = RuntimeError("Expected all tensors to be on the same device, but got tensors is on cpu")
    line = collective_failure(error, 90)
    assert line.endswith("failed: Expected all tensors to be on the same device, but got tensors is on cpu")
    assert "peer" not in line and "collective_timeout_s" not in line
