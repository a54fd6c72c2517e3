"""Rotary position embedding for TSP's projections, written straight into the buffers the
attention reads (q, the packed k|v) and, in backward, into the packed d(qkv).

Megatron's unfused `apply_rotary_pos_emb` builds cos/sin from the angles, rotates half the
vector with a `cat`, and ends in another `cat` -- about ten kernels per call and tensor. TSP
applies RoPE to D shards of every layer, forward and adjoint, so the tables are built once per
layer call and each rotation is three kernels into its destination:

    out = t * cos;  out[:h] -= t[h:] * sin[:h];  out[h:] += t[:h] * sin[h:]

which is Megatron's `t * cos + rotate_half(t) * sin` (non-interleaved), with cos/sin scaled by
mscale and cast to the input dtype as Megatron does. The adjoint of a rotation by the angles is
the rotation by minus them (`inverse=True`: sin negated). Interleaved RoPE falls back to
Megatron's function.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from ..config import TSPConfigError

try:  # moved between megatron-core releases; YaRN scaling only
    from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config
except ImportError:  # pragma: no cover
    def _yarn_get_concentration_factor_from_config(config):
        return 1.0


class Rotary:
    """RoPE at fixed positions: `freqs` [s, 1, 1, rot] (Megatron's table rows of the local
    tokens) or [s, b, 1, rot] (per sample: positions that restart per document), for tensors
    [s, b, ..., head_dim] of `dtype`. `group` is handed to Megatron's function
    (interleaved fallback), which otherwise reads the global context-parallel group."""

    def __init__(self, freqs: torch.Tensor, config, dtype: torch.dtype, group=None):
        self.config, self.freqs, self.group = config, freqs, group
        self.mscale = _yarn_get_concentration_factor_from_config(config)
        self.interleaved = bool(getattr(config, "rotary_interleaved", False))
        self.rot = freqs.shape[-1]
        self.per_sample = freqs.dim() > 1 and freqs.shape[1] > 1
        if self.interleaved and self.per_sample:
            raise TSPConfigError("rotary_interleaved = True cannot be combined with per-document RoPE positions "
                                 "(data.reset_position_ids)")
        if not self.interleaved:
            flat = freqs.reshape(freqs.shape[0], -1, self.rot)  # [s, 1 or b, rot]
            self.cos = (torch.cos(flat) * self.mscale).to(dtype)
            self.sin = (torch.sin(flat) * self.mscale).to(dtype)

    def _table(self, table: torch.Tensor, ndim: int) -> torch.Tensor:
        return table.view(table.shape[0], table.shape[1], *([1] * (ndim - 3)), self.rot)

    def apply_into(self, out: torch.Tensor, t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """out[...] = RoPE(t) (or its adjoint); `out` may be a strided view of a larger buffer."""
        rot = self.rot
        if self.interleaved:
            freqs = -self.freqs if inverse else self.freqs
            out.copy_(apply_rotary_pos_emb(t, freqs, config=self.config, mscale=self.mscale, cp_group=self.group))
            return out
        h = rot // 2
        cos, sin = self._table(self.cos, t.dim()), self._table(self.sin, t.dim())
        t_r, o_r = t[..., :rot], out[..., :rot]
        torch.mul(t_r, cos, out=o_r)
        o_r[..., :h].addcmul_(t_r[..., h:], sin[..., :h], value=1 if inverse else -1)
        o_r[..., h:].addcmul_(t_r[..., :h], sin[..., h:], value=-1 if inverse else 1)
        if rot < t.shape[-1]:  # rotary_percent < 1: the rest passes through
            out[..., rot:].copy_(t[..., rot:])
        return out
