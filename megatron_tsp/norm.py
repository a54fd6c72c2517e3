"""Norms for sequence-sharded activations (TSP and Megatron TP+SP).

A norm sees only this rank's tokens, so its weight gradient is a partial sum: the parameters
are tagged `sequence_parallel`, and Megatron's `finalize_model_grads` sums them over the TSP
(= TP) group. Transformer Engine's TENorm is used when TE is installed; otherwise a torch
LayerNorm / RMSNorm (Megatron's own torch fallback refuses sequence parallelism).
"""

from __future__ import annotations

import torch

from .config import TSPConfigError


def _te_norm():
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TENorm
    except ImportError:
        return None
    return TENorm if HAVE_TE else None


class TSPNorm:
    """`build_module`-compatible norm factory: `TSPNorm(config, hidden_size, eps)`."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        te_norm = _te_norm()
        if te_norm is not None:
            return te_norm(config=config, hidden_size=hidden_size, eps=eps)
        if config.layernorm_zero_centered_gamma:
            raise TSPConfigError("--apply-layernorm-1p (zero-centered gamma) needs Transformer Engine")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise TSPConfigError(
                f"--normalization {config.normalization!r}: only LayerNorm and RMSNorm are supported"
            )
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
