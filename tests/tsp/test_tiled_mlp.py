"""The token-tiled MLP (parallel.mlp_chunk_tokens): TSP's ring / broadcast / tokens exchanges and
the baselines' Megatron MLP on token chunks give the unsharded model's output, input gradient and
every weight gradient (float64, D = 1, 2, 4; chunk sizes that divide the local tokens, that do not,
and one chunk of everything); whole models (MHA and GQA) the same loss and every gradient as the
unsharded model and as untiled; the driver trains the same with DDP's grad-ready hooks firing once
per parameter; broken variants (a chunk's weight gradient accumulated twice, chunks overwriting
each other's) are caught; and the saved tensors and the backward's peak follow the chunk, not the
local tokens."""

import pytest
import torch
from megatron.core import parallel_state as mpu

from megatron_tsp.config import TSPOptions
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.parity import block_parity, fresh_seed, model_loss_and_grads, worst_error
from tests.utils import init_tsp, skip_unless_divides

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-12  # float64; the chunked sums differ from one GEMM's only in rounding order
# block_parity: S = 16, b = 2, so D = 1, 2, 4 hold 32, 16, 8 tokens (16, 8, 4 positions of 2 sequences):
# 4 divides every count (rows and, as 2 positions, positions); 6 (3 positions) divides none; 1000: one chunk
CHUNKS = [4, 6, 1000]


def _check(errors, seed, tol=TOL):
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol} (seed {seed}): {bad}"


EXCHANGES = {"ring": dict(tsp_mlp_exchange="ring"),
             "ring-recompute": dict(tsp_mlp_exchange="ring", tsp_recompute="full"),
             "broadcast": dict(tsp_mlp_exchange="broadcast"), "tokens": dict(tsp_mlp_exchange="tokens")}


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("exchange", list(EXCHANGES))
def test_tiled_tsp_mlp_matches_unsharded(world, D, chunk, exchange):
    skip_unless_divides(world, D)
    errors, seed = block_parity("mlp", D, options=TSPOptions(mlp_chunk_tokens=chunk, **EXCHANGES[exchange]))
    _check(errors, seed)


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("exchange", ["ring", "tokens"])
def test_tiled_tsp_mlp_gelu_with_biases(world, D, exchange):
    skip_unless_divides(world, D)
    errors, seed = block_parity("mlp", D, gated=False, bias=True,
                                options=TSPOptions(mlp_chunk_tokens=6, **EXCHANGES[exchange]))
    _check(errors, seed)
    assert "linear_fc1.bias" in errors and "linear_fc2.bias" in errors


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)], ids=["swiglu", "gelu-bias"])
def test_tiled_megatron_mlp_matches_unsharded(world, D, chunk, gated, bias):
    """The baselines' MLP: Megatron's MLP at TP (+ SP for D > 1) on D ranks, on token chunks."""
    skip_unless_divides(world, D)
    errors, seed = block_parity("tiled_mlp", D, gated=gated, bias=bias, options=TSPOptions(mlp_chunk_tokens=chunk))
    _check(errors, seed)
    assert ("linear_fc1.bias" in errors) == bias


# --- test the test: broken tilings fail the same comparison ------------------------------------

def test_tsp_chunks_overwriting_the_weight_gradient_are_caught(world, monkeypatch):
    """Each chunk writes the shard's weight gradient instead of adding to it (only the last
    chunk's partial survives): the forward and dx are right, the weight gradients are not."""
    import megatron_tsp.tsp.mlp as mlp

    real = mlp.shard_backward
    monkeypatch.setattr(mlp, "shard_backward", lambda *a, accumulate=False: real(*a, accumulate=False))
    errors, _ = block_parity("mlp", world, options=TSPOptions(mlp_chunk_tokens=4, tsp_mlp_exchange="ring"))
    assert errors["output"] <= TOL and errors["input_grad"] <= TOL
    assert errors["linear_fc1.weight"] > 1e-3 and errors["linear_fc2.weight"] > 1e-3


