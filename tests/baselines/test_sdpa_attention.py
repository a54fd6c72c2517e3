"""SDPACoreAttention vs Megatron's local DotProductAttention inside the same SelfAttention with
the same weights: output, input gradient and every weight gradient, float64 on CPU, at tp=1
(MHA, GQA, causal / padding / no mask) and at D in {2, 4} with native TP (+ sequence parallelism)."""

import copy

import pytest
import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_tsp.baselines.sdpa_attention import SDPACoreAttention, get_sdpa_layer_spec
from megatron_tsp.baselines.specs import get_sp_layer_spec
from tests.parity import fresh_seed
from tests.utils import device, init_tsp, rel_err, singleton_pgs, skip_unless_divides, tiny_config

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-10


def _check(errors, seed, tol=TOL):
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol} (seed {seed}): {bad}"


def _pair(cfg, pgs, mask_type, layer_number=1):
    """Megatron's SelfAttention with DotProductAttention and the same with SDPACoreAttention,
    holding the same weights."""
    ref_sub = get_sp_layer_spec(cfg).submodules.self_attention.submodules
    sdpa_sub = get_sdpa_layer_spec(cfg).submodules.self_attention.submodules
    assert ref_sub.core_attention is DotProductAttention and sdpa_sub.core_attention is SDPACoreAttention
    kw = dict(layer_number=layer_number, attn_mask_type=mask_type, pg_collection=pgs)
    ref, sdpa = SelfAttention(cfg, ref_sub, **kw), SelfAttention(cfg, sdpa_sub, **kw)
    dev, dtype = device(), cfg.params_dtype
    ref, sdpa = ref.to(dev, dtype), sdpa.to(dev, dtype)
    sdpa.load_state_dict(copy.deepcopy(ref.state_dict()), strict=True)
    assert isinstance(sdpa.core_attention, SDPACoreAttention)
    return ref, sdpa


def _padding_mask(b, S, dev):
    """Megatron's convention: True = masked out; [b, 1, S, S], no fully masked row."""
    mask = torch.rand(b, 1, S, S, device=dev) < 0.4
    mask[..., torch.arange(S), torch.arange(S)] = False
    return mask


def attention_parity(D, *, heads=4, groups=None, hidden=32, S=16, b=2, mask_type=AttnMaskType.causal,
                     rope=True, sp=None, corrupt_mask=False, layer_number=1, **cfg_kw):
    """Relative errors of SDPA vs DotProductAttention (the worst over ranks), and the seed.
    D=1: singleton groups; D>1: Megatron's TP group (sequence parallel unless sp=False),
    where each rank feeds its [S/D, b, h] slice when sequence parallel."""
    init_tsp(D)
    pgs = singleton_pgs() if D == 1 else ProcessGroupCollection.use_mpu_process_groups()
    seed = fresh_seed()
    torch.manual_seed(seed)
    cfg = tiny_config(D, heads=heads, groups=groups, hidden=hidden, sp=sp, **cfg_kw)
    ref, sdpa = _pair(cfg, pgs, mask_type, layer_number)
    dev, dtype = device(), cfg.params_dtype

    x = torch.randn(S, b, hidden, dtype=dtype, device=dev)
    g = torch.randn(S, b, hidden, dtype=dtype, device=dev)
    mask = _padding_mask(b, S, dev) if mask_type == AttnMaskType.padding else None
    extra = {}
    if rope:
        extra["rotary_pos_emb"] = RotaryEmbedding(kv_channels=hidden // heads, rotary_percent=1.0)(S).to(dev)
    if cfg.sequence_parallel:  # the layer's input is this rank's contiguous [S/D] slice
        r, s = pgs.tp.rank(), S // D
        x, g = x[r * s : (r + 1) * s], g[r * s : (r + 1) * s]

    outs, grads = [], []
    for module, m in ((ref, mask), (sdpa, ~mask if corrupt_mask else mask)):
        xi = x.clone().requires_grad_()
        out, out_bias = module(xi, m, **extra)
        ((out if out_bias is None else out + out_bias) * g).sum().backward()
        outs.append(out)
        grads.append(xi.grad)

    errors = {"output": rel_err(outs[1], outs[0]), "input_grad": rel_err(grads[1], grads[0])}
    ref_params = dict(ref.named_parameters())
    for name, p in sdpa.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        errors[name] = rel_err(p.grad, ref_params[name].grad)
    vals = torch.tensor(list(errors.values()), dtype=torch.float64, device=dev)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(errors, vals.tolist())), seed


