"""The training driver with a mixture-of-experts recipe (configs/tiny_moe.yaml: TSP D = 2, 4 experts
over EP = 2, top-2, shared expert): the loss falls, the log line and the metrics carry the router
losses and the per-expert load, resume is bit-exact; 5 steps equal the single-process run (Megatron's
native GPTModel with its MoE layer on one process); MoE recipe errors name their key."""

import json
import os

import pytest

from megatron_tsp.training.loop import run
from megatron_tsp.training.recipe import RecipeError, load_recipe
from tests.training.test_loop import REPO, _shared_dir, _single_process_losses, losses

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TINY_MOE = os.path.join(REPO, "configs", "tiny_moe.yaml")


@pytest.mark.slow
def test_tiny_moe_trains_logs_router_losses_and_resumes_exactly(world, shared_tmp_path):
    if world != 2:
        pytest.skip("the recipe's command runs on 2 processes")
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # A backward outside Megatron's schedule (the parity tests, same process) leaves a 0-d scale
    # that megatron-core 0.16.1's schedule cannot copy its [1] scale into: start as a fresh process.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    common = ["train.log_interval=100", "train.save_interval=3"]
    tmp = _shared_dir(shared_tmp_path)
    metrics = os.path.join(tmp, "metrics.jsonl")
    straight = run(load_recipe(TINY_MOE, common + ["train.steps=6", f"train.metrics_file={metrics}"]))
    ls = losses(straight)
    assert ls[-1] < 0.9 * ls[0]
    record = straight["history"][-1]
    assert record["aux_loss"] > 0 and record["z_loss"] > 0
    tokens = 4 * 64 * 2  # global batch x S x top-k
    assert sorted(record["expert_load"]) == ["layer 1", "layer 2"]
    assert all(len(c) == 4 and sum(c) == tokens for c in record["expert_load"].values())
    if int(os.environ.get("RANK", "0")) == 0:
        with open(metrics) as f:
            assert json.loads(f.readlines()[-1])["expert_load"] == record["expert_load"]

    ckpt = os.path.join(tmp, "ckpt")
    first = losses(run(load_recipe(TINY_MOE, common + ["train.steps=3", f"train.save_dir={ckpt}"])))
    resumed = run(load_recipe(TINY_MOE, common + ["train.steps=6", f"train.save_dir={ckpt}", "train.resume=true"]))
    assert first + losses(resumed) == ls  # bit-for-bit


@pytest.mark.slow
def test_tsp_ep_five_steps_match_single_process(world):
    """The driver's loss per step, float32: TSP D = 2 with EP = 2 (world 2) or EP = 4 over TSP x
    data parallel (world 4: each data-parallel rank one micro-batch, experts 1/4 per rank)
    against the same recipe on one process (layout dp: Megatron's GPTModel and MoE layer, the
    same layout-invariant initial weights and data), <= 1e-5 relative as test_loop's
    comparisons (float32 rounding of different reduction orders, grown over 5 Adam steps). The
    shared expert gated (Qwen2-MoE): the driver's gradient reduction sums its replicated gate."""
    if world not in (2, 4):
        pytest.skip("TSP D = 2 with EP = world, at world 2 and 4")
    common = ["train.steps=5", "train.log_interval=100", "model.cpu_init=true", "model.moe_shared_expert_gate=true"]
    ref = _single_process_losses(common + ["parallel.layout=dp", "parallel.size=1", "parallel.expert_size=1"], TINY_MOE)
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # see the test above
    got = losses(run(load_recipe(TINY_MOE, common + ["parallel.size=2", f"parallel.expert_size={world}"])))
    assert len(got) == len(ref) == 5 and got[-1] < got[0]
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref)), (got, ref)


@pytest.mark.slow
def test_moe_under_pipeline_parallelism_matches_single_process(world):
    """MoE layers split over 2 pipeline stages (each stage's router losses and expert load
    reach the log through the pipeline group): TSP D = 1, EP = 1 at world 2; D = 2, EP = 2 at
    world 4. 5 driver steps equal the single-process run, as above."""
    if world not in (2, 4):
        pytest.skip("pipeline 2 x TSP D = world / 2")
    D = world // 2
    common = ["train.steps=5", "train.log_interval=100", "model.cpu_init=true"]
    ref = _single_process_losses(common + ["parallel.layout=dp", "parallel.size=1", "parallel.expert_size=1"], TINY_MOE)
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # see the first test
    result = run(load_recipe(TINY_MOE, common + [f"parallel.size={D}", f"parallel.expert_size={D}",
                                                 "parallel.pipeline_size=2"]))
    got = losses(result)
    assert len(got) == len(ref) == 5 and got[-1] < got[0]
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref)), (got, ref)
    record = result["history"][-1]
    assert record["aux_loss"] > 0 and sorted(record["expert_load"]) == ["layer 1", "layer 2"]  # both stages'


@pytest.mark.parametrize("override,match", [
    ("model.num_experts=3", r"model.num_experts = 3 must be divisible by parallel.expert_size = 2"),
    ("parallel.moe_dispatcher=allgather", r"parallel.moe_dispatcher = 'allgather'.*whole sequence"),
    ("model.moe_shared_expert_intermediate_size=33", r"model.moe_shared_expert_intermediate_size = 33 must be divisible by parallel.size = 2"),
    ("model.moe_router_topk=1", r"moe_router_pre_softmax"),
    ("model.moe_shared_expert_intermediate_size=null model.moe_shared_expert_gate=true",
     r"model.moe_shared_expert_gate gates the shared expert: it needs model.moe_shared_expert_intermediate_size"),
    ("model.num_experts=null", r"parallel.expert_size = 2 needs model.num_experts"),
])
def test_moe_recipe_errors_name_the_key(world, override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(TINY_MOE, override.split())