def test_megatron_mlp_weight_gradient_of_a_chunk_counted_twice_is_caught(world, monkeypatch):
    """The last chunk listed twice: the forward writes it twice and dx is assigned twice (both
    still right), but its weight gradient is accumulated twice."""
    import megatron_tsp.tsp.tiled_mlp as tiled

    real = tiled.sequence_chunks
    monkeypatch.setattr(tiled, "sequence_chunks", lambda *a: real(*a) + real(*a)[-1:])
    errors, _ = block_parity("tiled_mlp", world, options=TSPOptions(mlp_chunk_tokens=4))
    assert errors["output"] <= TOL and errors["input_grad"] <= TOL
    assert errors["linear_fc1.weight"] > 1e-3 and errors["linear_fc2.weight"] > 1e-3


def test_tsp_dropped_chunk_is_caught(world, monkeypatch):
    import megatron_tsp.tsp.mlp as mlp

    real = mlp.token_chunks
    monkeypatch.setattr(mlp, "token_chunks", lambda *a: real(*a)[:-1] if a[1] else real(*a))
    errors, _ = block_parity("mlp", world, options=TSPOptions(mlp_chunk_tokens=4, tsp_mlp_exchange="broadcast"))
    assert errors["output"] > 1e-3 and errors["linear_fc1.weight"] > 1e-3


# --- whole models: loss and every gradient -----------------------------------------------------

SHAPES = {"mha": ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16),
          "gqa": ModelShape(num_layers=2, hidden_size=32, num_attention_heads=8, num_query_groups=4,
                            ffn_hidden_size=64, seq_length=16)}


def loss_and_grads(layout, D, shape, seed, chunk, **options):
    """The loss (a fixed random linear function of the logits, float64 throughout) and every full
    parameter gradient of a float64 model on D ranks (layout 'tp_sp': TP + SP for D > 1)."""
    model = build_gpt(shape, layout=layout, dtype=torch.float64, seed=seed, pg_collection=init_tsp(D),
                      tsp_options=TSPOptions(mlp_chunk_tokens=chunk, **options))
    model.double()
    return model_loss_and_grads(model, shape, seed)


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("heads", list(SHAPES))
def test_tiled_models_match_unsharded_and_untiled(world, D, heads):
    """TSP (ring and tokens exchanges) and the TP(+SP) baseline on D ranks, chunk 6 (dividing
    neither the local tokens nor positions): the unsharded untiled model's loss and gradients,
    and their own untiled runs'."""
    skip_unless_divides(world, D)
    shape, seed = SHAPES[heads], fresh_seed()
    unsharded = loss_and_grads("tp_sp", 1, shape, seed, 0)
    assert all(g.abs().sum() > 0 for g in unsharded[1].values())
    bad = {}
    for layout, options in (("tsp", dict(tsp_mlp_exchange="ring")), ("tsp", dict(tsp_mlp_exchange="tokens")),
                            ("tp_sp", {})):
        untiled = loss_and_grads(layout, D, shape, seed, 0, **options)
        tiled = loss_and_grads(layout, D, shape, seed, 6, **options)
        for what, ref in (("unsharded", unsharded), ("untiled", untiled)):
            err = worst_error(tiled, ref)
            if not err <= 1e-10:
                bad[(layout, options.get("mlp_exchange"), what)] = err
    assert not bad, f"D={D} {heads} (seed {seed}): {bad}"


# --- the driver: DDP's hooks, every baseline ----------------------------------------------------

