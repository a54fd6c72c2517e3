"""A distributed checkpoint saved by a TSP model at D = 2 loads into native TP = 1 and into
D = 4 with identical parameters (TSP checkpoints are native-TP checkpoints)."""

import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import gather_full, init_tsp

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

SHAPE = ModelShape(seq_length=32, num_attention_heads=8, num_query_groups=4)


def _full_params(model):
    group = model.pg_collection.tp
    return {n: gather_full(p.detach(), p, group) for n, p in model.named_parameters()}


def _load(model, path):
    state = dist_checkpointing.load(model.sharded_state_dict(metadata={"dp_cp_group": model.pg_collection.dp_cp}), path)
    model.load_state_dict(state)


def test_tsp2_checkpoint_loads_into_native_tp1_and_tsp4(world, shared_tmp_path):
    if world != 4:
        pytest.skip("needs a world of 4 (D = 2 with DP = 2, then D = 4)")
    path = os.path.join(shared_tmp_path, "tsp2")
    os.makedirs(path, exist_ok=True)
    saved = build_gpt(SHAPE, layout="tsp", seed=11, pg_collection=init_tsp(2))
    dist_checkpointing.save(saved.sharded_state_dict(metadata={"dp_cp_group": saved.pg_collection.dp_cp}), path)
    expected = _full_params(saved)
    dist.barrier()

    for layout, D in (("tp_sp", 1), ("tsp", 4)):
        model = build_gpt(SHAPE, layout=layout, seed=99, pg_collection=init_tsp(D))  # different init, then overwritten
        before = _full_params(model)
        _load(model, path)
        loaded = _full_params(model)
        assert loaded.keys() == expected.keys()
        for name in expected:
            assert torch.equal(loaded[name], expected[name]), f"{layout} D={D}: {name} differs after load"
        assert any(not torch.equal(before[n], expected[n]) for n in expected)  # the load did something
