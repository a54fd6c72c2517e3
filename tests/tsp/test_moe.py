"""MoE on the TSP axis: TSPGPTModel with Megatron's MoELayer (alltoall, experts 1/EP per rank)
against the same model with the same weights on one process (D = 1, EP = 1: Megatron's router,
its own capacity dropping over all tokens, SequentialMLP experts, no all-to-all), float64:
per-token loss, router losses and every gradient (router, experts, shared expert, attention).
(The dense TSP model against Megatron's native GPTModel is tests/tsp/test_gpt.py; the MoE model
against Megatron's native TP+SP+EP one, tests/tsp/test_moe_native.py.)

EP = D (the EP group is the TSP group) at D = 2 and 4; EP = 2 x D over TSP x DP at world 4 with
D = 2 (each data-parallel rank its own batch; the reference runs both). Each option once: top-k
1 and 2, shared expert (plain, and gated: Qwen2-MoE's sigmoid gate), token dropping (both
policies), z-loss, per-sequence aux loss, dense layers interleaved (`moe_layer_freq`). Plus a
broken variant the test must catch, the saved-tensor check, and bad input refused before any
collective."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

import megatron_tsp
from megatron_tsp.config import TSPConfigError
from megatron_tsp.tsp.moe import TSPTopKRouter, expert_load, expert_param_global_name, pop_router_losses
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.parity import fresh_seed
from tests.utils import gather_full, mock_batch, rel_err, sum_sequence_parallel_grads

pytestmark = pytest.mark.distributed

TOL = 1e-10
TRACKER_TOL = 1e-6  # Megatron's router-loss tracker accumulates in float32 whatever the model dtype
SHAPE = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                   seq_length=32)
BASE = dict(num_moe_experts=4, moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
CASES = {
    "top1": dict(moe_router_topk=1, moe_router_pre_softmax=True),
    "top2-shared-zloss": dict(moe_router_topk=2, moe_shared_expert_intermediate_size=64, moe_z_loss_coeff=1e-3),
    "top2-drop-interleaved": dict(moe_router_topk=2, moe_expert_capacity_factor=1.0, moe_layer_freq=[0, 1],
                                  moe_router_load_balancing_type="seq_aux_loss"),
    "top1-drop-position-gated-shared": dict(moe_router_topk=1, moe_router_pre_softmax=True,
                                            moe_expert_capacity_factor=0.75, moe_token_drop_policy="position",
                                            moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True),
}


@pytest.fixture(autouse=True)
def router_softmax_in_float64(monkeypatch):
    """Megatron's router takes its softmax in float32 whatever the model dtype: two float64 models
    whose router inputs differ in the 16th digit (a different reduction order) would then differ
    by float32 rounding (~1e-8). Both models here run it in float64, so the comparison sees the
    parallel layout, not that rounding."""
    softmax = torch.softmax

    def softmax_keeping_float64(x, dim, dtype=None, **kw):
        if dtype is torch.float32 and x.dtype is torch.float64:
            dtype = torch.float64
        return softmax(x, dim, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "softmax", softmax_keeping_float64)


def _init(D, ep):
    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    return megatron_tsp.initialize_model_parallel(tsp_size=D, expert_model_parallel_size=ep)


def _name(model, name, param):
    expert = getattr(param, "allreduce", True) is False
    return expert_param_global_name(model, name) if expert else name, expert


def _run(layout, D, ep, moe, seed, batches, reduce=True):
    """Loss per batch, router losses per batch and the gradient of the sum over batches of the
    mean loss (`reduce`: summed over the data-parallel ranks as Megatron's DDP does, each
    rank holding its own batch; the reference runs every batch itself)."""
    model = build_gpt(SHAPE, layout=layout, dtype=torch.float64, seed=seed, pg_collection=_init(D, ep),
                      **{**BASE, **moe})
    tsp = mpu.get_tensor_model_parallel_group()
    pop_router_losses(tsp)
    losses, router = [], []
    for tokens, labels, pos in batches:
        loss = model(tokens, pos, None, labels=labels)
        loss.mean().backward()
        losses.append(loss.detach())
        router.append(pop_router_losses(tsp))
    sum_sequence_parallel_grads(model, tsp)
    dp, expt_dp = mpu.get_data_parallel_group(), mpu.get_expert_data_parallel_group()
    grads = {}
    for name, p in model.named_parameters():
        gname, expert = _name(model, name, p)
        g = p.grad.clone()
        reduce_over = expt_dp if expert else dp  # what Megatron's DDP sums each gradient over
        if reduce and reduce_over.size() > 1:
            dist.all_reduce(g, group=reduce_over)
        grads[gname] = g if expert else gather_full(g, p, tsp)
    return model, losses, router, grads


def _check(moe, D, ep, seed):
    dp_size, dp_rank = dist.get_world_size() // D, None
    batches = [mock_batch(i, 2, SHAPE, seed=seed) for i in range(dp_size)]
    _, ref_losses, ref_router, ref_grads = _run("tsp", 1, 1, moe, seed, batches, reduce=False)
    _init(D, ep)
    dp_rank = mpu.get_data_parallel_rank()
    model, losses, router, grads = _run("tsp", D, ep, moe, seed, [batches[dp_rank]])
    errors = {"loss": rel_err(losses[0], ref_losses[dp_rank])}
    assert router[0].keys() == ref_router[dp_rank].keys() and router[0], (router[0], ref_router[dp_rank])
    for name, v in router[0].items():  # float32 in the tracker: scaled to TOL's scale for the check
        errors[f"router loss {name}"] = rel_err(v, ref_router[dp_rank][name]) * TOL / TRACKER_TOL
    # The expert gradients held here, and every dense gradient, against the reference.
    missing = [n for n in grads if n not in ref_grads]
    assert not missing, missing
    for n, g in grads.items():
        errors[n] = rel_err(g, ref_grads[n])
    held = {n for n in grads}
    assert {n for n in ref_grads if "local_experts" not in n} <= held
    vals = torch.tensor([max(errors.values())], dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return errors, vals.item(), model


@pytest.mark.parametrize("D,ep_factor,case", [
    (2, 1, "top1"), (2, 1, "top2-shared-zloss"), (2, 1, "top2-drop-interleaved"),
    (2, 1, "top1-drop-position-gated-shared"),
    (4, 1, "top2-shared-zloss"), (4, 1, "top2-drop-interleaved"),
    (2, 2, "top2-drop-interleaved"), (2, 2, "top1-drop-position-gated-shared"),
])
def test_moe_loss_router_losses_and_every_gradient_match_single_process(world, D, ep_factor, case):
    if world % (D * ep_factor):
        pytest.skip(f"needs a world that is a multiple of D x k = {D * ep_factor}")
    if ep_factor > 1 and world != D * ep_factor:
        pytest.skip("EP = D x k is tested at world = D x k")
    seed = fresh_seed()
    errors, worst, model = _check(CASES[case], D, D * ep_factor, seed)
    bad = {n: e for n, e in errors.items() if not e <= TOL}
    assert not bad and worst <= TOL, f"seed {seed}: {bad or worst}"
    # Every rank holds E / EP experts per MoE layer, and the counts saw every routed token.
    layers = expert_load(model, group=mpu.get_tensor_and_data_parallel_group())
    k, E = CASES[case]["moe_router_topk"], BASE["num_moe_experts"]
    assert layers and all(c.shape == (E,) for c in layers.values())
    tokens = 2 * SHAPE.seq_length * (world // D)
    drop = "moe_expert_capacity_factor" in CASES[case]
    assert all((c.sum() <= tokens * k) if drop else (c.sum() == tokens * k) for c in layers.values())


def _combine_in_the_wrong_order(self, hidden_states):
    """A broken combine under expert parallelism: the tokens come back in reversed order."""
    out = type(self)._original_combine_postprocess(self, hidden_states)
    return out.flip(0) if self.ep_size > 1 else out


@pytest.mark.parametrize("broken", ["combine-order", "capacity-mask-in-natural-order"])
def test_a_broken_moe_is_caught(world, monkeypatch, broken):
    if world % 2:
        pytest.skip("needs D = 2")
    if broken == "combine-order":
        MoEAlltoAllTokenDispatcher._original_combine_postprocess = MoEAlltoAllTokenDispatcher.combine_postprocess
        monkeypatch.setattr(MoEAlltoAllTokenDispatcher, "combine_postprocess", _combine_in_the_wrong_order)
        case = "top1"
    else:
        from megatron_tsp.tsp import moe

        # Keep the natural-order rows instead of this rank's zigzag rows of the capacity mask.
        monkeypatch.setattr(moe, "to_zigzag", lambda t, D, dim: t)
        case = "top2-drop-interleaved"
    _, worst, _ = _check(CASES[case], 2, 2, fresh_seed())
    assert worst > 1e-3, f"the broken variant ({broken}) was not caught: worst error {worst}"


def test_no_saved_tensor_holds_every_token(world):
    """With D = 2 (top-1, a shared expert), no tensor an MoE layer saves for backward holds all
    S x b tokens' hidden states: the router, the shared expert and the experts see this rank's
    tokens and the ones dispatched to its experts (about S x b / EP with top-1), never a gather."""
    if world % 2:
        pytest.skip("needs D = 2")
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = build_gpt(SHAPE, layout="tsp", dtype=torch.float64, seed=1, pg_collection=_init(2, 2),
                      **{**BASE, **CASES["top1-drop-position-gated-shared"], "moe_expert_capacity_factor": None})
    saved, hooks = [], []
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        context = torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t)
        layer.register_forward_pre_hook(lambda *_, c=context: c.__enter__())
        layer.register_forward_hook(lambda *_, c=context: c.__exit__(None, None, None))
    tokens, labels, pos = mock_batch(0, 2, SHAPE)
    model(tokens, pos, None, labels=labels).mean().backward()
    S, b, h = SHAPE.seq_length, 2, SHAPE.hidden_size
    assert any(t.shape[-1] == h for t in saved)  # the hooks saw the layers' activations
    params = {p.data_ptr() for p in model.parameters()}  # weights are saved by reference
    hidden = [tuple(t.shape) for t in saved if t.data_ptr() not in params and t.dim() >= 2 and t.shape[-1] == h
              and t.numel() >= S * b * h]
    assert not hidden, f"saved tensors holding all {S * b} tokens' hidden states: {hidden}"
    assert any(isinstance(m, TSPTopKRouter) for m in model.modules())


@pytest.mark.parametrize("bad,match", [
    (dict(num_moe_experts=3), r"--num-experts = 3 must be divisible by --expert-model-parallel-size = 2"),
    (dict(moe_token_dispatcher_type="allgather"), r"--moe-token-dispatcher-type = 'allgather'.*whole sequence"),
    (dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0), r"sinkhorn"),
    (dict(moe_shared_expert_intermediate_size=33), r"--moe-shared-expert-intermediate-size = 33"),
    (dict(moe_shared_expert_gate=True), r"--moe-shared-expert-gate .*needs --moe-shared-expert-intermediate-size"),
    (dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True), r"--moe-pad-expert-input-to-capacity"),
])
def test_bad_moe_options_are_refused_on_every_rank(world, bad, match):
    if world % 2:
        pytest.skip("needs D = 2")
    pgs = _init(2, 2)
    kw = {**BASE, "moe_router_topk": 2, **bad}
    with pytest.raises(TSPConfigError, match=match):
        build_gpt(SHAPE, layout="tsp", dtype=torch.float64, pg_collection=pgs, **kw)
    dist.barrier()  # every rank raised before any collective and is still in step


def test_expert_parallel_size_that_does_not_fit_the_world_is_refused(world):
    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    with pytest.raises(TSPConfigError, match=r"--expert-model-parallel-size = 3 does not fit the world"):
        megatron_tsp.initialize_model_parallel(tsp_size=1, expert_model_parallel_size=3)
    with pytest.raises(TSPConfigError, match=r"--expert-tensor-parallel-size = 2"):
        megatron_tsp.initialize_model_parallel(tsp_size=1, expert_tensor_parallel_size=2)
    dist.barrier()


def test_moe_model_under_ddp_is_freed(world):
    """An MoE model under Megatron's DDP, after a forward and backward, is garbage once dropped.
    The alltoall dispatcher kept the last routing probabilities, whose graph reaches the
    parameters' gradient hooks, which hold the DDP wrapper: a cycle through C++ autograd nodes
    gc cannot see (every driver run of an MoE recipe kept its model and its destroyed groups)."""
    import gc
    import weakref

    from megatron_tsp.training.build import wrap_ddp_and_optimizer

    pgs = _init(1, 1)
    model = build_gpt(SHAPE, layout="tsp", dtype=torch.float32, seed=1, pg_collection=pgs, **{**BASE, **CASES["top1"]})
    ddp, optimizer = wrap_ddp_and_optimizer(model, pg_collection=pgs)
    tokens, labels, pos = mock_batch(0, 2, SHAPE)
    ddp(tokens, pos, None, labels=labels).mean().backward()
    refs = [weakref.ref(model), weakref.ref(ddp)]
    del model, ddp, optimizer
    megatron_tsp.destroy_model_parallel()
    gc.collect()
    assert all(ref() is None for ref in refs), "the MoE model under DDP outlived its step"
