"""Lean norms (megatron_tsp.tsp.norm, used without Transformer Engine): forward and every gradient
equal torch's LayerNorm / RMSNorm, and backward keeps only the input (the model's dtype, the
same storage) and per-token statistics (compute dtype) besides the parameters; broken variants
(a gradient term dropped, an fp32 input copy or the output saved) are caught."""

import copy

import pytest
import torch
from megatron.core.transformer import TransformerConfig

import megatron_tsp.tsp.norm as norm
from megatron_tsp.config import TSPConfigError
from megatron_tsp.tsp.norm import LayerNormFunction, LeanLayerNorm, LeanRMSNorm, RMSNormFunction, TSPNorm
from tests.utils import rel_err

S, B, H = 16, 2, 64
TOL = {torch.float64: 1e-12, torch.bfloat16: 1e-2}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KINDS = {"LayerNorm": (LeanLayerNorm, torch.nn.LayerNorm), "RMSNorm": (LeanRMSNorm, torch.nn.RMSNorm)}


def _run(module, x, grad_out):
    """Output, input and parameter gradients, and the tensors packed for backward."""
    x = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        out = module(x)
    out.backward(grad_out)
    grads = {"input": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    return out.detach(), grads, saved, x


def _pair(kind, dtype, device, eps=1e-5):
    """The lean norm and torch's, with the same random (not constant) weights."""
    lean_cls, torch_cls = KINDS[kind]
    lean = lean_cls(H, eps=eps, device=device, dtype=dtype)
    ref = torch_cls(H, eps=eps, device=device, dtype=dtype)
    with torch.no_grad():
        for p in lean.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.5 + 1.0)
    ref.load_state_dict(lean.state_dict())
    return lean, ref


def _inputs(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, H, generator=g, dtype=torch.float64) * 2 + 0.7  # a mean far from 0: LayerNorm's mean term matters
    dy = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    return x.to(device, dtype), dy.to(device, dtype)


def _errors(kind, dtype, device):
    """Relative errors of the lean norm against torch's (same dtype) and, for bf16, against
    torch's in float64 on the same bf16 values (torch's own bf16 composite rounds x_hat first)."""
    lean, ref = _pair(kind, dtype, device)
    x, dy = _inputs(dtype, device)
    out, grads, _, _ = _run(lean, x, dy)
    refs = [ref] if dtype == torch.float64 else [ref, copy.deepcopy(ref).to(torch.float64)]
    errors = {}
    for r in refs:
        r_out, r_grads, _, _ = _run(r, x.to(r.weight.dtype), dy.to(r.weight.dtype))
        errors[f"output vs {r.weight.dtype}"] = rel_err(out.to(torch.float64), r_out.to(torch.float64))
        for name in grads:
            errors[f"{name} grad vs {r.weight.dtype}"] = rel_err(grads[name].to(torch.float64), r_grads[name].to(torch.float64))
    return errors, out, grads


def _bad(errors, dtype):
    return {k: v for k, v in errors.items() if not v <= TOL[dtype]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_torch_norm(kind, dtype, device):
    errors, out, grads = _errors(kind, dtype, device)
    assert not _bad(errors, dtype), errors
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())


def _classify(saved, x, module):
    """Each saved tensor as 'input' (x itself: same dtype, shape and storage), 'param', 'stat'
    (one value per token, compute dtype) or 'other'."""
    params = {p.data_ptr(): p for p in module.parameters()}
    compute = torch.promote_types(x.dtype, torch.float32)
    kinds = []
    for t in saved:
        if t.data_ptr() in params and t.shape == params[t.data_ptr()].shape:
            kinds.append("param")
        elif t.shape == x.shape and t.dtype == x.dtype and t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            kinds.append("input")
        elif t.numel() == S * B and t.dtype == compute:
            kinds.append("stat")
        else:
            kinds.append(f"other {tuple(t.shape)} {t.dtype}")
    return sorted(kinds)