@pytest.mark.parametrize("heads,groups", [(4, None), (8, 4)], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.padding, AttnMaskType.no_mask],
                         ids=["causal", "padding", "nomask"])
def test_sdpa_parity_tp1(heads, groups, mask_type):
    errors, seed = attention_parity(1, heads=heads, groups=groups, hidden=64 if groups else 32, S=16,
                                    mask_type=mask_type)
    _check(errors, seed)
    assert "linear_qkv.weight" in errors and "linear_proj.weight" in errors


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.padding], ids=["causal", "padding"])
def test_sdpa_parity_tp1_gqa_expanded(monkeypatch, mask_type):
    """The K/V-expanding path (taken on CUDA for float32) matches too."""
    import megatron_tsp.baselines.sdpa_attention as sdpa_attention

    monkeypatch.setattr(sdpa_attention, "native_gqa_ok", lambda q: False)
    errors, seed = attention_parity(1, heads=8, groups=2, hidden=64, mask_type=mask_type)
    _check(errors, seed)


def test_sdpa_parity_tp1_bias_no_rope():
    errors, seed = attention_parity(1, bias=True, rope=False, S=32)
    _check(errors, seed)
    assert "linear_qkv.bias" in errors


def test_sdpa_parity_query_key_layer_scaling():
    """apply_query_key_layer_scaling: DotProductAttention's effective scale is unchanged."""
    errors, seed = attention_parity(1, apply_query_key_layer_scaling=True, layer_number=3)
    _check(errors, seed)


def test_sdpa_dropout_off_in_eval():
    init_tsp(1)
    cfg = tiny_config(1)
    cfg.attention_dropout = 0.5
    core = SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=singleton_pgs())
    assert core.attention_dropout_p == 0.5
    q = torch.randn(8, 2, 4, 8, dtype=torch.float64, device=device())
    core.eval()
    assert torch.equal(core(q, q, q, None), core(q, q, q, None))
    core.train()
    assert not torch.allclose(core(q, q, q, None), core(q, q, q, None))


@pytest.mark.parametrize("D", [2, 4])
@pytest.mark.parametrize("heads,groups", [(4, None), (8, 4)], ids=["mha", "gqa"])
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "tp"])
def test_sdpa_parity_native_tp(world, D, heads, groups, sp):
    skip_unless_divides(world, D)
    errors, seed = attention_parity(D, heads=heads, groups=groups, hidden=64 if groups else 32, S=32, sp=sp)
    _check(errors, seed)


@pytest.mark.parametrize("D", [2, 4])
def test_sdpa_parity_native_tp_padding(world, D):
    skip_unless_divides(world, D)
    errors, seed = attention_parity(D, heads=8, groups=4, hidden=64, S=16, mask_type=AttnMaskType.padding)
    _check(errors, seed)


# --- test the test: the mask convention matters and is checked ------------------------------

def test_inverted_mask_is_caught():
    errors, _ = attention_parity(1, mask_type=AttnMaskType.padding, corrupt_mask=True)
    assert errors["output"] > 1e-3 and errors["linear_qkv.weight"] > 1e-3


# --- refusals ----------------------------------------------------------------------------------

def _core(cfg, pgs=None):
    return SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs or singleton_pgs())


def test_refuses_context_parallel():
    init_tsp(1)
    cfg = copy.deepcopy(tiny_config(1))
    cfg.context_parallel_size = 2
    with pytest.raises(ValueError, match="context parallel"):
        _core(cfg)


def test_refuses_fewer_groups_than_tp(world):
    if world < 2:
        pytest.skip("needs a TP group of 2 or more")
    init_tsp(world)
    cfg = copy.deepcopy(tiny_config(world, heads=8, groups=world))
    cfg.num_query_groups = 1
    with pytest.raises(ValueError, match="num_query_groups"):
        _core(cfg, ProcessGroupCollection.use_mpu_process_groups())


def test_refuses_bias_and_packed_sequences():
    init_tsp(1)
    core = _core(tiny_config(1))
    q = torch.randn(4, 1, 4, 8, dtype=torch.float64, device=device())
    with pytest.raises(ValueError, match="attention_bias"):
        core(q, q, q, None, attention_bias=torch.zeros(1, 4, 4, 4, dtype=q.dtype))
    with pytest.raises(ValueError, match="packed"):
        core(q, q, q, None, packed_seq_params=object())
