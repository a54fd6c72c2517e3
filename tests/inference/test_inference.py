"""TSP prefill + cache exchange + TP decode against the unsharded model (float64, gloo).

The reference is Megatron's GPTModel at D = 1 with the same weights, recomputing the whole
sequence for every new token; greedy tokens must be identical, logits and log-probs within
1e-10. Sampling draws with the same Sampler from the reference's logits."""

import pytest
import torch
import torch.distributed as dist

from megatron_tsp.config import TSPConfigError
from megatron_tsp.inference import (Sampler, Sampling, cache, decode_model, exchange_all, generate, logprobs,
                                    static_context, tsp_prefill)
from megatron_tsp.inference import prefill as prefill_module
from megatron_tsp.training.build import ModelShape, build_gpt
from megatron_tsp.tsp.zigzag import local_position_index, to_zigzag
from tests.utils import OpShapes, init_tsp, rel_err, skip_unless_divides

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-10
SEED = 4242
SHAPES = {
    "rope-mha": ModelShape(hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64, seq_length=64),
    "rope-gqa-tied": ModelShape(hidden_size=32, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=64,
                                vocab_size=64, seq_length=64, share_embeddings_and_output_weights=True),
    "learned-abs-gelu-bias": ModelShape(hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                                        seq_length=64, position_embedding_type="learned_absolute", swiglu=False,
                                        add_bias_linear=True, normalization="LayerNorm"),
}
# lengths 8 (a multiple of 2D for D = 1, 2, 4), 13 and 5 (not): one batch of unequal prompts
PROMPTS = [[(7 * i + 3) % 64 for i in range(8)], [(5 * i + 1) % 64 for i in range(13)], [9, 2, 33, 4, 61]]
NEW = 5
_REFERENCE = {}


def _model(name, D, layout="tsp"):
    pgs = init_tsp(D)
    # a large init: continuations that depend on the context (std 0.02 repeats one token)
    return build_gpt(SHAPES[name], layout=layout, dtype=torch.float64, seed=SEED, init_method_std=0.5,
                     pg_collection=pgs).eval()


@torch.no_grad()
def _reference(name, prompts=PROMPTS, new=NEW, sampling=Sampling(), stop=()):
    """Unsharded model, whole sequence recomputed per step -> (tokens, reasons, per-step logits,
    sequences, log-probs). Re-initializes the groups (D = 1) when not cached: call it before
    building the model under test."""
    key = (name, str(prompts), new, sampling, tuple(stop))
    if key not in _REFERENCE:
        ref = _model(name, 1, "tp_sp")
        sampler = Sampler(sampling, ref.vocab_size, torch.device("cpu"))
        seqs = [list(p) for p in prompts]
        out, reasons, done, step_logits = [[] for _ in prompts], ["length"] * len(prompts), [False] * len(prompts), []
        for _ in range(new):
            logits = torch.stack([ref(torch.tensor([s]), torch.arange(len(s)).unsqueeze(0), None)[0, -1]
                                  for s in seqs])
            step_logits.append(logits)
            for i, t in enumerate(sampler(logits).tolist()):
                seqs[i].append(t)
                if not done[i]:
                    if t in stop:
                        done[i], reasons[i] = True, "stop"
                    else:
                        out[i].append(t)
            if all(done):
                break
        full_logprobs = [torch.log_softmax(ref(torch.tensor([s[:-1]]), torch.arange(len(s) - 1).unsqueeze(0), None)[0],
                                           dim=-1) for s in seqs]
        _REFERENCE[key] = (out, reasons, step_logits, seqs, full_logprobs)
    return _REFERENCE[key]


GREEDY_CASES = [("rope-mha", 1), ("rope-mha", 2), ("rope-mha", 4), ("rope-gqa-tied", 2), ("rope-gqa-tied", 4),
                ("learned-abs-gelu-bias", 2)]


@pytest.mark.parametrize("name,D", GREEDY_CASES)
def test_greedy_tokens_and_logits_match_full_recompute(world, D, name):
    skip_unless_divides(world, D)
    want, _, want_logits, _, _ = _reference(name)
    model = _model(name, D)
    got = generate(model, PROMPTS, NEW, keep_logits=True)
    assert got.tokens == want and got.finish_reasons == ["length"] * 3
    assert all(len(set(t)) > 1 for t in want)  # the continuations depend on the context
    assert got.prompt_tokens == sum(map(len, PROMPTS))
    logits = [got.first_logits] + got.step_logits
    assert len(logits) == NEW
    errs = [rel_err(a, b) for a, b in zip(logits, want_logits)]
    assert max(errs) <= TOL, errs


