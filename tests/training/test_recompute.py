"""Layer recompute (Megatron's `recompute_granularity='full'`, uniform / block, N layers) around
TSP layers, with and without activation offload, in both in-layer modes: loss and every gradient
equal the non-recomputed TSP model's and the unsharded model's (float64); the TSP exchanges run
in the same order on every rank; DDP's hooks still fire inside the checkpoint's backward; the
driver trains the same with and without recompute for TSP and the baselines (selective recompute
included); bad recompute keys are one RecipeError naming the key."""

import os

import pytest
import torch
import torch.distributed as dist

import megatron_tsp.tsp.offload as offload
from megatron_tsp.config import TSPConfigError, TSPOptions
from megatron_tsp.training.recipe import RecipeError, load_recipe
from megatron_tsp.training.loop import run
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import mock_batch
from tests.parity import fresh_seed, model_loss_and_grads, worst_error
from tests.training.train_reference import run_steps
from tests.utils import init_tsp

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-10
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SHAPES = {"mha": ModelShape(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16),
          "gqa": ModelShape(num_layers=4, hidden_size=32, num_attention_heads=8, num_query_groups=4,
                            ffn_hidden_size=64, seq_length=16)}
# (method, N) on 4 layers: uniform chunks of 1 and 2 layers; block recompute of the first 1..3.
METHODS = [("uniform", 1), ("uniform", 2), ("block", 1), ("block", 2), ("block", 3)]


def recompute_kw(method, n):
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": n}


def loss_and_grads(layout, D, shape, seed, tsp_recompute="none", offload_activations=False, hidden_dropout=0.0,
                   **config_kw):
    """The loss and every full parameter gradient of a float64 model on D ranks. The loss is a
    fixed random linear function of the logits, in float64: Megatron's vocab-parallel cross
    entropy casts the logits to float32, which would hide everything below 1e-7."""
    pgs = init_tsp(D)
    options = TSPOptions(tsp_recompute=tsp_recompute) if layout == "tsp" else None
    model = build_gpt(shape, layout=layout, dtype=torch.float64, seed=seed, tsp_options=options,
                      offload_activations=offload_activations, pg_collection=pgs, **config_kw)
    model.double()  # TSPNorm's weights too (float32 whatever params_dtype says, until lean norms)
    for layer in model.decoder.layers:
        layer.hidden_dropout = hidden_dropout
    return model_loss_and_grads(model, shape, seed)


# Every option at least once, for CI at every world size; the whole product is `slow`.
COVERING = [("none", ("uniform", 1), False), ("full", ("uniform", 2), True), ("none", ("block", 2), True),
            ("full", ("block", 3), False)]


@pytest.mark.parametrize("grid", ["covering", pytest.param("product", marks=pytest.mark.slow)])
@pytest.mark.parametrize("heads", list(SHAPES))
def test_layer_recompute_matches_tsp_and_unsharded(world, heads, grid):
    """D = world size. (method, N) x offload x tsp_recompute against both references: every
    combination (`product`, slow), or each option at least once (`covering`)."""
    D, shape, seed = world, SHAPES[heads], fresh_seed()
    unsharded = loss_and_grads("tp_sp", 1, shape, seed)
    assert all(g.abs().sum() > 0 for g in unsharded[1].values())
    bad = {}
    for tsp_recompute in ("none", "full"):
        plain = loss_and_grads("tsp", D, shape, seed, tsp_recompute)
        assert worst_error(plain, unsharded) <= TOL, f"TSP without layer recompute (seed {seed})"
        combos = [(m, o) for m in METHODS for o in (False, True)] if grid == "product" else \
            [(m, o) for t, m, o in COVERING if t == tsp_recompute]
        for (method, n), offload_activations in combos:
            got = loss_and_grads("tsp", D, shape, seed, tsp_recompute, offload_activations, **recompute_kw(method, n))
            for what, ref in (("tsp", plain), ("unsharded", unsharded)):
                err = worst_error(got, ref)
                if not err <= TOL:
                    bad[(tsp_recompute, method, n, offload_activations, what)] = err
    assert not bad, f"D={D} {heads} (seed {seed}): (tsp_recompute, method, N, offload, reference) -> error {bad}"


