"""TSP + EP against Megatron's own TP + SP + EP MoE model at the same size, float64.

Megatron's native model: GPTModel with its local MoE layer spec (MoELayer, TopKRouter,
SequentialMLP experts, SharedExpertMLP), TP = D with sequence_parallel=True, EP = D, expert TP
= 1, the alltoall dispatcher, on the same groups and from the same global weights
(`layout_invariant_init`, checked equal first). The TSP model: TSPGPTModel (TSP attention, the
TSP router, the shared expert as the ring MLP). Checked equal: the per-token loss, each MoE
layer's load-balancing loss (float64, captured where the router attaches it, summed over the
TSP / TP group), and every gradient (attention, router, experts, shared expert, embedding), at
world 2 and 4, top-k 1 and 2, with a shared expert (top-1: gated, `moe_shared_expert_gate`, the
Qwen2-MoE family: its replicated gate weight's gradient checked too) and a z-loss. A broken TSP
model (the router's or the gate's weight gradient not summed over the TSP ranks: its
`sequence_parallel` tag dropped) must fail the same check.

Token dropping is not compared here: Megatron's SP router drops per rank-local token set, the
TSP router over the whole micro-batch as the single-process model does (tests/tsp/test_moe.py).

Bound: both models run float64 and the same arithmetic up to the order of sums (zigzag
against contiguous token shards, the TSP attention's K/V all-gather against Megatron's sequence
gather, the ring MLP's partial sums against Megatron's all-reduce / reduce-scatter), which moves
results by float64 rounding: measured <= 8e-16 relative (world 2, both cases). A float64 TSP vs
native difference of ~4e-8 is not a layout bug but two of Megatron's ops computing in float32
whatever the model dtype (measured at world 2, top-2, one seed, each fixture alone):
- the vocab-parallel cross entropy casts the logits `.float()` (TSP's sequence-local head keeps
  float64): per-token loss 3.7e-8, gradients ~1.8e-8;
- the router's aux-loss scores are `torch.softmax(logits, dtype=float32)` and are summed over
  each rank's tokens in float32, and the ranks' token sets differ (zigzag against contiguous
  chunks), so the float32 sums round differently: aux loss 4.6e-8.
With both in float64 (the fixture below) all gradients and losses agree to 8e-16, so the bound
is TOL = 1e-10 as for the other float64 parity tests, far above float64 ordering noise and far
below any real difference (the broken variant below: ~1e-1)"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

import megatron_tsp
from megatron_tsp.config import TSPOptions
from megatron_tsp.tsp.moe import TSPSharedExpertMLP, TSPTopKRouter, expert_param_global_name
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.parity import fresh_seed
from tests.utils import gather_full, mock_batch, rel_err, sum_sequence_parallel_grads

pytestmark = pytest.mark.distributed

TOL = 1e-10
SHAPE = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                   seq_length=32)
BASE = dict(num_moe_experts=4, moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
CASES = {
    "top1-gated-shared": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=32,
                              moe_shared_expert_gate=True),
    "top2-shared-zloss": dict(moe_router_topk=2, moe_shared_expert_intermediate_size=64, moe_z_loss_coeff=1e-3),
}


@pytest.fixture
def float64_softmax_and_cross_entropy(monkeypatch):
    """Megatron's router softmax and vocab-parallel cross entropy in float64 for float64 inputs
    (float32 otherwise, unchanged): see the module docstring."""
    softmax = torch.softmax

    def softmax_keeping_float64(x, dim, dtype=None, **kw):
        if dtype is torch.float32 and x.dtype is torch.float64:
            dtype = torch.float64
        return softmax(x, dim, dtype=dtype, **kw)

    def calculate_logits_max(logits):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return logits, torch.max(logits, dim=-1)[0]

    monkeypatch.setattr(torch, "softmax", softmax_keeping_float64)
    monkeypatch.setattr(VocabParallelCrossEntropy, "calculate_logits_max", staticmethod(calculate_logits_max))


@pytest.fixture
def aux_losses(monkeypatch):
    """Every load-balancing loss a router attaches, in its own dtype: [(name, layer, loss)]."""
    seen = []
    attach = TopKRouter.attach_and_log_load_balancing_loss

    def recording(self, activation, coeff, aux_loss, name, *args, **kw):
        seen.append((name, self.layer_number, aux_loss.detach().clone()))
        return attach(self, activation, coeff, aux_loss, name, *args, **kw)

    monkeypatch.setattr(TopKRouter, "attach_and_log_load_balancing_loss", recording)
    return seen


def _run(layout, D, moe, seed, aux_seen, broken=None):
    """Full parameters, per-token loss, aux losses summed over the TP group and full gradients
    of `layout` ('tsp' or 'tp_sp') at TP / TSP = EP = D, expert TP 1. `broken`: the TSP
    parameters ('router' or 'gate') whose gradient is not summed over the TSP ranks."""
    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    pgs = megatron_tsp.initialize_model_parallel(tsp_size=D, expert_model_parallel_size=D)
    # the gated case's shared expert on the ring exchange (at this size `auto` picks Megatron's token
    # all-gather, which the other case runs); the native layout ignores TSP's options
    options = TSPOptions(tsp_mlp_exchange="ring") if moe.get("moe_shared_expert_gate") else None
    model = build_gpt(SHAPE, layout=layout, dtype=torch.float64, seed=seed, tsp_options=options, pg_collection=pgs,
                      **{**BASE, **moe})
    model.double()  # norms built in float32 whatever params_dtype says (issue 14 item 2): same for both
    if broken == "router":
        for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
            router.weight.sequence_parallel = False
    elif broken == "gate":
        for shared in (m for m in model.modules() if isinstance(m, TSPSharedExpertMLP)):
            shared.gate_weight.sequence_parallel = False
    group, ep = mpu.get_tensor_model_parallel_group(), mpu.get_expert_model_parallel_group()
    assert model.config.sequence_parallel == (D > 1) and model.config.expert_tensor_parallel_size == 1
    assert ep.size() == D and mpu.get_expert_tensor_parallel_world_size() == 1
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == SHAPE.num_layers
    assert all(isinstance(m.token_dispatcher, MoEAlltoAllTokenDispatcher) for m in moe_layers)
    shared, router = (TSPSharedExpertMLP, TSPTopKRouter) if layout == "tsp" else (SharedExpertMLP, TopKRouter)
    assert all(type(m.shared_experts) is shared and type(m.router) is router for m in moe_layers), layout
    gated = bool(moe.get("moe_shared_expert_gate"))
    assert all((m.shared_experts.gate_weight is not None) == gated for m in moe_layers), layout
    if layout == "tsp" and gated:
        assert all(m.shared_experts.tsp_options.tsp_mlp_exchange == "ring" for m in moe_layers)
    del aux_seen[:]
    tokens, labels, pos = mock_batch(0, 2, SHAPE, seed=seed)
    loss = model(tokens, pos, None, labels=labels)  # [b, S] natural order on every rank
    loss.mean().backward()
    aux = {}
    for name, layer, value in aux_seen:
        value = value.to(torch.float64)
        dist.all_reduce(value, group=group)  # each rank's term covers its own tokens
        aux[f"{name} layer {layer}"] = value
    sum_sequence_parallel_grads(model, group)
    params, grads = {}, {}
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True) is False:  # an expert: whole on its EP rank, by global index
            gname = expert_param_global_name(model, name)
            for gathered_name, tensors in (("p", p.detach()), ("g", p.grad)):
                out = [None] * ep.size()
                dist.all_gather_object(out, (gname, tensors.cpu()), group=ep)
                for n, t in out:
                    (params if gathered_name == "p" else grads)[n] = t
        else:
            params[name] = gather_full(p.detach(), p, group)
            grads[name] = gather_full(p.grad, p, group)
    return params, loss.detach(), aux, grads


def _errors(D, case, seed, aux_seen, broken=None):
    native = _run("tp_sp", D, CASES[case], seed, aux_seen)
    tsp = _run("tsp", D, CASES[case], seed, aux_seen, broken=broken)
    (n_params, n_loss, n_aux, n_grads), (t_params, t_loss, t_aux, t_grads) = native, tsp
    assert n_params.keys() == t_params.keys() == n_grads.keys() == t_grads.keys()
    assert any("local_experts" in n for n in n_params) and any("shared_experts" in n for n in n_params)
    assert any(n.endswith("gate_weight") for n in n_params) == bool(CASES[case].get("moe_shared_expert_gate"))
    unequal = [n for n in n_params if not torch.equal(n_params[n], t_params[n])]
    assert not unequal, f"the two models do not start from the same weights: {unequal}"
    assert n_aux.keys() == t_aux.keys() and len(n_aux) == SHAPE.num_layers, (n_aux.keys(), t_aux.keys())
    errors = {"loss": rel_err(t_loss, n_loss)}
    errors.update({f"aux {n}": rel_err(t_aux[n], n_aux[n]) for n in n_aux})
    errors.update({n: rel_err(t_grads[n], n_grads[n]) for n in n_grads})
    assert all(n_grads[n].abs().sum() > 0 for n in n_grads)
    vals = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(errors, vals.tolist()))


@pytest.mark.parametrize("case", list(CASES))
def test_tsp_ep_equals_megatron_native_tp_sp_ep(world, case, float64_softmax_and_cross_entropy, aux_losses):
    if world not in (2, 4):
        pytest.skip("TP = TSP = EP = world, at world 2 and 4")
    seed = fresh_seed()
    errors = _errors(world, case, seed, aux_losses)
    bad = {n: e for n, e in errors.items() if not e <= TOL}
    assert not bad, f"{case} D={world} (seed {seed}): {bad}"
    if dist.get_rank() == 0:
        print(f"\n{case} D={world}: worst {max(errors.values()):.1e} ({max(errors, key=errors.get)})")


@pytest.mark.parametrize("broken,case,suffix", [("router", "top2-shared-zloss", "router.weight"),
                                                 ("gate", "top1-gated-shared", "shared_experts.gate_weight")])
def test_a_broken_tsp_gradient_is_caught(world, broken, case, suffix, float64_softmax_and_cross_entropy, aux_losses):
    """The router's (or the shared expert's gate's) weight gradient left unsummed over the TSP
    ranks, each rank's covering only its tokens: caught, and nothing else moves."""
    if world != 2:
        pytest.skip("once, at world 2")
    errors = _errors(world, case, fresh_seed(), aux_losses, broken=broken)
    hit = {n: e for n, e in errors.items() if n.endswith(suffix)}
    assert hit and min(hit.values()) > 1e-3, f"the unsummed {broken} gradient was not caught: {hit}"
    assert max(e for n, e in errors.items() if n not in hit) <= TOL  # and nothing else moved
