"""Context-parallel baselines: Megatron's GPTModel with ContextParallelAttention at CP = 2, 4
and TP2 x CP2 (with and without sequence parallelism) against the unsharded model with the same
weights (float32): per-token loss and every parameter gradient; a broken K/V order is caught;
the gathered K/V are not kept for backward; bad layouts are clear errors."""

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.transformer.enums import AttnMaskType

import megatron_tsp
from megatron_tsp import TSPConfigError
from megatron_tsp.baselines import context_parallel
from megatron_tsp.baselines.context_parallel import ContextParallelAttention, cp_slice
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import mock_batch
from megatron_tsp.tsp.zigzag import from_zigzag
from tests.parity import fresh_seed
from tests.utils import gather_full, rel_err, singleton_group, sum_sequence_parallel_grads

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-5


def init_groups(tp=1, cp=1, seed=1234):
    """The baselines' groups at TP `tp` x CP `cp` (a ProcessGroupCollection)."""
    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    pgs = megatron_tsp.initialize_native_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed(seed)
    return pgs


def skip_unless_fits(world, tp, cp):
    if world % (tp * cp):
        pytest.skip(f"TP{tp} x CP{cp} does not fit {world} processes")


def _loss_and_grads(shape, seed, tp=1, cp=1, sp=None):
    """Per-token loss [b, S] in natural order and the full gradient of every parameter: the
    loss is the mean over all tokens of all CP ranks; gradients are summed over CP (what DDP
    does over the data x context group) and over TP for sequence-parallel norms."""
    pgs = init_groups(tp, cp)
    model = build_gpt(shape, layout="tp_sp", seed=seed, core_attention="sdpa", sequence_parallel=sp, pg_collection=pgs)
    tokens, labels, pos = (cp_slice(t, mpu.get_context_parallel_group()) for t in mock_batch(0, 2, shape, seed=seed))
    loss = model(tokens, pos, None, labels=labels)  # [b, S/CP], this CP rank's tokens
    (loss.sum() / (loss.shape[0] * shape.seq_length)).backward()
    cp_group, tp_group = mpu.get_context_parallel_group(), mpu.get_tensor_model_parallel_group()
    if cp > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=cp_group)
        pieces = [torch.empty_like(loss) for _ in range(cp)]
        dist.all_gather(pieces, loss.detach().contiguous(), group=cp_group)
        loss = from_zigzag(torch.cat(pieces, dim=1), cp, dim=1)
    if model.config.sequence_parallel:
        sum_sequence_parallel_grads(model, tp_group)
    grads = {n: gather_full(p.grad, p, tp_group) for n, p in model.named_parameters()}
    return loss.detach(), grads


def _assert_match(got, ref, seed):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= TOL, f"loss differs (seed {seed}): {rel_err(loss, ref_loss)}"
    assert grads.keys() == ref_grads.keys()
    bad = {n: rel_err(grads[n], ref_grads[n]) for n in grads if not rel_err(grads[n], ref_grads[n]) <= TOL}
    assert not bad, f"gradients differ (seed {seed}): {bad}"
    assert all(g.abs().sum() > 0 for g in ref_grads.values())


SHAPES = {
    "mha": ModelShape(seq_length=32),
    "gqa": ModelShape(seq_length=32, num_attention_heads=8, num_query_groups=4),
    "gqa-learned-abs": ModelShape(seq_length=32, num_attention_heads=8, num_query_groups=2,
                                  position_embedding_type="learned_absolute"),
}
LAYOUTS = {"cp2": (1, 2, None), "cp4": (1, 4, None), "tp2xcp2": (2, 2, False), "tp2xcp2-sp": (2, 2, True)}


@pytest.mark.parametrize("layout,name", [(layout, name) for layout in LAYOUTS for name in SHAPES
                                         if name != "gqa-learned-abs" or layout in ("cp2", "tp2xcp2-sp")])
def test_cp_loss_and_every_gradient_match_unsharded(world, layout, name):
    tp, cp, sp = LAYOUTS[layout]
    skip_unless_fits(world, tp, cp)
    shape, seed = SHAPES[name], fresh_seed()
    ref = _loss_and_grads(shape, seed)
    got = _loss_and_grads(shape, seed, tp, cp, sp)
    _assert_match(got, ref, seed)