def test_parity_catches_a_stale_offloaded_input(world, monkeypatch):
    """Test the test: an offload whose host copy is not the layer input (as if read before the
    copy completed) fails the parity check."""
    real = offload.LayerInputOffloader.offload

    def stale(self, t):
        handle = real(self, t)
        handle.host.mul_(0.5)
        return handle

    monkeypatch.setattr(offload.LayerInputOffloader, "offload", stale)
    shape, seed = SHAPES["mha"], fresh_seed()
    plain = loss_and_grads("tsp", world, shape, seed)
    got = loss_and_grads("tsp", world, shape, seed, "none", True, **recompute_kw("uniform", 1))
    assert worst_error(got, plain) > 1e-3


def test_dropout_masks_are_replayed_in_the_recomputation(world, monkeypatch):
    """The checkpoint restores the RNG states (CPU generator, "CUDA" generator and Megatron's
    tracker, all the CPU generator under the CPU shims) before recomputing, so hidden dropout
    draws the same masks again; a recomputation that does not restore them is caught."""
    from megatron.core.tensor_parallel import random as mrandom

    shape, seed = SHAPES["gqa"], fresh_seed()
    plain = loss_and_grads("tsp", world, shape, seed, hidden_dropout=0.3)
    assert worst_error(plain, loss_and_grads("tsp", world, shape, seed)) > 1e-3, "dropout did not act"
    for method, n in (("uniform", 2), ("block", 1)):
        got = loss_and_grads("tsp", world, shape, seed, hidden_dropout=0.3, **recompute_kw(method, n))
        assert worst_error(got, plain) <= TOL, (method, n)
    monkeypatch.setattr(mrandom, "_set_all_rng_states", lambda *states: None)
    broken = loss_and_grads("tsp", world, shape, seed, hidden_dropout=0.3, **recompute_kw("uniform", 1))
    assert worst_error(broken, plain) > 1e-3


def test_selective_recompute_is_refused_with_tsp():
    pgs = init_tsp(1)
    with pytest.raises(TSPConfigError, match="selective"):
        build_gpt(SHAPES["mha"], layout="tsp", recompute_granularity="selective", pg_collection=pgs)
    with pytest.raises(TSPConfigError, match="parallel.offload_activations = true needs parallel.recompute = full"):
        build_gpt(SHAPES["mha"], layout="tsp", offload_activations=True, pg_collection=pgs)


def _logged_exchanges(monkeypatch, shape, seed, tsp_recompute, **config_kw):
    """Every TSP exchange (name, buffer shape) in the order this rank posts it, over one
    forward + backward."""
    import megatron_tsp.tsp.comm as comm

    log = []
    for name in ("broadcast_from", "reduce_to", "ring_shift", "all_gather_sequence_raw", "reduce_scatter_sequence_raw"):
        real = getattr(comm, name)

        def logged(t, *args, _real=real, _name=name, **kw):
            log.append((_name, tuple(t.shape)))
            return _real(t, *args, **kw)

        monkeypatch.setattr(comm, name, logged)
    pgs = init_tsp(dist.get_world_size())
    model = build_gpt(shape, layout="tsp", dtype=torch.float64, seed=seed,
                      tsp_options=TSPOptions(tsp_recompute=tsp_recompute, tsp_mlp_exchange="ring"), pg_collection=pgs,
                      **config_kw)
    tokens, labels, pos = mock_batch(0, 2, shape, seed=seed)
    model(tokens, pos, None, labels=labels).mean().backward()
    monkeypatch.undo()
    return log


