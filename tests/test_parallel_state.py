"""The TSP axis sits in Megatron's TP slot: TSP groups are consecutive ranks, data-parallel
groups exclude the TSP partners, and the getters registered on Megatron's parallel_state agree."""

import pytest
import torch.distributed as dist
from megatron.core import parallel_state as mpu

import megatron_tsp
from tests.utils import init_tsp, skip_unless_divides


pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)


def test_tsp_group_in_the_tp_slot(world):
    D = 2
    skip_unless_divides(world, D, with_data_parallel=True)
    init_tsp(D)
    rank = dist.get_rank()
    tsp_ranks = dist.get_process_group_ranks(megatron_tsp.get_tsp_group())
    assert tsp_ranks == [rank - rank % D + i for i in range(D)]
    assert megatron_tsp.get_tsp_world_size() == D and megatron_tsp.get_tsp_rank() == rank % D
    assert mpu.get_tensor_and_sequence_parallel_group() is megatron_tsp.get_tsp_group()
    assert megatron_tsp.get_tsp_group() is mpu.get_tensor_model_parallel_group()
    dp_ranks = dist.get_process_group_ranks(mpu.get_data_parallel_group())
    assert len(dp_ranks) == world // D and not set(dp_ranks) & (set(tsp_ranks) - {rank})
