"""Norms for sequence-sharded activations (TSP and Megatron TP+SP).

A norm sees only this rank's tokens, so its weight gradient is a partial sum: the parameters
are tagged `sequence_parallel`, and Megatron's `finalize_model_grads` sums them over the TSP
(= TP) group. Transformer Engine's TENorm is used when TE is installed; otherwise a lean torch
LayerNorm / RMSNorm (Megatron's own torch fallback refuses sequence parallelism).

Lean: torch.nn.RMSNorm's composite path (CPU; CUDA when the weight's dtype is not the input's,
as with the fp32 weights TSPNorm made before it followed `params_dtype`) keeps fp32 copies of its
input for backward (the upcast input and the normalized value, 8 bytes per element for a bf16
model), and torch's bf16 LayerNorm on CPU rounds mean and rstd to bf16. These norms keep only
their input, in the model's dtype (a reference, not a copy), and a per-token statistic: rstd
(RMSNorm), mean and rstd (LayerNorm), in the compute dtype (fp32 for bf16/fp16 inputs, float64
for float64). The math runs in that compute dtype, the output comes back in the input's dtype.
Fused kernels where torch has them (`native_layer_norm` and its backward; `_fused_rms_norm`
forward everywhere and its backward on CUDA); RMSNorm's backward on other devices is written out
here from the saved input and rstd.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import TSPConfigError

_aten = torch.ops.aten


def _te_norm():
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TENorm
    except ImportError:
        return None
    return TENorm if HAVE_TE else None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 (as torch's norms), the dtype itself for fp32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _kernel_param(p: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A norm parameter as the fused kernels take it. CUDA: in the input's dtype (the kernels
    read gamma/beta as the input's type; a bf16 model's are bf16 already, Megatron's Float16Module
    casts them). CPU and others: in the compute dtype, so that the mixed-dtype CPU kernel returns
    fp32 statistics for a bf16 input (with bf16 gamma it rounds mean and rstd to bf16)."""
    if p is None:
        return None
    return p.to(x.dtype if x.is_cuda else _compute_dtype(x.dtype))


def _param_grad(grad: Optional[torch.Tensor], p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad is None or p is None else grad.to(p.dtype)


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last dim; saves the input, mean and rstd ([..., 1], compute dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        x = x.contiguous()
        out, mean, rstd = _aten.native_layer_norm(x, [x.shape[-1]], _kernel_param(weight, x),
                                                  _kernel_param(bias, x), eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        dx, dw, db = _aten.native_layer_norm_backward(grad_out.contiguous(), x, [x.shape[-1]], mean, rstd,
                                                      _kernel_param(weight, x), _kernel_param(bias, x), mask)
        return dx, _param_grad(dw, weight), _param_grad(db, bias), None


def _rms_norm_backward(grad_out, x, rstd, weight, need_dx: bool, need_dw: bool):
    """RMSNorm's backward in the compute dtype from the input and rstd (devices without torch's
    fused kernel): with x_hat = x * rstd and g = dy * w,
    dx = rstd * (g - x_hat * mean(g * x_hat)), dw = sum over tokens of dy * x_hat."""
    c = _compute_dtype(x.dtype)
    dy = grad_out.to(c)
    x_hat = x.to(c) * rstd
    g = dy * weight.to(c) if weight is not None else dy
    dx = dw = None
    if need_dx:
        dx = ((g - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd).to(x.dtype)
    if need_dw:
        dw = (dy * x_hat).reshape(-1, x.shape[-1]).sum(0)
    return dx, dw


# torch added the fused RMSNorm ops in 2.8 (backward on CUDA later): older releases, which
# setup.py admits, take the written-out path.
_HAS_FUSED_RMS = hasattr(_aten, "_fused_rms_norm")
_HAS_FUSED_RMS_BACKWARD = hasattr(_aten, "_fused_rms_norm_backward")


def _rms_norm_forward(x, weight, eps: Optional[float]):
    c = _compute_dtype(x.dtype)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    rstd = torch.rsqrt(x.to(c).pow(2).mean(-1, keepdim=True) + eps)
    out = x.to(c) * rstd
    if weight is not None:
        out = out * weight.to(c)
    return out.to(x.dtype), rstd


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim; saves the input and rstd ([..., 1], compute dtype)."""

    @staticmethod
    def forward(ctx, x, weight, eps: Optional[float]):
        x = x.contiguous()
        if _HAS_FUSED_RMS:
            out, rstd = _aten._fused_rms_norm(x, [x.shape[-1]], _kernel_param(weight, x), eps)
        else:  # torch < 2.8: the same math, written out
            out, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        if x.is_cuda and _HAS_FUSED_RMS_BACKWARD:
            dx, dw = _aten._fused_rms_norm_backward(grad_out.contiguous(), x, [x.shape[-1]], rstd,
                                                    _kernel_param(weight, x), [need_dx, need_dw])
        else:
            dx, dw = _rms_norm_backward(grad_out, x, rstd, weight, need_dx, need_dw)
        return dx, _param_grad(dw, weight), None


class LeanLayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm (same parameters and state-dict keys) over the last dim, whose
    backward keeps only the input and the per-token mean and rstd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LayerNormFunction.apply(x, self.weight, self.bias, self.eps)


class LeanRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm (same parameter and state-dict key) over the last dim, whose backward
    keeps only the input and the per-token rstd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class TSPNorm:
    """`build_module`-compatible norm factory: `TSPNorm(config, hidden_size, eps)`. Weights in
    `config.params_dtype`."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        te_norm = _te_norm()
        if te_norm is not None:
            return te_norm(config=config, hidden_size=hidden_size, eps=eps)
        if config.layernorm_zero_centered_gamma:
            raise TSPConfigError("--apply-layernorm-1p (zero-centered gamma) needs Transformer Engine")
        if config.normalization == "LayerNorm":
            norm = LeanLayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = LeanRMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise TSPConfigError(
                f"--normalization {config.normalization!r}: only LayerNorm and RMSNorm are supported"
            )
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