def test_megatron_rope_slice_is_our_zigzag(world):
    """Megatron's RotaryEmbedding slices the table for the CP rank (get_pos_emb_on_this_cp_rank):
    the true positions of the tokens cp_slice hands that rank."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for cp in (2, 4):
        if world % cp:
            continue
        init_groups(1, cp)
        group, S = mpu.get_context_parallel_group(), 32
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, cp_group=group)
        full = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, cp_group=singleton_group())(S)
        positions = cp_slice(torch.arange(S).unsqueeze(0), group)[0]
        assert torch.equal(rope(S), full[positions])


def test_broken_kv_order_is_caught(world, monkeypatch):
    """Test the test: K/V left in the gathered (zigzag) order instead of natural order."""
    skip_unless_fits(world, 1, 2)
    shape, seed = SHAPES["gqa"], fresh_seed()
    ref = _loss_and_grads(shape, seed)
    monkeypatch.setattr(context_parallel, "from_zigzag", lambda t, size, dim: t)
    with pytest.raises(AssertionError, match="differs"):
        _assert_match(_loss_and_grads(shape, seed, 1, 2), ref, seed)


def test_gathered_kv_not_saved_for_backward(world, monkeypatch):
    """Like TE's all-gather CP, only the local K/V live from forward to backward; the gathered
    ones are gathered again in backward. The gradients are those of the saving variant."""
    skip_unless_fits(world, 1, 2)
    pgs = init_groups(1, 2)
    cfg = build_gpt(SHAPES["gqa"], layout="tp_sp", core_attention="sdpa", pg_collection=pgs).config
    core = ContextParallelAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs)
    gathered = []
    real_from_zigzag = context_parallel.from_zigzag
    monkeypatch.setattr(context_parallel, "from_zigzag",
                        lambda *a, **k: (lambda t: (gathered.append(weakref.ref(t)), t)[1])(real_from_zigzag(*a, **k)))
    s, b, hn = 16, 2, 8
    q = torch.randn(s, b, 4, hn, requires_grad=True)
    k, v = (torch.randn(s, b, 2, hn, requires_grad=True) for _ in range(2))
    grads = []
    for regather in (True, False):
        core.regather_kv_in_backward = regather
        gathered.clear()
        out = core(q, k, v, None)
        gc.collect()
        assert len(gathered) == 1 and (gathered[0]() is None) == regather
        grads.append(torch.autograd.grad(out, (q, k, v), torch.randn_like(out, generator=torch.Generator().manual_seed(0))))
        assert len(gathered) == 1 + regather  # gathered again in backward
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)


def test_bad_layouts_are_clear_errors(world):
    skip_unless_fits(world, 1, 2)
    pgs = init_groups(1, 2)
    with pytest.raises(TSPConfigError, match=r"model.seq_length = 34 must be divisible by 2 x parallel.context_size = 4"):
        build_gpt(ModelShape(seq_length=34), layout="tp_sp", core_attention="sdpa", pg_collection=pgs)
    with pytest.raises(TSPConfigError, match=r"cannot be combined with TSP"):
        build_gpt(ModelShape(seq_length=32), layout="tsp", pg_collection=pgs)
    with pytest.raises(TSPConfigError, match=r"core_attention = 'local' must be sdpa"):
        build_gpt(ModelShape(seq_length=32), layout="tp_sp", core_attention="local", pg_collection=pgs)


# --- training: DDP / distributed optimizer and FSDP over CP, five steps -------------------------

TRAIN_LAYOUTS = {  # name: (tp, cp, sequence parallel, fsdp, world sizes that run it)
    "cp2-distopt": (1, 2, False, False, (2,)),
    "cp2-fsdp": (1, 2, False, True, (2, 4)),  # at world 4: data 2 x context 2
    "cp4-distopt": (1, 4, False, False, (4,)),
    "cp4-fsdp": (1, 4, False, True, (4,)),
    "tp2xcp2-sp-distopt": (2, 2, True, False, (4,)),
    "tp2xcp2-fsdp": (2, 2, False, True, (4,)),
    "tp2xcp2-sp-fsdp": (2, 2, True, True, (4,)),
}


@pytest.mark.parametrize("name", list(TRAIN_LAYOUTS))
def test_five_steps_match_single_process(world, name):
    """Loss and grad norm of five Adam steps (clipping on) equal those of one process."""
    from tests.training.test_build import single_process_reference
    from tests.training.train_reference import run_steps

    tp, cp, sp, fsdp, worlds = TRAIN_LAYOUTS[name]
    if world not in worlds:
        pytest.skip(f"{name} runs at world sizes {worlds}")
    ref = single_process_reference()
    got = run_steps(init_groups(tp, cp), "tp_sp", distributed_optimizer=not fsdp, fsdp=fsdp, core_attention="sdpa",
                    sequence_parallel=sp)
    if fsdp:
        assert mpu.get_data_parallel_group(with_context_parallel=True).size() == world // tp
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(got[key], ref[key])):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{key} at step {step}: {name} {a} vs single process {b}"


# --- the driver: megatron-tsp train with parallel.context_size / parallel.fsdp --------------------

DRIVER_COMMON = ["train.steps=3", "train.micro_batch_size=1", "train.log_interval=100", "model.num_attention_heads=8", "model.num_query_groups=4"]
DRIVER_RUNS = {
    2: {"cp2": ["parallel.layout=dp", "parallel.context_size=2"],
        "cp2-fsdp": ["parallel.layout=dp", "parallel.context_size=2", "parallel.fsdp=true"]},
    4: {"tp2xcp2-sp": ["parallel.layout=tp_sp", "parallel.size=2", "parallel.context_size=2", "train.distributed_optimizer=true"],
        "cp4-fsdp": ["parallel.layout=dp", "parallel.context_size=4", "parallel.fsdp=true"]},
}


def test_driver_context_parallel_matches_data_parallel(world):
    """The driver's CP data slice, loss reduction over CP and gradient reduction over data x
    context: the losses of plain data parallelism on the same processes (same initial weights,
    same global batches)."""
    import os

    from megatron_tsp.training.recipe import load_recipe
    from megatron_tsp.training.loop import run

    if world not in DRIVER_RUNS:
        pytest.skip("runs at world sizes 2 and 4")
    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")
    history = lambda extra: [(h["loss"], h["grad_norm"]) for h in run(load_recipe(tiny, DRIVER_COMMON + extra))["history"]]  # noqa: E731
    ref = history(["parallel.layout=dp"])
    assert ref[-1][0] < ref[0][0]
    for name, extra in DRIVER_RUNS[world].items():
        got = history(extra)
        assert mpu.get_context_parallel_world_size() == int(name.split("cp")[1][0])
        for step, (a, b) in enumerate(zip(got, ref)):  # (loss, grad norm)
            assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0), f"{name} step {step}: {got} vs data parallel {ref}"


def test_fsdp_shards_every_parameter_over_data_and_context(world):
    """ZeRO-3: every parameter (hence its gradient and Adam state) is a DTensor sharded over
    all data x context ranks."""
    from torch.distributed.tensor import DTensor

    from megatron_tsp.training.build import wrap_ddp_and_optimizer

    skip_unless_fits(world, 1, 2)
    pgs = init_groups(1, 2)
    model = build_gpt(SHAPES["gqa"], layout="tp_sp", core_attention="sdpa", pg_collection=pgs)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ddp, _ = wrap_ddp_and_optimizer(model, use_distributed_optimizer=False, fsdp=True, pg_collection=pgs)
    params = dict(ddp.module.named_parameters())
    assert params.keys() == shapes.keys()
    for name, p in params.items():
        assert isinstance(p, DTensor) and p.device_mesh.size() == world, name
        assert tuple(p.shape) == shapes[name] and p.to_local().shape[0] <= -(-p.shape[0] // world), name


def test_fsdp_wraps_a_bfloat16_model_with_fp32_norm_weights(world):
    """FSDP2 refuses mixed parameter dtypes (seen on the GPUs). Every parameter of a bf16 model
    is bf16 (TSPNorm follows params_dtype); norm weights made fp32 by hand, the wrapper casts
    them to the model's dtype: one bf16 step runs and every gradient is finite."""
    from megatron_tsp.training.build import wrap_ddp_and_optimizer

    skip_unless_fits(world, 1, 2)
    pgs = init_groups(1, 2)
    shape = SHAPES["gqa"]
    model = build_gpt(shape, layout="tp_sp", core_attention="sdpa", dtype=torch.bfloat16, pg_collection=pgs)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, p in model.named_parameters():
        if "layernorm" in name:
            p.data = p.data.float()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}  # the case at hand
    ddp, _ = wrap_ddp_and_optimizer(model, use_distributed_optimizer=False, fsdp=True, pg_collection=pgs)
    assert {p.dtype for p in ddp.module.parameters()} == {torch.bfloat16}
    tokens, labels, pos = (cp_slice(t, mpu.get_context_parallel_group()) for t in mock_batch(0, 2, shape, seed=3))
    ddp(tokens, pos, None, labels=labels).float().mean().backward()
    for name, p in ddp.module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.full_tensor().float()).all(), name
