"""TSP's RoPE (`megatron_tsp.tsp.rope.Rotary`) against Megatron's `apply_rotary_pos_emb`: the same
values, written into strided views, for full and partial rotary dims and the interleaved
layout; `inverse=True` is the adjoint (<R t, u> = <t, R^T u>)."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer import TransformerConfig

from megatron_tsp.tsp.rope import Rotary


def _freqs(s, d, percent, interleaved):
    """Megatron's RotaryEmbedding table [s, 1, 1, rot] (its layout for both settings)."""
    rot = int(d * percent)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    f = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    emb = torch.stack((f, f), dim=-1).view(s, -1) if interleaved else torch.cat((f, f), dim=-1)
    return emb[:, None, None, :]


def _config(interleaved=False):
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, rotary_interleaved=interleaved)


@pytest.mark.parametrize("percent,interleaved", [(1.0, False), (0.5, False), (1.0, True)])
def test_rotary_matches_megatron_and_inverse_is_adjoint(percent, interleaved):
    g = torch.Generator().manual_seed(3)
    s, b, heads, d = 12, 2, 3, 16
    config = _config(interleaved)
    freqs = _freqs(s, d, percent, interleaved)
    positions = torch.randperm(s, generator=g)[:7]  # TSP's local tokens sit at scattered positions
    freqs = freqs.index_select(0, positions)
    t = torch.randn(7, b, heads, d, dtype=torch.float64, generator=g)
    group = object()  # Megatron's bshd path only needs a cp_group to be given
    rope = Rotary(freqs, config, torch.float64, group)

    want = apply_rotary_pos_emb(t, freqs, config=config, cp_group=group)
    buf = torch.randn(7, b, heads + 2, d, dtype=torch.float64, generator=g)  # write into a strided view
    rope.apply_into(buf[:, :, 1 : heads + 1], t)
    torch.testing.assert_close(buf[:, :, 1 : heads + 1], want, rtol=1e-12, atol=1e-12)

    u = torch.randn_like(t)
    back = rope.apply_into(torch.empty_like(u), u, inverse=True)
    torch.testing.assert_close((want * u).sum(), (t * back).sum(), rtol=1e-12, atol=1e-12)
    # and for the rotated part it is the inverse: R^T R t = t
    again = rope.apply_into(torch.empty_like(t), want, inverse=True)
    torch.testing.assert_close(again, t, rtol=1e-12, atol=1e-12)
