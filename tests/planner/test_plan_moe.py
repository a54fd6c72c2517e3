"""The planner's mixture-of-experts model (issue 16): what one MoE layer saves for backward
against the tensors the real layer saves (CPU, float32, world 1), parameters and optimizer state
over EP and expert-DP, the all-to-all volumes (intra- and inter-node), active-expert FLOPs, and
the MoE options the planner cannot model refused with the key named."""

import os

import pytest

from megatron_tsp.planner import (Cluster, Layout, ModelSpec, PlanError, TrainSpec, comm_items, flops,
                                  memory, param_counts, plan_all)
from megatron_tsp.planner.cli import main as plan_main
from megatron_tsp.planner.formulas import moe_saved_per_token, tsp_saved_per_token
from megatron_tsp.planner.model import check_layout

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
OLMOE = os.path.join(ROOT, "configs", "olmoe_1b_7b_4k.yaml")
H, E, K, FE = 2048, 64, 8, 1024
MOE = ModelSpec(num_layers=16, hidden_size=H, num_attention_heads=16, ffn_hidden_size=8192, vocab_size=50304, num_experts=E, moe_ffn_hidden_size=FE, moe_router_topk=K)
NODE4 = Cluster(gpus_per_node=4)


# -- what the code keeps: one MoE layer's saved tensors (CPU, float32, world 1) ------------------

S, HID, HEADS, EXPERTS, TOPK, FE_TINY = 64, 32, 4, 4, 2, 16
MEASURE_CASES = {  # name: the MoE options, the same keywords for Megatron's config and the planner's ModelSpec
    "top2": {},
    "shared-zloss": dict(moe_shared_expert_intermediate_size=32, moe_z_loss_coeff=1e-3),
    "gated-shared": dict(moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True),
    "top1-presoftmax-noaux": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_aux_loss_coeff=0.0,
                                  moe_router_load_balancing_type="none"),
}


