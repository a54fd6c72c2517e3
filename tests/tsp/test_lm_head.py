"""The sequence-local LM head (`TSPOptions(tsp_lm_head='local')`): TSPGPTModel's per-token loss and
every gradient (embedding and output weight included) equal those of TSPGPTModel with Megatron's
head (`tsp_lm_head='megatron'`) and of the unsharded native GPTModel, float64, at D = 1, 2, 4, MHA
and GQA, tied and untied embeddings, with a token chunk that does not divide the local tokens
(the last chunk shorter) and V/D odd; and deliberately broken variants fail the same check.

Megatron's vocab-parallel cross entropy casts logits to float32 whatever the model's dtype
(`.float()`); for a float64 comparison the `megatron_ce_in_float64` fixture makes it compute in
the logits' dtype when that is float64 (float32 otherwise, unchanged)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

import megatron_tsp.tsp.lm_head as lm_head
from megatron_tsp.tsp import comm
from megatron_tsp.config import TSPConfigError, TSPOptions
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.parity import fresh_seed
from tests.utils import device, gather_full, init_tsp, rel_err, skip_unless_divides, sum_sequence_parallel_grads

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-10
B = 2
CHUNK = 5  # local tokens: 64 (D=1), 32 (D=2), 16 (D=4): never a multiple of 5
SHAPES = {
    "mha-untied": ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                             vocab_size=4 * 37, seq_length=32),
    "gqa-tied": ModelShape(num_layers=2, hidden_size=32, num_attention_heads=8, num_query_groups=4,
                           ffn_hidden_size=64, vocab_size=4 * 37, seq_length=32,
                           share_embeddings_and_output_weights=True),
}


@pytest.fixture
def megatron_ce_in_float64(monkeypatch):
    def calculate_logits_max(logits):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return logits, torch.max(logits, dim=-1)[0]

    monkeypatch.setattr(VocabParallelCrossEntropy, "calculate_logits_max", staticmethod(calculate_logits_max))


def _batch(shape, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab_size, (B, shape.seq_length), generator=g)
    labels = torch.randint(0, shape.vocab_size, (B, shape.seq_length), generator=g)
    weights = torch.rand(B, shape.seq_length, generator=g, dtype=torch.float64)  # d objective / d loss
    pos = torch.arange(shape.seq_length).unsqueeze(0).expand(B, -1).contiguous()
    return tuple(t.to(device()) for t in (tokens, labels, pos, weights))


def loss_and_grads(layout, D, shape, seed, options=None, **config_kw):
    """Per-token loss [b, S] and every parameter's full gradient, under sum(loss * weights)."""
    model = build_gpt(shape, layout=layout, dtype=torch.float64, seed=seed, tsp_options=options,
                      pg_collection=init_tsp(D), **config_kw)
    model.double()  # TSPNorm's torch norms hold float32 weights whatever params_dtype says (issue 14 item 2)
    tokens, labels, pos, weights = _batch(shape, seed)
    loss = model(tokens, pos, None, labels=labels)
    (loss * weights).sum().backward()
    group = mpu.get_tensor_model_parallel_group()
    sum_sequence_parallel_grads(model, group)
    grads = {n: gather_full(p.grad, p, group) for n, p in model.named_parameters()}
    return loss.detach(), grads


