"""MoE generation: TSP prefill + cache exchange + TP decode of a mixture-of-experts model against
the unsharded model (float64, gloo), as tests/inference/test_inference.py does for dense models.

The model: 2 MoE layers, 4 experts, top-2 softmax routing, a gated shared expert (Qwen2-MoE's
`moe_shared_expert_gate`), the alltoall dispatcher, experts split over the TSP group (EP = D).
The prefill runs TSPGPTModel's MoE layers (the TSP router, the shared expert as the ring MLP) on
each rank's zigzag tokens, padding included; the decode runs Megatron's TP = D GPTModel on the
same parameter tensors (its TopKRouter, SharedExpertMLP and the alltoall dispatcher over EP = D,
every rank holding the whole decode batch). The reference is Megatron's GPTModel at D = 1, EP = 1
recomputing the whole sequence per new token: greedy tokens identical, every step's logits within
1e-10. Megatron's router takes its softmax in float32 whatever the model dtype (two float64
models whose router inputs differ in the 16th digit would differ by float32 rounding): both run
it in float64 here (the fixture), as in tests/tsp/test_moe.py. Broken variant: the decode
model's routers send each token to the next expert (expert e's share to e + 1): the prefill's
first token stays right, the decode steps are caught.

Token dropping (`moe_expert_capacity_factor`) is not compared: an expert's capacity depends on
the tokens of the forward (the reference's whole sequence, the decode's one token per prompt),
so no two of these schedules drop alike, in Megatron as here."""

import pytest
import torch
from megatron.core import parallel_state as mpu
from megatron.core.transformer.moe.router import TopKRouter

import megatron_tsp
from megatron_tsp.inference import decode_model, generate
from megatron_tsp.training.build import ModelShape, build_gpt
from megatron_tsp.tsp.moe import TSPSharedExpertMLP, TSPTopKRouter
from tests.utils import rel_err, skip_unless_divides

pytestmark = pytest.mark.distributed

TOL = 1e-10
SEED = 4242
SHAPE = ModelShape(hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64, seq_length=64,
                   num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_aux_loss_coeff=1e-2,
                   moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True)
# lengths 8 (a multiple of 2D for D = 1, 2, 4), 13 and 5 (not): one batch of unequal prompts
PROMPTS = [[(7 * i + 3) % 64 for i in range(8)], [(5 * i + 1) % 64 for i in range(13)], [9, 2, 33, 4, 61]]
NEW = 5
_REFERENCE = {}


@pytest.fixture(autouse=True)
def router_softmax_in_float64(monkeypatch):
    softmax = torch.softmax

    def softmax_keeping_float64(x, dim, dtype=None, **kw):
        if dtype is torch.float32 and x.dtype is torch.float64:
            dtype = torch.float64
        return softmax(x, dim, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "softmax", softmax_keeping_float64)


def _model(D, layout="tsp"):
    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    pgs = megatron_tsp.initialize_model_parallel(tsp_size=D, expert_model_parallel_size=D)
    # a large init: continuations that depend on the context (std 0.02 repeats one token)
    return build_gpt(SHAPE, layout=layout, dtype=torch.float64, seed=SEED, init_method_std=0.5,
                     pg_collection=pgs).eval()


@torch.no_grad()
def _reference():
    """Unsharded model (D = 1, EP = 1), whole sequence recomputed per step -> (tokens, per-step
    logits, expert load). Re-initializes the groups: call it before building the model under test."""
    if not _REFERENCE:
        ref = _model(1, "tp_sp")
        seqs = [list(p) for p in PROMPTS]
        out, step_logits = [[] for _ in PROMPTS], []
        for _ in range(NEW):
            logits = torch.stack([ref(torch.tensor([s]), torch.arange(len(s)).unsqueeze(0), None)[0, -1]
                                  for s in seqs])
            step_logits.append(logits)
            for i, t in enumerate(logits.argmax(dim=-1).tolist()):
                seqs[i].append(t)
                out[i].append(t)
        _REFERENCE.update(tokens=out, logits=step_logits)
    return _REFERENCE["tokens"], _REFERENCE["logits"]


def _check_built(model, D):
    """The model under test is the TSP MoE model with its experts split over the TSP ranks, and its
    decode model Megatron's MoE layers on the same tensors."""
    layers = [layer.mlp for layer in model.decoder.layers]
    assert all(type(m.router) is TSPTopKRouter and type(m.shared_experts) is TSPSharedExpertMLP for m in layers)
    assert all(m.shared_experts.gate_weight is not None for m in layers)
    assert all(len(m.local_expert_indices) == SHAPE.num_experts // D for m in layers)
    native = decode_model(model)
    routers = [m for m in native.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == SHAPE.num_layers and not any(isinstance(r, TSPTopKRouter) for r in routers)
    return native


@pytest.mark.parametrize("D", [1, 2, 4])
def test_moe_greedy_tokens_and_logits_match_full_recompute(world, D):
    skip_unless_divides(world, D)
    want, want_logits = _reference()
    model = _model(D)
    _check_built(model, D)
    got = generate(model, PROMPTS, NEW, keep_logits=True)
    assert got.tokens == want and got.finish_reasons == ["length"] * 3
    assert all(len(set(t)) > 1 for t in want)  # the continuations depend on the context
    logits = [got.first_logits] + got.step_logits
    assert len(logits) == NEW
    errs = [rel_err(a, b) for a, b in zip(logits, want_logits)]
    assert max(errs) <= TOL, errs


def test_decode_routing_to_the_wrong_expert_is_caught(world):
    D = 2
    skip_unless_divides(world, D)
    want, want_logits = _reference()
    model = _model(D)
    for router in (m for m in _check_built(model, D).modules() if isinstance(m, TopKRouter)):
        routing = router.routing

        def next_expert(logits, *args, routing=routing, **kw):
            probs, routing_map = routing(logits, *args, **kw)
            return probs.roll(1, dims=-1), routing_map.roll(1, dims=-1)

        router.routing = next_expert  # this instance only: the prefill's TSP routers are untouched
    got = generate(model, PROMPTS, NEW, keep_logits=True)
    assert rel_err(got.first_logits, want_logits[0]) <= TOL  # the prefill is right, the decode is not
    assert rel_err(got.step_logits[0], want_logits[1]) > 1e-3