def test_streamed_kv_prefill_matches(world, monkeypatch):
    """parallel.tsp_attention_kv = streamed: the prefill runs the streamed attention (its K/V
    ring; the caching shard keeps each rank's K/V as with the gathered one)."""
    from megatron_tsp.config import TSPOptions
    from megatron_tsp.tsp import streamed_attention

    calls, real = [], streamed_attention.stream_forward
    monkeypatch.setattr(streamed_attention, "stream_forward", lambda *a: (calls.append(1), real(*a))[1])
    D = world
    if D < 2:
        pytest.skip("needs D >= 2")
    want, _, want_logits, _, _ = _reference("rope-gqa-tied")
    model = build_gpt(SHAPES["rope-gqa-tied"], layout="tsp", dtype=torch.float64, seed=SEED, init_method_std=0.5,
                      tsp_options=TSPOptions(tsp_attention_kv="streamed"), pg_collection=init_tsp(D)).eval()
    got = generate(model, PROMPTS, NEW, keep_logits=True)
    assert calls, "the prefill did not stream"
    assert got.tokens == want
    assert max(rel_err(a, b) for a, b in zip([got.first_logits] + got.step_logits, want_logits)) <= TOL


@pytest.mark.parametrize("D", [1, 2, 4])
def test_logprobs_match_unsharded(world, D):
    skip_unless_divides(world, D)
    name = "rope-gqa-tied"
    *_, seqs, full = _reference(name)
    prompts = [s[: len(p)] for s, p in zip(seqs, PROMPTS)]
    continuations = [s[len(p):] for s, p in zip(seqs, PROMPTS)]
    got = logprobs(_model(name, D), prompts, continuations)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        want = full[i][len(p) - 1 :].gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1)
        assert len(got[i]) == len(c)
        assert (torch.tensor(got[i], dtype=torch.float64) - want).abs().max() <= TOL


@pytest.mark.parametrize("D", [1, 2, 4])
def test_sampling_with_a_seed_gives_the_same_tokens_at_every_D(world, D):
    skip_unless_divides(world, D)
    samplings = (Sampling(temperature=0.7, top_k=0, top_p=0.9, seed=11), Sampling(temperature=1.3, top_k=5, seed=3))
    wants = [_reference("rope-mha", new=6, sampling=s)[0] for s in samplings]  # before the model: it re-inits groups
    model = _model("rope-mha", D)
    for sampling, want in zip(samplings, wants):
        assert generate(model, PROMPTS, 6, sampling).tokens == want


@pytest.mark.parametrize("D", [2, 4])
def test_stop_tokens_end_each_prompt_at_its_own_step(world, D):
    skip_unless_divides(world, D)
    greedy, *_ = _reference("rope-mha")
    stop = [greedy[0][2], greedy[1][0]]
    want, reasons, *_ = _reference("rope-mha", stop=stop)
    got = generate(_model("rope-mha", D), PROMPTS, NEW, stop_tokens=stop)
    assert got.tokens == want and got.finish_reasons == reasons
    assert "stop" in reasons


def _megatron_tp_cache(model, prompt_batch):
    """The static cache Megatron's own TP = D prefill of equal-length prompts builds."""
    from megatron.core.inference.contexts import StaticInferenceContext

    native = decode_model(model)
    b, n = len(prompt_batch), len(prompt_batch[0])
    context = StaticInferenceContext(b, n + 4)
    with torch.no_grad():
        native(torch.tensor(prompt_batch), torch.arange(n).expand(b, n), None, inference_context=context,
               runtime_gather_output=True)
    return {k: (key[:n], value[:n]) for k, (key, value) in context.key_value_memory_dict.items()}


def _our_cache(model, prompt_batch):
    pre = tsp_prefill(model, prompt_batch)
    native = decode_model(model)
    context = static_context(exchange_all(pre.kv, model.tsp_group), pre.lengths, 4,
                             [layer.self_attention.layer_number for layer in native.decoder.layers])
    n = len(prompt_batch[0])
    return {k: (key[:n], value[:n]) for k, (key, value) in context.key_value_memory_dict.items()}


def _cache_error(model, prompt_batch):
    want, got = _megatron_tp_cache(model, prompt_batch), _our_cache(model, prompt_batch)
    assert want.keys() == got.keys()
    return max(rel_err(g, w) for k in want for g, w in zip(got[k], want[k]))