@pytest.mark.parametrize("tsp_recompute", ["none", "full"])
def test_exchanges_rerun_in_the_same_order_on_every_rank(world, monkeypatch, tsp_recompute):
    """Inside the checkpoint's backward the TSP Functions re-run their exchanges: every rank posts
    the same sequence, which is the run without layer recompute plus one more forward of each
    recomputed layer."""
    if world == 1:
        pytest.skip("needs a TSP group of 2 or more")
    shape, seed = SHAPES["gqa"], fresh_seed()
    plain = _logged_exchanges(monkeypatch, shape, seed, tsp_recompute)
    per_layer_forward = None
    for method, n, recomputed in (("uniform", 1, 4), ("block", 3, 3)):
        got = _logged_exchanges(monkeypatch, shape, seed, tsp_recompute, **recompute_kw(method, n))
        logs = [None] * world
        dist.all_gather_object(logs, got)
        assert all(log == logs[0] for log in logs), f"{method} N={n}: the ranks post different exchanges"
        extra = len(got) - len(plain)
        assert extra > 0 and extra % recomputed == 0, (method, n, len(got), len(plain))
        per_layer_forward = per_layer_forward or extra // recomputed
        assert extra == recomputed * per_layer_forward, (method, n, extra, per_layer_forward)
    # One layer's forward posts D attention-shard broadcasts, D K/V gathers and D - 1 ring hops.
    assert per_layer_forward == world + world + (world - 1)


@pytest.mark.slow
def test_ddp_hooks_fire_inside_the_checkpoint_backward(world):
    """--overlap-grad-reduce with a bucket per parameter (grad-ready hooks fire inside the
    checkpoint's backward) and --overlap-param-gather (TSP runs the holders' forward pre-hooks,
    in the recomputation too): five steps equal the run without layer recompute."""
    if world < 2:
        pytest.skip("needs data parallelism: 2 or 4 processes")
    D = world // 2
    plain = run_steps(init_tsp(D), "tsp", distributed_optimizer=True, overlap=True, bucket_size=1)
    for kw, offload_activations in ((recompute_kw("uniform", 1), False), (recompute_kw("block", 1), True)):
        got = run_steps(init_tsp(D), "tsp", distributed_optimizer=True, overlap=True, bucket_size=1,
                        offload_activations=offload_activations, **kw)
        assert got == plain, (kw, offload_activations, got, plain)


# -- the driver -------------------------------------------------------------------------------

def losses(overrides):
    return [h["loss"] for h in run(load_recipe(TINY, ["train.log_interval=100"] + overrides))["history"]]


@pytest.mark.slow
def test_driver_tsp_five_steps_equal_with_layer_recompute(world):
    if world != 2:
        pytest.skip("tsp D=2 on 2 processes")
    common = ["parallel.size=2", "train.steps=5"]
    plain = losses(common)
    assert plain[-1] < plain[0]
    for extra in (["parallel.recompute=full"],
                  ["parallel.recompute=full", "parallel.recompute_method=block", "parallel.recompute_num_layers=1",
                   "parallel.offload_activations=true", "parallel.tsp_recompute=full"],
                  ["parallel.recompute=full", "parallel.recompute_num_layers=2", "parallel.offload_activations=true"]):
        assert losses(common + extra) == plain, extra


class _CoreAttentionCalls:
    """Counts forward calls of the baselines' core attention modules."""

    def __init__(self, monkeypatch):
        from megatron_tsp.baselines.context_parallel import ContextParallelAttention
        from megatron_tsp.baselines.sdpa_attention import SDPACoreAttention

        self.n = 0
        for cls in (SDPACoreAttention, ContextParallelAttention):
            real = cls.forward

            def counted(module, *args, _real=real, **kwargs):
                self.n += 1
                return _real(module, *args, **kwargs)

            monkeypatch.setattr(cls, "forward", counted)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp_sp", "cp", "tp_sp_cp"])