EXPECTED = {"LayerNorm": ["input", "param", "param", "stat", "stat"], "RMSNorm": ["input", "param", "stat"]}


def _saved(kind, dtype, device):
    lean, _ = _pair(kind, dtype, device)
    x, dy = _inputs(dtype, device)
    _, _, saved, x_leaf = _run(lean, x, dy)
    return _classify(saved, x_leaf, lean), saved, lean


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_saves_only_input_and_per_token_statistics(kind, dtype, device):
    kinds, saved, lean = _saved(kind, dtype, device)
    assert kinds == EXPECTED[kind]
    params = {p.data_ptr() for p in lean.parameters()}
    activation_bytes = sum(t.untyped_storage().nbytes() for t in saved if t.data_ptr() not in params)
    stats = EXPECTED[kind].count("stat")
    width = torch.promote_types(dtype, torch.float32).itemsize
    # bf16: 2h + 4 bytes per token (RMSNorm), 2h + 8 (LayerNorm); torch's composite keeps 8h + 4
    assert activation_bytes == S * B * (dtype.itemsize * H + width * stats)


def test_torch_norm_is_not_lean():
    """The check sees what the lean norms avoid: torch's RMSNorm on a bf16 CPU input saves fp32
    copies of it."""
    ref = torch.nn.RMSNorm(H, eps=1e-5, dtype=torch.bfloat16)
    x, dy = _inputs(torch.bfloat16, "cpu")
    _, _, saved, x_leaf = _run(ref, x, dy)
    assert any(k.startswith("other") for k in _classify(saved, x_leaf, ref))


# -- deliberately broken variants: each must be caught ----------------------------------------

class LayerNormWithoutMeanTerm(LayerNormFunction):
    """dx = rstd (g - x_hat mean(g x_hat)): the mean(g) term of LayerNorm's gradient dropped."""

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        c = mean.dtype
        x_hat = (x.to(c) - mean) * rstd
        g = grad_out.to(c) * weight.to(c)
        dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        dw = (grad_out.to(c) * x_hat).reshape(-1, x.shape[-1]).sum(0)
        db = grad_out.to(c).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), db.to(bias.dtype), None


class RMSNormWithoutProjection(RMSNormFunction):
    """dx = rstd g: the x_hat mean(g x_hat) term of RMSNorm's gradient dropped."""

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        c = rstd.dtype
        dy = grad_out.to(c)
        dx = (rstd * dy * weight.to(c)).to(x.dtype)
        dw = (dy * x.to(c) * rstd).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


class RMSNormSavingFp32Input(RMSNormFunction):
    """Right gradients, but keeps an fp32 copy of the input (torch's composite does)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight.float(), eps)
        ctx.save_for_backward(x.float(), rstd, weight)
        return out


class LayerNormSavingOutput(LayerNormFunction):
    """Right gradients, but also keeps the normalized output."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out = LayerNormFunction.forward(ctx, x, weight, bias, eps)
        ctx.save_for_backward(*ctx.to_save, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ctx.saved_tensors  # noqa: B018 (unpack all, as autograd expects)
        return LayerNormFunction.backward(_Drop(ctx), grad_out)


class _Drop:
    """ctx with the extra saved output dropped."""

    def __init__(self, ctx):
        self.saved_tensors, self.needs_input_grad = ctx.saved_tensors[:-1], ctx.needs_input_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
@pytest.mark.parametrize("kind,name,broken", [
    ("LayerNorm", "LayerNormFunction", LayerNormWithoutMeanTerm),
    ("RMSNorm", "RMSNormFunction", RMSNormWithoutProjection),
])
def test_broken_gradient_is_caught(monkeypatch, kind, name, broken, dtype):
    monkeypatch.setattr(norm, name, broken)
    errors, _, _ = _errors(kind, dtype, "cpu")
    assert any(k.startswith("input grad") for k in _bad(errors, dtype)), errors


@pytest.mark.parametrize("kind,name,broken", [
    ("RMSNorm", "RMSNormFunction", RMSNormSavingFp32Input),
    ("LayerNorm", "LayerNormFunction", LayerNormSavingOutput),
])
def test_extra_saved_tensor_is_caught(monkeypatch, kind, name, broken):
    monkeypatch.setattr(norm, name, broken)
    errors, _, _ = _errors(kind, torch.bfloat16, "cpu")
    assert not _bad(errors, torch.bfloat16), "the broken variant's gradients should still be right"
    kinds, _, _ = _saved(kind, torch.bfloat16, "cpu")
    assert kinds != EXPECTED[kind]


def test_only_parameter_gradients():
    """A norm whose input needs no gradient (or only some parameters do)."""
    lean, ref = _pair("LayerNorm", torch.float64, "cpu")
    lean.bias.requires_grad_(False)
    ref.bias.requires_grad_(False)
    x, dy = _inputs(torch.float64, "cpu")
    lean(x).backward(dy)
    ref(x).backward(dy)
    assert lean.bias.grad is None and rel_err(lean.weight.grad, ref.weight.grad) <= 1e-12


# -- the factory ------------------------------------------------------------------------------

def _config(**kw):
    base = dict(num_layers=1, hidden_size=H, num_attention_heads=4, ffn_hidden_size=128, layernorm_epsilon=1e-6)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.skipif(norm._te_norm() is not None, reason="Transformer Engine installed: TSPNorm is TENorm")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32], ids=["float64", "bf16", "float32"])