def test_ddp_grad_ready_hooks_fire_once_per_parameter(world):
    """--overlap-grad-reduce with one bucket per parameter: Megatron DDP asserts 'Cannot set grad
    twice' if a parameter's grad-accumulator hook fires twice in a backward. The tiled MLP hands
    autograd each parameter's summed gradient once: TSP and the TP baseline (data parallel over
    the other ranks) train as untiled."""
    from tests.training.train_reference import run_steps

    if world < 2:
        pytest.skip("needs data parallelism")
    D = world // 2
    for layout in ("tsp", "tp_sp"):
        plain = run_steps(init_tsp(D), layout, distributed_optimizer=True, overlap=True, bucket_size=1)
        tiled = run_steps(init_tsp(D), layout, distributed_optimizer=True, overlap=True, bucket_size=1,
                          tsp_options=TSPOptions(mlp_chunk_tokens=5))
        assert tiled["loss"] == pytest.approx(plain["loss"], rel=1e-5), layout
        assert tiled["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4), layout


@pytest.mark.parametrize("layout", ["tsp", "tsp_ring", "tp_sp", "cp", "fsdp_cp"])
def test_driver_trains_the_same_tiled(world, layout):
    """build + train_step (Megatron's schedule, DDP or FSDP2, the optimizer) for 2 steps: the
    losses of parallel.mlp_chunk_tokens = 24 (not dividing the 64 local tokens of 2 x 64 / 2),
    with and without Megatron's layer recompute, equal untiled."""
    import os

    from megatron_tsp.training.loop import run
    from megatron_tsp.training.recipe import load_recipe

    if world != 2:
        pytest.skip("2 processes")
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "configs", "tiny.yaml")
    base = {"tsp": ["parallel.size=2"],  # 64 tokens per rank: auto runs the tokens exchange (Megatron's MLP)
            "tsp_ring": ["parallel.size=2", "parallel.tsp_mlp_exchange=ring"], "tp_sp": ["parallel.layout=tp_sp", "parallel.size=2"],
            "cp": ["parallel.layout=dp", "parallel.context_size=2"],
            "fsdp_cp": ["parallel.layout=dp", "parallel.context_size=2", "parallel.fsdp=true"]}[layout]
    base = base + ["train.steps=2", "train.log_interval=100"]

    def losses(extra):
        return [h["loss"] for h in run(load_recipe(tiny, base + extra))["history"]]

    plain = losses([])
    assert losses(["parallel.mlp_chunk_tokens=24"]) == pytest.approx(plain, rel=1e-6)
    # inside Megatron's layer recompute (the tiled forward runs again in the checkpoint's backward)
    assert losses(["parallel.mlp_chunk_tokens=24", "parallel.recompute=full"]) == pytest.approx(plain, rel=1e-6)


# --- memory: what the MLP keeps follows the chunk ------------------------------------------------

