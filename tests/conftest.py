"""One process group per pytest process: torchrun's env (gloo on CPU, NCCL on GPU) when
RANK is set, else a world of one. CPU shims only when there is no GPU."""

import datetime
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
warnings.filterwarnings("ignore", category=FutureWarning)


# A test whose ranks part ways (one in a collective the others never reach) fails in 10 minutes, not
# after the backend's default 30: CI's whole run is budgeted at 40.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def _init_world():
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    else:
        if backend == "nccl":
            torch.cuda.set_device(0)
        store = tempfile.mktemp(prefix="tsp_store_")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                                timeout=COLLECTIVE_TIMEOUT)


def pytest_configure(config):
    torch.set_num_threads(1)
    _init_world()
    from megatron_tsp.training.cpu import install_cpu_shims  # tests run megatron-core on CPU: the shims, explicitly

    install_cpu_shims()


@pytest.fixture
def world():
    return dist.get_world_size()


@pytest.fixture(scope="session")
def shared_tmp_path():
    """One directory shared by every rank (for distributed checkpoints)."""
    path = [tempfile.mkdtemp(prefix="tsp_ckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]