def test_tsp_norm_builds_lean_norms_in_params_dtype(kind, dtype):
    config = _config(normalization=kind, params_dtype=dtype, bf16=dtype == torch.bfloat16, sequence_parallel=True,
                     tensor_model_parallel_size=2)
    module = TSPNorm(config, H, eps=config.layernorm_epsilon)
    lean_cls, torch_cls = KINDS[kind]
    assert type(module) is lean_cls and isinstance(module, torch_cls)
    assert module.eps == 1e-6
    assert set(module.state_dict()) == set(torch_cls(H).state_dict())  # checkpoints keep their keys
    for p in module.parameters():
        assert p.dtype == dtype and p.sequence_parallel is True


@pytest.mark.skipif(norm._te_norm() is not None, reason="Transformer Engine installed: TSPNorm is TENorm")
def test_tsp_norm_refuses_zero_centered_gamma_without_te():
    with pytest.raises(TSPConfigError, match="--apply-layernorm-1p"):
        TSPNorm(_config(layernorm_zero_centered_gamma=True), H)


@pytest.mark.skipif(norm._te_norm() is not None, reason="Transformer Engine installed: TSPNorm is TENorm")
@pytest.mark.parametrize("layout", ["tsp", "tp_sp"])
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_float64_model_stays_float64(layout, normalization):
    """Every parameter of a float64 GPT (its norms included) is float64, and so are its logits
    (Megatron's vocab-parallel cross entropy then computes the loss in fp32: not the norms')."""
    from megatron_tsp.training.build import ModelShape, build_gpt
    from tests.utils import init_tsp, mock_batch

    pgs = init_tsp(1)
    shape = ModelShape(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                       seq_length=16, normalization=normalization)
    model = build_gpt(shape, layout=layout, dtype=torch.float64, pg_collection=pgs)
    assert {n for n, p in model.named_parameters() if p.dtype != torch.float64} == set()
    tokens, labels, pos = mock_batch(0, 2, shape)
    logits = model(tokens, pos, None)
    assert logits.dtype == torch.float64
    model(tokens, pos, None, labels=labels).sum().backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
def test_rms_norm_without_fused_kernel(monkeypatch, dtype):
    """torch < 2.8 has no fused RMSNorm: the written-out forward gives the same norm."""
    import megatron_tsp.tsp.norm as norm

    monkeypatch.setattr(norm, "_HAS_FUSED_RMS", False)
    errors, out, grads = _errors("RMSNorm", dtype, "cpu")
    assert not _bad(errors, dtype), errors
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
