"""MoE checkpoints through the driver (configs/tiny_moe.yaml: TSP D = 2, 4 experts over EP = 2,
top-2, a shared expert, gated in the first test; world 2):
- a TSP+EP checkpoint written by the driver's save loads into Megatron's native TP+SP+EP model
  (GPTModel with the local MoE spec, groups from Megatron's own initialize_model_parallel with
  TP = 2, sequence parallelism, EP = 2, expert TP = 1) with parameters identical to the TSP
  model's when it saved (experts compared by global index);
- save / resume is bit-exact, with the plain and with the distributed optimizer."""

import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import dist_checkpointing

import megatron_tsp
from megatron_tsp.training import loop
from megatron_tsp.training.build import build_gpt
from megatron_tsp.training.recipe import load_recipe
from megatron_tsp.tsp.moe import expert_param_global_name
from tests.training.test_loop import REPO, _shared_dir, losses
from tests.utils import gather_full

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY_MOE = os.path.join(REPO, "configs", "tiny_moe.yaml")
COMMON = ["train.log_interval=100", "model.cpu_init=true"]


@pytest.fixture(autouse=True)
def fresh_aux_loss_scale():
    """A backward outside Megatron's schedule (another test in this process) leaves a 0-d aux-loss
    scale that megatron-core 0.16.1's schedule cannot copy its [1] scale into."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def full_params(model, tp_group, ep_group):
    """{global name: full tensor}: TP / TSP shards gathered, experts gathered by global index."""
    out = {}
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True) is False:  # an expert, whole on its EP rank
            got = [None] * ep_group.size()
            dist.all_gather_object(got, (expert_param_global_name(model, name), p.detach().cpu()), group=ep_group)
            out.update(dict(got))
        else:
            out[name] = gather_full(p.detach(), p, tp_group).cpu()
    return out


def test_tsp_ep_checkpoint_loads_into_native_tp_sp_ep(world, shared_tmp_path, monkeypatch):
    if world != 2:
        pytest.skip("TSP D = 2, EP = 2 on 2 processes")
    ckpt = os.path.join(_shared_dir(shared_tmp_path), "ckpt")
    at_save = {}
    save = loop.save_checkpoint

    def save_and_remember(model, optimizer, recipe, step, **kwargs):
        at_save[step] = full_params(model, mpu.get_tensor_model_parallel_group(), mpu.get_expert_model_parallel_group())
        return save(model, optimizer, recipe, step, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save_and_remember)
    # the shared expert gated (Qwen2-MoE): its replicated gate weight saved once and loaded by SharedExpertMLP
    recipe = load_recipe(TINY_MOE, COMMON + ["train.steps=2", f"train.save_dir={ckpt}",
                                             "model.moe_shared_expert_gate=true"])
    loop.run(recipe)
    expected = at_save[2]
    assert any("local_experts" in n for n in expected) and any("shared_experts" in n for n in expected)
    assert any(n.endswith("shared_experts.gate_weight") for n in expected)

    # Megatron's own groups and model: TP 2 + SP, EP 2, expert TP 1.
    megatron_tsp.destroy_model_parallel()
    pgs = megatron_tsp.initialize_native_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                                        expert_tensor_parallel_size=1)
    m = recipe.model
    native = build_gpt(m.shape(), layout="tp_sp", seed=recipe.train.seed + 1, sequence_parallel=True,
                       pg_collection=pgs, moe_token_dispatcher_type="alltoall")
    assert native.config.sequence_parallel and native.config.expert_model_parallel_size == 2
    assert native.config.expert_tensor_parallel_size == 1 and type(native).__name__ == "GPTModel"
    before = full_params(native, pgs.tp, pgs.ep)
    state = dist_checkpointing.load({"model": native.sharded_state_dict(metadata={"dp_cp_group": pgs.dp_cp})},
                                    os.path.join(ckpt, "step_0000002"))
    native.load_state_dict(state["model"])
    loaded = full_params(native, pgs.tp, pgs.ep)
    assert loaded.keys() == expected.keys()
    differ = [n for n in expected if not torch.equal(loaded[n], expected[n])]
    assert not differ, f"native TP+SP+EP parameters differ from the TSP+EP model's after loading: {differ}"
    assert all(not torch.equal(before[n], expected[n]) for n in expected if expected[n].dim() > 1)  # the load did it
    megatron_tsp.destroy_model_parallel()


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["plain", "distributed"])
def test_moe_resume_is_bit_exact(world, shared_tmp_path, distributed_optimizer):
    if world != 2:
        pytest.skip("TSP D = 2, EP = 2 on 2 processes")
    common = COMMON + [f"train.distributed_optimizer={str(distributed_optimizer).lower()}"]
    ckpt = os.path.join(_shared_dir(shared_tmp_path), "ckpt")
    straight = losses(loop.run(load_recipe(TINY_MOE, common + ["train.steps=4"])))
    first = losses(loop.run(load_recipe(TINY_MOE, common + ["train.steps=2", f"train.save_dir={ckpt}"])))
    resumed = loop.run(load_recipe(TINY_MOE, common + ["train.steps=4", f"train.save_dir={ckpt}", "train.resume=true"]))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert first + losses(resumed) == straight, (first, losses(resumed), straight)  # bit for bit