@pytest.mark.parametrize("D", [2, 4])
def test_cache_after_exchange_is_megatrons_tp_cache(world, D):
    skip_unless_divides(world, D)
    model = _model("rope-gqa-tied", D)
    prompt_batch = [PROMPTS[1][:12], PROMPTS[1][1:13]]  # 12 tokens: padded to 16 at D = 4
    assert _cache_error(model, prompt_batch) <= 1e-14


def test_exchange_sending_the_wrong_kv_group_is_caught(world, monkeypatch):
    D = 2
    skip_unless_divides(world, D)
    _, _, want_logits, _, _ = _reference("rope-gqa-tied")
    model = _model("rope-gqa-tied", D)
    real = cache.exchange
    monkeypatch.setattr(cache, "exchange", lambda kv, group: real(kv.roll(1, dims=0), group))
    prompt_batch = [PROMPTS[1][:12], PROMPTS[1][1:13]]
    assert _cache_error(model, prompt_batch) > 1e-3
    got = generate(model, PROMPTS, NEW, keep_logits=True)
    assert rel_err(got.first_logits, want_logits[0]) <= TOL  # the prefill is right, the decode is not
    assert rel_err(got.step_logits[0], want_logits[1]) > 1e-3




def _full_sequence_tensors(model, prompts):
    """Shapes of the prefill's tensors that span all S tokens and the hidden size or vocabulary."""
    S = prefill_module.padded_length(max(map(len, prompts)), model.tsp_group.size())
    wide = {model.config.hidden_size, model.vocab_size, model.vocab_size // model.tsp_group.size()}
    with OpShapes() as seen:
        tsp_prefill(model, prompts)
        tsp_prefill(model, [p[:-1] for p in prompts], keep_cache=False, labels=[p[1:] for p in prompts])
    return [s for s in seen.shapes if S in s and s[-1] in wide]


def test_prefill_keeps_no_full_sequence_hidden_states_or_logits(world, monkeypatch):
    D = 2
    skip_unless_divides(world, D)
    model = _model("rope-mha", D)
    # S = 40: no other dimension is 40 (3 prompts: 20 local tokens x 3 rows flattened is 60)
    prompts = [list(range(1, 41)), list(range(3, 30)), [5, 6, 7]]
    seen = _full_sequence_tensors(model, prompts)
    assert seen == [], sorted(set(seen))
    # the check sees Megatron's sequence-parallel embedding ([b, S, h] partial sums on every rank)
    monkeypatch.setattr(prefill_module, "embed_local", _megatron_embedding(model))
    assert _full_sequence_tensors(model, prompts) != []


def _megatron_embedding(model):
    """Megatron's embedding (vocab-parallel, then the sequence-parallel scatter) in its place."""

    def embed(m, tokens_local, positions_local):
        D, p = m.tsp_group.size(), m.tsp_group.rank()
        S = tokens_local.shape[1] * D
        full = torch.zeros(tokens_local.shape[0], S, dtype=torch.long)
        full[:, local_position_index(S, D, p, "cpu")] = tokens_local
        dist.all_reduce(full, group=m.tsp_group)  # every rank's tokens (each position from its owner)
        return m.embedding(input_ids=to_zigzag(full, D, dim=1), position_ids=None)

    return embed


@pytest.mark.parametrize("D", [2])
def test_bad_input_is_one_clear_error_on_every_rank(world, D):
    skip_unless_divides(world, D)
    want = _reference("rope-mha")[0][0][:2]
    model = _model("rope-mha", D)
    cases = {
        "more than the model's limit": ([list(range(1, 60)) * 2], 4),
        "is empty": ([[1, 2], []], 4),
        "empty batch": ([], 4),
        "out of the vocabulary": ([[1, 64, 3]], 4),
        "--max-new-tokens": ([[1, 2, 3]], 62),
        "integer token ids": ([[1, 2.5]], 4),
    }
    for message, (prompts, new) in cases.items():
        with pytest.raises(TSPConfigError, match=message):
            generate(model, prompts, new)
    with pytest.raises(TSPConfigError, match="--top-k and --top-p"):
        generate(model, [[1, 2]], 2, Sampling(top_k=3, top_p=0.5))
    with pytest.raises(TSPConfigError, match="continuations"):
        logprobs(model, [[1, 2]], [[3], [4]])
    # and the group still works: nothing was left half-done
    assert generate(model, PROMPTS[:1], 2).tokens == [want]