def _mlp_memory(kind, D, chunk, S, b=2, hidden=32, ffn=256):
    """(bytes of activations the MLP saves for backward, peak bytes the CPU allocator hands out
    during its backward above what is allocated when the backward starts) of one MLP (float64)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_tsp import compat
    from megatron_tsp.probe.meter import CpuMeter
    from megatron_tsp.tsp.mlp import TSPMLP
    from megatron_tsp.baselines.specs import get_sp_layer_spec
    from megatron_tsp.tsp.tiled_mlp import TiledMLP
    from tests.utils import tiny_config

    init_tsp(D)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    cfg = tiny_config(D, hidden=hidden, ffn=ffn)
    sub = compat.mlp_submodules(get_sp_layer_spec(tiny_config(1, hidden=hidden, ffn=ffn)).submodules.mlp)
    if kind == "tsp":
        mlp = TSPMLP(cfg, sub, tp_group=pgs.tp, tsp_options=TSPOptions(tsp_mlp_exchange="ring", mlp_chunk_tokens=chunk))
    else:
        mlp = TiledMLP(cfg, sub, ffn_hidden_size=ffn, tp_group=pgs.tp, mlp_chunk_tokens=chunk)
    mlp = mlp.double()
    x = torch.randn(S // D, b, hidden, dtype=torch.float64, requires_grad=True)
    params = {p.data_ptr() for p in mlp.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        out, _ = mlp(x)
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
            if t.data_ptr() not in params and t.data_ptr() != x.data_ptr() and t.numel() > 1}
    g = torch.randn_like(out)
    meter = CpuMeter()
    meter.start()
    meter.open_peak("backward")
    out.backward(g)
    meter.close_peak()
    meter.finish()
    return sum(kept.values()), meter.peak("backward")[0]


@pytest.mark.parametrize("kind", ["tsp", "megatron"])
def test_mlp_memory_follows_the_chunk_not_the_tokens(world, kind):
    """Tiled, the MLP saves nothing but its input, and the peak of its backward (the CPU
    allocator's own events) grows with the chunk, not with the local tokens: 4x the tokens at the
    same chunk adds only [s, h]-sized buffers (dx, the incoming gradient; Megatron's also the
    gathered sequence and its gradient, D local shares each), while the untiled backward grows
    with every [s, f/D] piece."""
    D = world
    tiled_small, tiled_large = (_mlp_memory(kind, D, 16, S) for S in (64 * D, 256 * D))
    untiled_small, untiled_large = (_mlp_memory(kind, D, 0, S) for S in (64 * D, 256 * D))
    assert tiled_small[0] == tiled_large[0] == 0, (tiled_small, tiled_large)  # only the input
    if kind == "tsp":
        assert untiled_large[0] > 0  # the fc1 output of every shard over all local tokens
    # the growth from 128 to 512 local tokens: [s, h] buffers only (h = 32 < f/D)
    tiled_growth, untiled_growth = tiled_large[1] - tiled_small[1], untiled_large[1] - untiled_small[1]
    per_token_h = 8 * 32  # float64 x hidden
    added = (256 - 64) * 2  # local tokens added
    # at most 6 local [s, h] buffers for TSP; Megatron's: the gathered input, its gradient and the
    # gathered incoming gradient (D shares each) and dx (torch 2.15's allocator peaks at 6.8 at D = 4)
    bound = 6 if kind == "tsp" else 3 * D + 1
    assert tiled_growth <= bound * per_token_h * added, (tiled_growth, untiled_growth)
    assert untiled_growth > 2 * tiled_growth, (tiled_growth, untiled_growth)



@pytest.mark.parametrize("D", [2, 4])
def test_tiled_shared_expert_of_an_moe_layer_matches_single_process(world, D, monkeypatch):
    """The TSP shared expert (a ring MLP) of MoE layers runs tiled too: the MoE model's loss,
    router losses and every gradient equal the single process's (tests/tsp/test_moe.py's check)."""
    import megatron_tsp.tsp.model as tsp_model
    from tests.tsp import test_moe

    skip_unless_divides(world, D)
    softmax = torch.softmax  # as test_moe's fixture: the router's softmax in float64 on both sides

    def softmax_keeping_float64(x, dim, dtype=None, **kw):
        if dtype is torch.float32 and x.dtype is torch.float64:
            dtype = torch.float64
        return softmax(x, dim, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "softmax", softmax_keeping_float64)
    # tiled on D ranks only: the single-process reference runs untiled
    monkeypatch.setattr(tsp_model, "TSPOptions", lambda: TSPOptions(
        mlp_chunk_tokens=6 if mpu.get_tensor_model_parallel_world_size() > 1 else 0, tsp_mlp_exchange="ring"))
    seed = fresh_seed()
    errors, worst, model = test_moe._check(test_moe.CASES["top2-shared-zloss"], D, D, seed)
    bad = {n: e for n, e in errors.items() if not e <= test_moe.TOL}
    assert not bad and worst <= test_moe.TOL, f"seed {seed}: {bad or worst}"
    shared = [m for m in model.modules() if type(m).__name__ == "TSPSharedExpertMLP"]
    assert shared and all(m.tsp_options.mlp_chunk_tokens == 6 for m in shared)