def test_driver_baselines_two_steps_equal_with_recompute(world, layout, monkeypatch):
    """tp_sp (SDPACoreAttention), CP and TP x CP (ContextParallelAttention): Megatron's selective
    recompute runs each layer's core attention once more in backward (it applies to our core
    attention modules), full recompute and offload too; the losses are those without recompute."""
    if world != 2 and layout != "tp_sp_cp":
        pytest.skip("2 processes")
    if layout == "tp_sp_cp" and world != 4:
        pytest.skip("TP2 x CP2 on 4 processes")
    base = {"tp_sp": ["parallel.layout=tp_sp", "parallel.size=2"],
            "cp": ["parallel.layout=dp", "parallel.context_size=2"],
            "tp_sp_cp": ["parallel.layout=tp_sp", "parallel.size=2", "parallel.context_size=2"]}[layout]
    base = base + ["train.steps=2"]
    calls = _CoreAttentionCalls(monkeypatch)
    plain = losses(base)
    per_run = calls.n
    assert per_run == 2 * 2 * 2  # 2 steps x 2 micro-batches x 2 layers
    calls.n = 0
    assert losses(base + ["parallel.recompute=selective"]) == plain
    assert calls.n == 2 * per_run, "selective recompute did not recompute the core attention"
    for extra in (["parallel.recompute=full"], ["parallel.recompute=full", "parallel.recompute_method=block",
                                                "parallel.recompute_num_layers=1", "parallel.offload_activations=true"]):
        assert losses(base + extra) == plain, extra


@pytest.mark.slow
def test_driver_fsdp_over_cp_two_steps_equal_with_full_recompute(world):
    if world != 2:
        pytest.skip("FSDP over CP=2 on 2 processes")
    base = ["parallel.layout=dp", "parallel.context_size=2", "parallel.fsdp=true", "train.steps=2"]
    plain = losses(base)
    for extra in (["parallel.recompute=full"], ["parallel.recompute=full", "parallel.offload_activations=true"]):
        assert losses(base + extra) == plain, extra


# -- bad recipes ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["parallel.recompute=partial"], r"parallel.recompute = 'partial' is not one of none, full, selective"),
    (["parallel.recompute=full", "parallel.recompute_method=blocks"], r"parallel.recompute_method = 'blocks' is not one of uniform, block"),
    (["parallel.recompute=selective"], r"parallel.recompute = selective .* is for the baselines"),
    (["parallel.recompute=full", "parallel.recompute_num_layers=3"], r"parallel.recompute_num_layers = 3 must be between 1 and the layers per pipeline stage, 2"),
    (["parallel.recompute=full", "parallel.recompute_num_layers=0"], r"parallel.recompute_num_layers = 0 must be between 1"),
    (["parallel.recompute=full", "parallel.recompute_method=block", "parallel.recompute_num_layers=3", "model.num_layers=4",
      "parallel.pipeline_size=2"], r"parallel.recompute_num_layers = 3 must be between 1 and the layers per pipeline stage, 2"),
    (["parallel.recompute=full", "parallel.recompute_num_layers=3", "model.num_layers=4"], r"parallel.recompute_num_layers = 3 must divide"),
    (["parallel.offload_activations=true"], r"parallel.offload_activations = true needs parallel.recompute = full"),
    (["parallel.layout=tp_sp", "parallel.recompute=selective", "parallel.offload_activations=true"],
     r"parallel.offload_activations = true needs parallel.recompute = full"),
    (["parallel.recompute_num_layers=1"], r"parallel.recompute_num_layers = 1 needs parallel.recompute = full"),
    (["parallel.recompute_method=block"], r"parallel.recompute_method = block needs parallel.recompute = full"),
])
def test_bad_recompute_keys_are_one_clear_error(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(TINY, overrides)


def test_recompute_keys_reach_the_transformer_config():
    full = load_recipe(TINY, ["parallel.recompute=full", "parallel.recompute_method=block"])
    assert full.recompute_config() == {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}
    assert load_recipe(TINY, ["parallel.recompute=full"]).recompute_config()["recompute_num_layers"] == 1
    assert load_recipe(TINY, ["parallel.layout=tp", "parallel.recompute=selective"]).recompute_config() == \
        {"recompute_granularity": "selective"}
    assert load_recipe(TINY).recompute_config() == {}
