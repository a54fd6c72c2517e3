"""TSP attention and ring MLP vs Megatron's native modules with the same full weights:
output, input gradient and every weight gradient, float64, D in {1, 2, 4}."""

import pytest
import torch

from megatron_tsp.config import TSPOptions
from tests.parity import block_parity
from tests.utils import skip_unless_divides

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-10


def _check(errors, seed, tol=TOL):
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol} (seed {seed}): {bad}"


RECOMPUTE = [TSPOptions(tsp_recompute="none"), TSPOptions(tsp_recompute="full")]


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("groups", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("options", RECOMPUTE, ids=["save", "recompute"])
def test_attention_parity(world, D, groups, bias, options):
    skip_unless_divides(world, D)
    if groups is not None and groups % D:
        groups = D  # GQA with one KV group per shard at D=4
    errors, seed = block_parity("attention", D, groups=groups, bias=bias, rope=True, heads=8 if groups else 4,
                                options=options)
    _check(errors, seed)
    assert "linear_qkv.weight" in errors and "linear_proj.weight" in errors
    assert ("linear_qkv.bias" in errors) == bias


@pytest.mark.parametrize("D", [2, 4])
def test_attention_parity_without_rope(world, D):
    skip_unless_divides(world, D)
    errors, seed = block_parity("attention", D, rope=False)
    _check(errors, seed)


@pytest.mark.parametrize("D", [2, 4])
@pytest.mark.parametrize("options", [TSPOptions(tsp_attention_backend="math_split"),
                                     TSPOptions(tsp_attention_backend="math_split", tsp_recompute="full")],
                         ids=["save", "recompute"])
def test_attention_parity_split_kernel(world, D, options):
    """The prefix + square-causal split with log-sum-exp merge (the cuDNN path) on CPU."""
    skip_unless_divides(world, D)
    errors, seed = block_parity("attention", D, groups=D, heads=8, options=options)
    _check(errors, seed)


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("options", RECOMPUTE + [TSPOptions(tsp_mlp_exchange="broadcast"),
                                                 TSPOptions(tsp_mlp_exchange="broadcast", tsp_recompute="full"),
                                                 TSPOptions(tsp_mlp_exchange="tokens"),
                                                 TSPOptions(tsp_mlp_exchange="auto")],
                         ids=["save", "recompute", "broadcast-save", "broadcast-recompute", "tokens", "auto"])
def test_mlp_parity(world, D, gated, bias, options):
    skip_unless_divides(world, D)
    errors, seed = block_parity("mlp", D, gated=gated, bias=bias, options=options)
    _check(errors, seed)
    assert ("linear_fc1.bias" in errors) == bias


def test_auto_mlp_exchange_moves_tokens_below_the_threshold(world, monkeypatch):
    """`auto` picks Megatron's sequence-parallel MLP below AUTO_TOKENS_BELOW local tokens and the
    ring above (here the threshold is moved around the test's token count); compute-only keeps
    to the ring."""
    import megatron_tsp.config as config
    import megatron_tsp.tsp.mlp as mlp
    from megatron_tsp.tsp.comm import ComputeOnlyGroup

    D = world
    if D < 2:
        pytest.skip("needs D >= 2")
    module = mlp.TSPMLP.__new__(mlp.TSPMLP)
    torch.nn.Module.__init__(module)
    x = torch.zeros(16, 2, 8)  # 32 local tokens
    for threshold, options, want in ((33, TSPOptions(tsp_mlp_exchange="auto"), "tokens"),
                                     (32, TSPOptions(tsp_mlp_exchange="auto"), "ring"),
                                     (33, TSPOptions(tsp_mlp_exchange="auto", tsp_compute_only=True), "ring"),
                                     (10**9, TSPOptions(tsp_mlp_exchange="broadcast"), "broadcast")):
        monkeypatch.setattr(config, "AUTO_TOKENS_BELOW", threshold)
        module.tsp_options = options
        module.tsp_group = ComputeOnlyGroup(torch.distributed.group.WORLD)
        assert module.exchange(x) == want, (threshold, options)


# --- test the test: a broken schedule must fail the same comparison ------------------------

def test_broken_zigzag_inverse_is_caught(world, monkeypatch):
    D = world
    if D < 2:
        pytest.skip("needs D >= 2")
    import megatron_tsp.tsp.attention as attention

    monkeypatch.setattr(attention, "from_zigzag", lambda t, D, dim: t)  # K/V left in rank order
    errors, _ = block_parity("attention", D)
    assert errors["output"] > 1e-3 and errors["linear_qkv.weight"] > 1e-3


@pytest.mark.parametrize("kind,weights", [("attention", ("linear_qkv.weight", "linear_proj.weight")),
                                          ("mlp", ("linear_fc1.weight", "linear_fc2.weight"))])
def test_dropped_weight_gradient_reduction_is_caught(world, monkeypatch, kind, weights):
    D = world
    if D < 2:
        pytest.skip("needs D >= 2")
    from megatron_tsp.tsp import comm

    monkeypatch.setattr(comm, "reduce_to", lambda buf, dst, group, async_op=False: None)
    errors, _ = block_parity(kind, D, options=TSPOptions(tsp_mlp_exchange="broadcast"))
    assert errors["output"] <= TOL  # the forward is untouched ...
    assert all(errors[w] > 1e-3 for w in weights)  # ... the grads are not


def test_dropped_ring_gradient_hop_is_caught(world, monkeypatch):
    D = world
    if D < 2:
        pytest.skip("needs D >= 2")
    import megatron_tsp.tsp.mlp as mlp

    real = mlp.comm.ring_shift
    calls = {"n": 0}

    def lossy_ring_shift(send, recv, group):
        calls["n"] += 1
        if torch.is_grad_enabled() is False and calls["n"] > D - 1:  # backward: zero one gradient hop
            send = torch.zeros_like(send)
        return real(send, recv, group)

    monkeypatch.setattr(mlp.comm, "ring_shift", lossy_ring_shift)
    errors, _ = block_parity("mlp", D, options=TSPOptions(tsp_mlp_exchange="ring"))
    assert errors["output"] <= TOL
    assert errors["linear_fc1.weight"] > 1e-3


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_compute_only_mode_skips_every_collective(world, kind, monkeypatch):
    """The benchmark's compute-only mode runs forward and backward without one collective
    (any call would raise) and yields finite outputs and gradients."""
    import torch.distributed as dist

    from megatron_tsp.tsp import comm

    D = world
    if D < 2:
        pytest.skip("needs D >= 2")
    real = block_parity(kind, D)[0]
    assert real["output"] <= TOL

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran in compute-only mode")

    for name in ("broadcast", "reduce", "batch_isend_irecv", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, forbidden)
    monkeypatch.setattr(comm, "_all_gather_tensor", forbidden)
    monkeypatch.setattr(comm, "_reduce_scatter_tensor", forbidden)
    monkeypatch.setattr("tests.parity.sum_sequence_parallel_grads", lambda *a: None)
    monkeypatch.setattr("tests.parity.gather_full", lambda g, p, group: g)
    monkeypatch.setattr("tests.parity.dist.all_reduce", lambda *a, **k: None)
    monkeypatch.setattr("tests.parity.fresh_seed", lambda: 7)
    monkeypatch.setattr("tests.parity.load_full_into", lambda *a: None)
    monkeypatch.setattr("tests.parity.rel_err", lambda a, b: float(torch.isfinite(a).all()))
    errors, _ = block_parity(kind, D, options=TSPOptions(tsp_compute_only=True))
    assert errors["output"] == 1.0 and errors["input_grad"] == 1.0  # ran, finite


def test_broken_rope_adjoint_is_caught(world, monkeypatch):
    """RoPE's backward must rotate by minus the angles: one that rotates forward again leaves the
    output exact and breaks the gradients."""
    from megatron_tsp.tsp.rope import Rotary

    D = world
    real = Rotary.apply_into
    monkeypatch.setattr(Rotary, "apply_into", lambda self, out, t, inverse=False: real(self, out, t))
    errors, _ = block_parity("attention", D, rope=True)
    assert errors["output"] <= TOL
    assert errors["linear_qkv.weight"] > 1e-3 and errors["input_grad"] > 1e-3


def test_overwritten_dkv_of_the_shorter_prefix_is_caught(world, monkeypatch):
    """The chunk with the shorter causal prefix must add its dK,dV to the other chunk's, not
    overwrite them (attend_backward's accumulate)."""
    from megatron_tsp.tsp import kernels

    D = world
    monkeypatch.setattr(kernels, "_write", lambda dst, src, accumulate: dst.copy_(src))
    errors, _ = block_parity("attention", D)
    assert errors["output"] <= TOL
    assert errors["linear_qkv.weight"] > 1e-3
