"""Packed sequences through whole models: TSP (D = 1, 2, 4) and the baselines (TP + SP on SDPA,
context parallelism) on a packed batch with document ids equal Megatron's GPTModel run on each
document alone (float64, per-token outputs and every parameter gradient); the document ids and
positions the driver derives from EOD tokens equal Megatron's own masks; the recipe keys' errors."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

import megatron_tsp
from megatron_tsp.baselines.context_parallel import cp_slice
from megatron_tsp.training.build import ModelShape, build_gpt
from megatron_tsp.tsp.documents import document_ids, full_mask
from megatron_tsp.tsp.zigzag import from_zigzag
from tests.parity import document_positions, fresh_seed
from tests.utils import gather_full, init_tsp, rel_err, skip_unless_divides, sum_sequence_parallel_grads

TOL = 1e-10
S = 16
SHAPES = {
    "gqa-rope": ModelShape(seq_length=S, num_layers=1, hidden_size=32, num_attention_heads=8, num_query_groups=4,
                           ffn_hidden_size=64, vocab_size=64),
    "mha-learned-abs": ModelShape(seq_length=S, num_layers=1, hidden_size=32, num_attention_heads=4,
                                  ffn_hidden_size=64, vocab_size=64, position_embedding_type="learned_absolute"),
}
# documents crossing chunks and ranks, shorter than a chunk, longer than a rank's share; the last
# document of each sample is cut (no EOD: it goes on in the next sequence)
LAYOUTS = [[5, 1, 2, 8], [11, 3, 2]]
# The learned position embedding's gradient: where three or more documents share a position, the
# packed batch's one embedding backward and the documents' separate ones differ by ~3e-8 relative
# (Megatron's native GPTModel packed and TSP agree to 0.0; a wrong position would be O(1)).
POSITIONS, POSITION_TOL = "embedding.position_embeddings.weight", 1e-6


def _batch(shape, seed, layouts):
    g = torch.Generator().manual_seed(seed)
    eod = shape.vocab_size - 1
    tokens = torch.randint(0, eod, (len(layouts), S), generator=g)
    for i, lengths in enumerate(layouts):
        for end in torch.tensor(lengths).cumsum(0)[:-1].tolist():
            tokens[i, end - 1] = eod
    docs = document_ids(tokens, eod)
    w = torch.randn(len(layouts), S, shape.vocab_size, dtype=torch.float64, generator=g)
    return tokens, docs, document_positions(docs), w


def _init(kind, size):
    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    if kind == "tsp":
        return init_tsp(size)
    pgs = megatron_tsp.initialize_native_model_parallel(tensor_model_parallel_size=size if kind == "tp_sp" else 1,
                                                        context_parallel_size=size if kind == "cp" else 1)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed(1234)
    return pgs


def _outputs_and_grads(model, per_token, kind):
    """Per-token outputs [b, S] (natural order, every rank) and the full parameter gradients."""
    tp, cp = mpu.get_tensor_model_parallel_group(), mpu.get_context_parallel_group()
    per_token = per_token.detach().contiguous()
    if tp.size() > 1:
        dist.all_reduce(per_token, group=tp)  # vocabulary shards
    if kind == "cp" and cp.size() > 1:
        pieces = [torch.empty_like(per_token) for _ in range(cp.size())]
        dist.all_gather(pieces, per_token, group=cp)
        per_token = from_zigzag(torch.cat(pieces, dim=1), cp.size(), dim=1)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=cp)
    if model.config.sequence_parallel:
        sum_sequence_parallel_grads(model, tp)
    return per_token, {n: gather_full(p.grad, p, tp) for n, p in model.named_parameters()}


def packed(kind, size, shape, seed, layouts, masked=True, tsp_options=None):
    """The packed batch through `kind` (tsp, tp_sp, cp) at `size`: a fixed random linear function
    of the logits per token (float64: Megatron's cross entropy would cast to float32)."""
    pgs = _init(kind, size)
    model = build_gpt(shape, layout="tsp" if kind == "tsp" else "tp_sp", dtype=torch.float64, seed=seed,
                      core_attention="sdpa", pg_collection=pgs,
                      **({} if tsp_options is None else {"tsp_options": tsp_options}))
    tokens, docs, pos, w = _batch(shape, seed, layouts)
    cp = mpu.get_context_parallel_group()
    local = (lambda t: cp_slice(t, cp)) if kind == "cp" else (lambda t: t)
    logits = model(local(tokens), local(pos), docs if masked else None)  # [b, s, V/tp]
    v, r = logits.shape[-1], mpu.get_tensor_model_parallel_group().rank()
    per_token = (logits * local(w)[..., r * v:(r + 1) * v]).sum(-1)
    per_token.sum().backward()
    return _outputs_and_grads(model, per_token, kind)


def documents_alone(shape, seed, layouts):
    """Megatron's GPTModel (one rank) on each document alone, positions from 0."""
    model = build_gpt(shape, layout="tp_sp", dtype=torch.float64, seed=seed, core_attention="sdpa",
                      pg_collection=_init("tsp", 1))
    tokens, _, _, w = _batch(shape, seed, layouts)
    out = torch.zeros(len(layouts), S, dtype=torch.float64)
    total = 0
    for i, lengths in enumerate(layouts):
        a = 0
        for n in lengths:
            logits = model(tokens[i:i + 1, a:a + n], torch.arange(n).unsqueeze(0), None)
            per_token = (logits * w[i:i + 1, a:a + n]).sum(-1)
            total = total + per_token.sum()
            out[i, a:a + n] = per_token.detach()[0]
            a += n
    total.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_match(got, ref, seed, tol=TOL):
    (out, grads), (ref_out, ref_grads) = got, ref
    errs = {"per-token": rel_err(out, ref_out)}
    errs.update({n: rel_err(grads[n], ref_grads[n]) for n in ref_grads})
    bad = {k: v for k, v in errs.items() if not v <= (POSITION_TOL if k == POSITIONS else tol)}
    assert not bad, f"relative errors above {tol} (seed {seed}): {bad}"


@pytest.mark.distributed
@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("name", list(SHAPES))
def test_tsp_packed_model_equals_documents_alone(world, D, name):
    skip_unless_divides(world, D)
    if name != "gqa-rope" and D == 1 and world > 1:
        pytest.skip("learned absolute positions: D = 1 runs at world 1")
    shape, seed = SHAPES[name], fresh_seed()
    _assert_match(packed("tsp", D, shape, seed, LAYOUTS), documents_alone(shape, seed, LAYOUTS), seed)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["tp_sp", "cp"])
