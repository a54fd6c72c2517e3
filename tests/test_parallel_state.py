"""The TSP axis sits in Megatron's TP slot: TSP groups are consecutive ranks, data-parallel
groups exclude the TSP partners; initialize_model_parallel returns the groups, keeps none of its
own and writes no getter into Megatron's parallel_state."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

import megatron_tsp
from megatron_tsp import parallel_state as tsp_state
from tests.utils import init_tsp, skip_unless_divides


pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)


def test_tsp_group_in_the_tp_slot(world):
    D = 2
    skip_unless_divides(world, D, with_data_parallel=True)
    before, ours = set(vars(mpu)), dict(vars(tsp_state))
    pgs = init_tsp(D)
    assert pgs.tp is mpu.get_tensor_model_parallel_group()
    assert set(vars(mpu)) == before, f"names added to Megatron's parallel_state: {set(vars(mpu)) - before}"
    assert dict(vars(tsp_state)) == ours, "parallel_state keeps module-level state"
    rank = dist.get_rank()
    tsp_ranks = dist.get_process_group_ranks(pgs.tp)
    assert tsp_ranks == [rank - rank % D + i for i in range(D)]
    assert pgs.tp.size() == D and pgs.tp.rank() == rank % D
    dp_ranks = dist.get_process_group_ranks(mpu.get_data_parallel_group())
    assert len(dp_ranks) == world // D and not set(dp_ranks) & (set(tsp_ranks) - {rank})
    assert init_tsp(D) is not pgs  # a new collection per initialization, nothing cached


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_rebuilding_groups_and_a_rope_model_frees_the_old_groups(world):
    """Each gloo group owns threads until it is freed. Megatron's RotaryEmbedding.forward is an
    lru_cache keyed by the module, which holds its CP group: without destroy_model_parallel
    clearing it, every model built with RoPE left a destroyed group alive (3 threads each, hundreds
    over a test process or a bench sweep)."""
    from megatron_tsp.training.build import ModelShape, build_gpt

    def cycle():
        shape = ModelShape(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                           seq_length=16)
        model = build_gpt(shape, layout="tsp", dtype=torch.float64, pg_collection=init_tsp(1))
        tokens = torch.zeros(1, 16, dtype=torch.long)
        model(tokens, torch.arange(16).unsqueeze(0), None)  # RoPE's forward: fills its cache
        del model
        gc.collect()

    cycle()
    before = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        cycle()
    megatron_tsp.destroy_model_parallel()
    gc.collect()
    init_tsp(1)
    assert len(os.listdir("/proc/self/task")) <= before, "threads of destroyed process groups are still alive"