def worst_error(result, reference):
    """The largest relative error of the loss and any gradient, the same on every rank."""
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert loss.shape == ref_loss.shape and grads.keys() == ref_grads.keys()
    errors = {"loss": rel_err(loss, ref_loss), **{n: rel_err(grads[n], ref_grads[n]) for n in grads}}
    worst = max(errors, key=errors.get)
    value = torch.tensor([errors[worst]], dtype=torch.float64, device=device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item(), worst


def local(**kw):
    return TSPOptions(tsp_lm_head="local", lm_head_chunk_tokens=CHUNK, **kw)


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("name", list(SHAPES))
def test_local_head_matches_megatron_and_unsharded(world, D, name, megatron_ce_in_float64):
    skip_unless_divides(world, D)
    shape, seed = SHAPES[name], fresh_seed()
    native = loss_and_grads("tp_sp", 1, shape, seed)
    assert native[0].dtype == torch.float64 and all(g.abs().sum() > 0 for g in native[1].values())
    megatron = loss_and_grads("tsp", D, shape, seed, TSPOptions(tsp_lm_head="megatron"))
    ours = loss_and_grads("tsp", D, shape, seed, local())
    for what, reference in (("unsharded native", native), ("TSP with Megatron's head", megatron)):
        err, where = worst_error(ours, reference)
        assert err <= TOL, f"{name} D={D}: {where} differs from {what} by {err:.3e} (seed {seed})"


def _drop_reductions(monkeypatch):
    class NoReductions(lm_head.Reductions):
        def post(self, buf, owner):
            pass

    monkeypatch.setattr(lm_head, "Reductions", NoReductions)


def _skip_last_shard(monkeypatch):
    real = lm_head.broadcast_shards
    calls = {"n": 0}

    def shards(owned, packer, group):
        calls["n"] += 1
        for j, buf in real(owned, packer, group):
            if calls["n"] % 2 == 1 and j == group.size() - 1:  # the forward's log-sum-exp misses a shard
                continue
            yield j, buf

    monkeypatch.setattr(lm_head, "broadcast_shards", shards)


def _drop_short_chunk(monkeypatch):
    monkeypatch.setattr(lm_head, "token_chunks", lambda n, c: [slice(i, i + c) for i in range(0, n - c + 1, c)])


def _gather_backward_sums(monkeypatch):
    monkeypatch.setattr(comm, "all_gather_replicated", comm.all_gather_sequence)


BROKEN = {"no weight-grad reduction": (_drop_reductions, 2), "LSE skips a shard": (_skip_last_shard, 2),
          "short last chunk dropped": (_drop_short_chunk, 1), "loss gather backward sums": (_gather_backward_sums, 2)}


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("breakage", list(BROKEN))
def test_broken_local_head_is_caught(world, D, breakage, megatron_ce_in_float64, monkeypatch):
    """Test the test: each breakage fails the parity check above (at the D where it matters)."""
    skip_unless_divides(world, D)
    breaker, min_d = BROKEN[breakage]
    if D < min_d:
        pytest.skip(f"{breakage} changes nothing at D = {D}")
    shape, seed = SHAPES["mha-untied"], fresh_seed()
    reference = loss_and_grads("tsp", D, shape, seed, TSPOptions(tsp_lm_head="megatron"))
    breaker(monkeypatch)
    err, where = worst_error(loss_and_grads("tsp", D, shape, seed, local()), reference)
    assert err > 1e-3, f"{breakage} at D={D} went unnoticed (worst {where}: {err:.3e})"


def test_mup_output_multiplier(world, megatron_ce_in_float64, monkeypatch):
    """MuP (megatron-core >= 0.19: `use_mup`) multiplies the logits by mup_output_mult (here
    1/2: hidden 32 over a base of 16); the local head applies it too, and fails without it."""
    from megatron.core.transformer import TransformerConfig

    if "use_mup" not in {f.name for f in dataclasses.fields(TransformerConfig)}:
        pytest.skip("this megatron-core has no MuP")
    shape, seed, mup = SHAPES["mha-untied"], fresh_seed(), dict(use_mup=True, mup_base_hidden_size=16)
    reference = loss_and_grads("tsp", world, shape, seed, TSPOptions(tsp_lm_head="megatron"), **mup)
    err, where = worst_error(loss_and_grads("tsp", world, shape, seed, local(), **mup), reference)
    assert err <= TOL, f"{where} differs from Megatron's head with MuP by {err:.3e} (seed {seed})"
    monkeypatch.setattr(lm_head, "logit_scale", lambda config: 1.0)
    err, where = worst_error(loss_and_grads("tsp", world, shape, seed, local(), **mup), reference)
    assert err > 1e-3, f"the local head without MuP's multiplier went unnoticed ({where}: {err:.3e})"


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_function_against_dense_cross_entropy(world, scale, chunk):
    """The Function alone at D = world against torch's cross entropy over the full logits of all
    tokens (float64): loss, dx and the whole output weight's gradient, with a logit multiplier
    (MuP's, megatron-core >= 0.19) and chunks of 1 token, a non-divisor and all tokens."""
    init_tsp(world)
    group = mpu.get_tensor_model_parallel_group()
    D, p = group.size(), group.rank()
    g = torch.Generator().manual_seed(11)
    s, b, h, V = 6, 3, 8, 5 * D
    x_all = torch.randn(D, s, b, h, generator=g, dtype=torch.float64)
    w_full = torch.randn(V, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (D, s, b), generator=g)
    grad = torch.randn(D, s, b, generator=g, dtype=torch.float64)

    x_ref, w_ref = x_all.clone().requires_grad_(), w_full.clone().requires_grad_()
    logits = scale * torch.einsum("dsbh,vh->dsbv", x_ref, w_ref)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(D, s, b)
    (ref * grad).sum().backward()

    x = x_all[p].clone().to(device()).requires_grad_()
    w = w_full[p * V // D : (p + 1) * V // D].clone().to(device()).requires_grad_()
    loss = lm_head.TSPLMHeadFunction.apply(x, w, labels[p].to(device()), group, chunk, scale)
    (loss * grad[p].to(device())).sum().backward()
    assert rel_err(loss.cpu(), ref[p].detach()) <= TOL
    assert rel_err(x.grad.cpu(), x_ref.grad[p]) <= TOL
    assert rel_err(w.grad.cpu(), w_ref.grad[p * V // D : (p + 1) * V // D]) <= TOL


def test_bad_options_are_refused(world):
    for kw, key in ((dict(tsp_lm_head="fused"), "parallel.tsp_lm_head"),
                    (dict(lm_head_chunk_tokens=0), "parallel.lm_head_chunk_tokens"),
                    (dict(lm_head_chunk_tokens=2.5), "parallel.lm_head_chunk_tokens")):
        with pytest.raises(TSPConfigError, match=key) as e:
            TSPOptions(**kw)
        assert e.value.option == key
    for field, flag in (("defer_embedding_wgrad_compute", "--defer-embedding-wgrad-compute"),
                        ("mtp_num_layers", "--mtp-num-layers")):
        config = SimpleNamespace(**{field: 1})
        with pytest.raises(TSPConfigError, match=flag + ".*parallel.tsp_lm_head = megatron"):
            lm_head.check_lm_head(config, local(), 4 * 37, world)
        lm_head.check_lm_head(config, TSPOptions(tsp_lm_head="megatron"), 4 * 37, world)
    if world > 1:  # raised by TSPGPTModel before Megatron's own assertion
        pgs = init_tsp(world)
        odd = dataclasses.replace(SHAPES["mha-untied"], vocab_size=4 * 37 + 1)
        with pytest.raises(TSPConfigError, match=f"vocabulary size 149 must be divisible by parallel.size = {world}"):
            build_gpt(odd, layout="tsp", dtype=torch.float64, tsp_options=local(), pg_collection=pgs)
    model = build_gpt(SHAPES["mha-untied"], layout="tsp", dtype=torch.float64, tsp_options=local(),
                      pg_collection=init_tsp(world))
    model.output_layer.bias = torch.nn.Parameter(torch.zeros(4 * 37 // world, dtype=torch.float64))
    tokens, labels, pos, _ = _batch(SHAPES["mha-untied"], 0)
    with pytest.raises(TSPConfigError, match="output layer with a bias"):
        model(tokens, pos, None, labels=labels)