def test_baselines_packed_model_equals_documents_alone(world, kind):
    if world < 2:
        pytest.skip("needs 2 ranks")
    if world > 2:
        pytest.skip("runs at world 2; at a larger world it would repeat it")
    shape, seed = SHAPES["gqa-rope"], fresh_seed()
    # Megatron's GPTModel rotates by absolute positions (it ignores position_ids for RoPE): the same
    # relative angles from a float32 table at other rows differ by ~3e-10 relative
    _assert_match(packed(kind, 2, shape, seed, LAYOUTS), documents_alone(shape, seed, LAYOUTS), seed, tol=1e-8)


# --- the driver's data: Megatron's own masks ------------------------------------------------

def test_document_ids_and_positions_match_megatrons_masks():
    """The document ids micro_batches derives from EOD tokens give exactly the attention mask
    and positions of Megatron's GPTDataset (reset_attention_mask, reset_position_ids)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    eod = 9
    tokens = torch.tensor([[1, 2, eod, 3, eod, eod, 4, 5, 6, eod, 7, 8], [eod, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, eod]])
    docs = document_ids(tokens, eod)
    for i in range(tokens.shape[0]):
        mask, loss_mask, pos = _get_ltor_masks_and_position_ids(tokens[i], eod, True, True, True, True)
        assert torch.equal(full_mask(docs[i:i + 1])[0, 0], mask[0])
        assert torch.equal(document_positions(docs[i:i + 1])[0], pos)
        assert torch.equal(loss_mask, (tokens[i] != eod).float())


# --- bad input: one clear error naming the key, before any collective ----------------------

@pytest.mark.parametrize("overrides,match", [
    (["data.eod_id=128"], r"data.eod_id = 128 is outside the vocabulary \[0, model.vocab_size = 128\)"),
    (["data.eod_id=-1"], r"data.eod_id = -1 is outside the vocabulary"),
    (["data.mock_document_length=-2"], r"data.mock_document_length = -2 must be >= 0"),
    (["data.mock_document_length=8", "data.path=/corpus"], r"data.mock_document_length is for mock data only"),
    (["data.mock_document_length=8", "data.eod_id=3"], r"data.eod_id = 3 would find no boundaries"),
    (["data.reset_attention_mask=true", "parallel.layout=tp", "parallel.baseline_attention=local"],
     r"data.reset_attention_mask = true on parallel.layout = tp needs parallel.baseline_attention = sdpa"),
    (["data.reset_attention_mask=true", "parallel.tsp_attention_backend=cudnn"],
     r"data.reset_attention_mask = true cannot run on parallel.tsp_attention_backend = cudnn"),
    (["data.reset_position_ids=true", "parallel.layout=tp_sp"],
     r"data.reset_position_ids = true with RoPE on parallel.layout = tp_sp"),
])
def test_recipe_errors_name_the_key(overrides, match):
    from megatron_tsp.training.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=match):
        load_recipe(None, overrides, devices=False)


def test_recipe_accepts_the_packed_keys():
    from megatron_tsp.training.recipe import load_recipe

    for layout in (["parallel.layout=tsp"], ["parallel.layout=tsp", "parallel.tsp_attention_kv=streamed"],
                   ["parallel.layout=tp_sp"], ["parallel.layout=dp", "parallel.context_size=2"]):
        load_recipe(None, layout + ["data.reset_attention_mask=true", "data.reset_position_ids=true",
                                    "data.eod_mask_loss=true", "data.mock_document_length=24"], devices=False)


def test_generate_refuses_document_masks():
    from argparse import Namespace

    from megatron_tsp.inference.cli import _recipe_for
    from megatron_tsp.training.recipe import RecipeError

    for key in ("reset_attention_mask", "reset_position_ids"):
        with pytest.raises(RecipeError, match=rf"data.{key} = true: generate runs each prompt as one document"):
            _recipe_for(Namespace(recipe=None, overrides=[f"data.{key}=true"]), 1)


def test_masked_kernel_refuses_flash_and_cudnn():
    from megatron_tsp.config import TSPConfigError
    from megatron_tsp.tsp.kernels import chunk_forward, resolve_backend

    q = torch.zeros(1, 1, 2, 4)
    assert resolve_backend("auto", q, masked=True) == "math"
    for backend in ("flash", "cudnn"):
        with pytest.raises(TSPConfigError,
                           match=rf"parallel.tsp_attention_backend = {backend} cannot apply a document mask"):
            chunk_forward(q, q, q, 1.0, backend, mask=torch.zeros(1, 1, 2, 2, dtype=torch.bool))


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["tsp", "tsp-streamed", "tp_sp", "cp"])
def test_decreasing_document_ids_fail_before_any_collective(world, kind, monkeypatch):
    from megatron_tsp.config import TSPConfigError, TSPOptions

    options = TSPOptions(tsp_attention_kv="streamed") if kind == "tsp-streamed" else None
    kind = kind.split("-")[0]
    size = world if kind == "tsp" else 2
    if world % size:
        pytest.skip(f"needs a multiple of {size} ranks")
    shape = SHAPES["gqa-rope"]
    model = build_gpt(shape, layout="tsp" if kind == "tsp" else "tp_sp", dtype=torch.float64, core_attention="sdpa",
                      pg_collection=_init(kind, size), **({} if options is None else {"tsp_options": options}))
    tokens, docs, pos, _ = _batch(shape, 1, LAYOUTS)
    docs[0, 10] = 0  # a document id that goes back (3 -> 0)
    cp = mpu.get_context_parallel_group()
    local = (lambda t: cp_slice(t, cp)) if kind == "cp" else (lambda t: t)

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran before the error")

    for name in ("broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_gather",
                 "batch_isend_irecv"):
        monkeypatch.setattr(dist, name, forbidden)
    from megatron_tsp.tsp import comm

    monkeypatch.setattr(comm, "_all_gather_tensor", forbidden)
    with pytest.raises((TSPConfigError, ValueError), match=r"attention_mask \(document ids\) must be non-decreasing"):
        model(local(tokens), local(pos), docs)


@pytest.mark.slow
@pytest.mark.distributed
def test_driver_packed_runs_agree_across_layouts(world):
    """megatron-tsp train on packed mock documents (data.mock_document_length) with Megatron's
    three options: TSP (gathered and streamed K/V), TP + SP and CP see the same documents and give
    the same losses; without the document masks the losses differ (the data has boundaries)."""
    import os

    from megatron_tsp.training.loop import run
    from megatron_tsp.training.recipe import load_recipe

    if world != 2:
        pytest.skip("runs at world 2")
    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")
    common = ["train.steps=2", "train.micro_batch_size=1", "train.log_interval=100", "model.num_attention_heads=8",
              "model.num_query_groups=4", "data.mock_document_length=20", "data.reset_position_ids=true",
              "data.eod_mask_loss=true"]
    def losses(extra):
        return [(h["loss"], h["grad_norm"]) for h in run(load_recipe(tiny, common + extra))["history"]]

    ref = losses(["data.reset_attention_mask=true"])
    for extra in (["parallel.layout=tp_sp"], ["parallel.layout=dp", "parallel.context_size=2"],
                  ["parallel.tsp_attention_kv=streamed"]):
        got = losses(extra + ["data.reset_attention_mask=true"])
        assert torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0), f"{extra}: {got} vs TSP {ref}"
    unmasked = losses([])
    assert abs(unmasked[0][1] - ref[0][1]) > 1e-3 * ref[0][1]  # the first gradient norm


def test_bench_attention_probe_times_document_masks():
    """The bench's attention probe (kernel time per model FLOP) on packed documents: it runs the
    masked kernels and counts only the pairs inside documents."""
    from megatron_tsp.bench.worker import attention_probe
    from megatron_tsp.planner.flops import packed_pairs
    from megatron_tsp.training.recipe import load_recipe

    keys = ["parallel.size=1", "model.seq_length=64", "data.reset_attention_mask=true", "data.mock_document_length=24"]
    recipe = load_recipe(None, keys, devices=False)
    for kind in ("tsp", "sdpa"):
        probe = attention_probe(kind, recipe, 0, torch.device("cpu"), reps=1)
        assert probe["shape"]["pairs"] == packed_pairs(64, 24) and probe["seconds"] > 0
    plain = attention_probe("tsp", load_recipe(None, keys[:2], devices=False), 0, torch.device("cpu"), reps=1)
    assert plain["shape"]["pairs"] == packed_pairs(64, 0)


@pytest.mark.distributed
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_streamed_kv_packed_model_equals_documents_alone(world, recompute):
    """The streamed K/V schedule (parallel.tsp_attention_kv = streamed) under document masks, a
    whole model at D = world (tests/tsp/test_streamed_attention.py has the block at D = 1, 2, 4)."""
    from megatron_tsp.config import TSPOptions

    shape, seed = SHAPES["gqa-rope"], fresh_seed()
    options = TSPOptions(tsp_attention_kv="streamed", tsp_recompute=recompute)
    _assert_match(packed("tsp", world, shape, seed, LAYOUTS, tsp_options=options),
                  documents_alone(shape, seed, LAYOUTS), seed)