def _saved_bytes_of_one_moe_layer(moe_kwargs, recompute):
    """Bytes of the distinct storages one TSP layer with an MoE MLP saves for backward (weights
    excluded: saved by reference), D = 1, EP = 1, one sequence of S tokens."""
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_layer import TransformerLayer

    import megatron_tsp
    from megatron.core import parallel_state as mpu
    from megatron_tsp.config import TSPOptions
    from megatron_tsp.tsp.specs import get_tsp_layer_spec
    from tests.utils import saved_by_layer, tiny_config

    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    megatron_tsp.initialize_model_parallel(tsp_size=1, expert_model_parallel_size=1)
    torch.manual_seed(0)
    kw = dict(num_moe_experts=EXPERTS, moe_ffn_hidden_size=FE_TINY, moe_router_topk=TOPK,
              moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=1e-2, expert_model_parallel_size=1,
              expert_tensor_parallel_size=1)
    config = tiny_config(1, heads=HEADS, hidden=HID, ffn=64, dtype=torch.float32, **{**kw, **moe_kwargs})
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    spec = get_tsp_layer_spec(config, pgs.tp, TSPOptions(tsp_recompute=recompute, tsp_mlp_exchange="ring"), moe=True)
    layer = TransformerLayer(config, spec.submodules, pg_collection=pgs)
    x = torch.randn(S, 1, HID).requires_grad_()
    rope = RotaryEmbedding(kv_channels=HID // HEADS, rotary_percent=1.0)(S)
    _, _, activation_bytes = saved_by_layer(layer, x, rope)
    megatron_tsp.destroy_model_parallel()
    return activation_bytes


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("case", list(MEASURE_CASES))
def test_moe_layer_saved_bytes_match_the_planner(case, recompute):
    """The planner's bytes for one MoE layer (norms, block inputs, RoPE slice, the TSP save-mode
    items, the shared expert as the ring MLP, router, dispatcher and expert activations) equal
    what the layer saves, to the router's per-layer token counts (E int64) on megatron-core
    0.19; within 2% on older versions (their dispatcher keeps a bool routing map and fp32
    probabilities per expert instead of an int64 index per copy)."""
    from megatron.core import package_info

    moe_kwargs = MEASURE_CASES[case]
    measured = _saved_bytes_of_one_moe_layer(moe_kwargs, recompute)
    model = ModelSpec(num_layers=1, hidden_size=HID, num_attention_heads=HEADS, ffn_hidden_size=64, dtype="float32", num_experts=EXPERTS,
                      moe_ffn_hidden_size=FE_TINY, **{"moe_router_topk": TOPK, **moe_kwargs})
    planned = S * sum(tsp_saved_per_token(model, save_activations=recompute == "none", norm="lean",
                                          exchange="ring", moe=True).values())
    major, minor = (int(v) for v in package_info.__version__.split(".")[:2])
    if (major, minor) >= (0, 19):
        assert abs(measured - planned) <= 8 * EXPERTS, (measured, planned)
    else:
        assert measured == pytest.approx(planned, rel=0.02)


def test_the_measurement_sees_the_experts():
    """The comparison above can fail: the routed experts' intermediates are most of the layer
    (without them the planner would be far below what is saved)."""
    model = ModelSpec(num_layers=1, hidden_size=HID, num_attention_heads=HEADS, ffn_hidden_size=64, dtype="float32", num_experts=EXPERTS,
                      moe_ffn_hidden_size=FE_TINY, moe_router_topk=TOPK)
    items = tsp_saved_per_token(model, save_activations=False, moe=True)
    measured = _saved_bytes_of_one_moe_layer({}, "full")
    without = S * (sum(items.values()) - items["MoE expert intermediates (k copies)"])
    assert measured - without > 0.3 * measured


# -- model state, communication, FLOPs by hand ---------------------------------------------------

def test_expert_parameters_and_their_optimizer_state_by_hand():
    """TSP D = 4, EP = 4 (16 experts per GPU): the experts' 16 x 16 x 3 h fe elements are whole
    on their GPU; the distributed optimizer shards the dense part over DP and the experts over
    expert-DP = GPUs / EP. On 8 GPUs with EP = 4: expert-DP 2, dense DP 2."""
    lay = Layout("tsp", tsp_size=4)
    experts = 16 * 16 * 3 * H * FE
    P = param_counts(MOE, lay, expert_size=4)
    assert P["experts"] == experts
    dense = 16 * ((4 * H * H) / 4 + H * E + 2 * H) + 2 * 50304 * H / 4 + H
    assert P["total"] == pytest.approx(dense + experts)
    for nodes in (1, 2):
        cluster = Cluster(gpus_per_node=4, nodes=nodes)
        mem = memory(MOE, TrainSpec(seq_length=4096, distributed_optimizer=True, expert_size=4), lay, cluster)
        assert mem.optimizer == pytest.approx(12 * (dense / nodes + experts / nodes))
        assert mem.params == pytest.approx(2 * (dense + experts))


def test_the_shared_expert_gate_by_hand():
    """A gated shared expert (Qwen2-MoE) adds its [1, h] gate per MoE layer, replicated like the
    router (not split by D), to the parameters and the active weights; and keeps its output and
    score (h + 1 per token) for backward. Megatron-LM's theoretical memory counts the gate as h too."""
    shared = ModelSpec(**{**MOE.__dict__, "moe_shared_expert_intermediate_size": 1024})
    gated = ModelSpec(**{**shared.__dict__, "moe_shared_expert_gate": True})
    lay = Layout("tsp", tsp_size=4)
    assert param_counts(gated, lay)["total"] - param_counts(shared, lay)["total"] == 16 * H
    assert gated.total_params - shared.total_params == 16 * H
    assert gated.moe_active_params - shared.moe_active_params == H
    extra = sum(moe_saved_per_token(gated).values()) - sum(moe_saved_per_token(shared).values())
    assert extra == 2 * (H + 1)
    no_shared = ModelSpec(**{**MOE.__dict__, "moe_shared_expert_gate": True})
    assert no_shared.total_params == MOE.total_params  # no shared expert: no gate


def test_moe_activations_by_hand():
    """Per token of the MoE region, bf16, top-8, 64 experts: router 4k + 8k (+ aux loss 4E + 8k),
    int64 permutation indices per copy and per (token, expert), the k permuted tokens (2 k h), their probabilities (2 k) and 6 fe
    per copy of gated intermediates; TP+SP T = 4 keeps them for its S/4 tokens, as TSP D = 4."""
    per_token = sum(moe_saved_per_token(MOE).values())
    assert per_token == 4 * K + 8 * K + 4 * E + 8 * K + 8 * K + 8 * E + 2 * K * H + 2 * K + 2 * K * 6 * FE
    train = TrainSpec(seq_length=4096, expert_size=4)
    for lay in (Layout("tsp", tsp_size=4), Layout("tp_sp", tp=4)):
        detail = memory(MOE, train, lay, NODE4).detail
        assert detail["MoE expert intermediates (k copies)"] == pytest.approx(16 * 1024 * 2 * K * 6 * FE)
    assert "MLP intermediates" not in memory(MOE, train, Layout("tp_sp", tp=4), NODE4).detail


def _a2a(items):
    return {i.name: i for i in items if i.collective == "all_to_all"}


def test_all_to_all_volumes_intra_and_inter_node():
    """s = B S / D tokens x k copies x h x 2 B go out and come back per MoE layer, each way twice
    (dispatch, combine; their gradients): (EP-1)/EP of them leave the GPU. EP = 8 on two nodes of
    4: 3/8 to the node's GPUs, 4/8 over the inter-node link."""
    S_ = 4096
    tokens = S_ / 4 * K * H * 2
    items = _a2a(comm_items(MOE, TrainSpec(seq_length=S_, expert_size=4), Layout("tsp", tsp_size=4), NODE4))
    assert items["MoE all-to-all dispatch (intra-node peers)"].volume == pytest.approx(3 / 4 * tokens)
    assert {i.phase for i in items.values()} == {"fwd", "bwd"}
    assert not any("inter" in n for n in items)
    two = Cluster(gpus_per_node=4, nodes=2)
    items = _a2a(comm_items(MOE, TrainSpec(seq_length=S_, expert_size=8), Layout("tsp", tsp_size=4), two))
    assert items["MoE all-to-all combine (intra-node peers)"].volume == pytest.approx(3 / 8 * tokens)
    assert items["MoE all-to-all combine (inter-node peers)"].volume == pytest.approx(4 / 8 * tokens)
    assert items["MoE all-to-all combine (inter-node peers)"].link == "inter"
    # EP = 1: no all-to-all; CP + EP moves the same tokens as TSP + EP at the same size
    assert not _a2a(comm_items(MOE, TrainSpec(seq_length=S_), Layout("tsp", tsp_size=4), NODE4))
    cp = _a2a(comm_items(MOE, TrainSpec(seq_length=S_, expert_size=4), Layout("cp", cp=4), NODE4))
    assert cp["MoE all-to-all dispatch (intra-node peers)"].volume == pytest.approx(3 / 4 * tokens)


def test_interleaved_dense_layers_and_the_expert_dp_sync():
    """moe_layer_freq = 2: half the layers are dense. Their MLP ring runs on half the layers and
    the all-to-all on the other half (per-layer items are averages); the experts' gradients go
    over expert-DP (stride EP), the dense ones over DP."""
    half = ModelSpec(num_layers=16, hidden_size=H, num_attention_heads=16, ffn_hidden_size=8192, vocab_size=50304, num_experts=E, moe_ffn_hidden_size=FE, moe_router_topk=K,
                     moe_layer_freq=2)
    assert half.moe_layers == 8
    train = TrainSpec(seq_length=65536, expert_size=2, tsp_mlp_exchange="ring")
    items = comm_items(half, train, Layout("tsp", tsp_size=2), NODE4)
    ring = next(i for i in items if i.name == "MLP grad ring (D hops)")
    assert ring.volume == pytest.approx(0.5 * 3 * H * 8192 * 2)
    step = {i.name: i for i in items if not i.per_layer}
    assert step["expert-DP grad all-reduce"].group == 2
    assert step["DP grad all-reduce"].group == 2


def test_flops_count_the_active_experts():
    """Model FLOPs per token: 6 x (attention + router + k experts) per layer, not all E experts."""
    train, lay = TrainSpec(seq_length=4096, expert_size=4), Layout("tsp", tsp_size=4)
    active = 4 * H * H + H * E + K * 3 * H * FE
    assert MOE.active_matmul_params == 16 * active
    f = flops(MOE, train, lay)
    lm_head_and_attention = flops(ModelSpec(num_layers=16, hidden_size=H, num_attention_heads=16, ffn_hidden_size=1, vocab_size=50304, swiglu=False),
                                  train, lay)["model_flops"] - 6 * 4096 * 16 * (4 * H * H + 2 * H) / 4
    assert f["model_flops"] == pytest.approx(6 * 4096 * 16 * active / 4 + lm_head_and_attention)


# -- errors and the CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("model.moe_expert_capacity_factor=1.0", "model.moe_expert_capacity_factor = 1.0: token dropping is not"),
    ("parallel.moe_dispatcher=allgather", "parallel.moe_dispatcher = 'allgather'"),
    ("model.moe_router_load_balancing_type=sinkhorn", "model.moe_router_load_balancing_type = 'sinkhorn'"),
    ("model.moe_router_score_function=tanh", "model.moe_router_score_function = 'tanh'"),
    ("model.moe_layer_freq=[1,0]", "model.moe_layer_freq"),
    ("parallel.expert_size=3", "parallel.expert_size = 3"),
])
def test_moe_options_the_planner_cannot_model_are_errors(capsys, override, message):
    assert plan_main([OLMOE, override, "--gpus-per-node", "4", "--layout", "tsp4"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("lay,ep,message", [
    (Layout("tsp", tsp_size=4), 2, "parallel.expert_size = 2 must be D or D x k under TSP"),
    (Layout("tp", tp=4), 4, "needs sequence parallelism"),
    (Layout("fsdp_cp", cp=4), 4, "not modelled with FSDP-over-CP"),
])
def test_layouts_that_cannot_run_the_experts(lay, ep, message):
    with pytest.raises(PlanError, match=message):
        check_layout(MOE, TrainSpec(seq_length=4096, expert_size=ep), lay, NODE4)
    with pytest.raises(PlanError, match="parallel.expert_size = 4 needs model.num_experts"):
        check_layout(ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4), TrainSpec(seq_length=64, expert_size=4),
                     Layout("tsp", tsp_size=4), NODE4)


def test_plan_prints_the_olmoe_recipe(capsys):
    assert plan_main([OLMOE, "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "TSP D=4" in out and "TP+SP 4" in out and "CP 4" in out
    plans, _ = plan_all(*_olmoe_inputs())
    tsp4 = next(p for p in plans if p.layout.label == "TSP D=4")
    assert any(n.startswith("MoE: 16 of 16 layers, 64 experts top-8, EP 4") for n in tsp4.notes)
    assert tsp4.fits


def _olmoe_inputs():
    from megatron_tsp.planner.cli import build_inputs, parser

    model, train, cluster, hw, _ = build_inputs(parser().parse_args([OLMOE, "--gpus-per-node", "4"]))
    return model, train, cluster, hw
