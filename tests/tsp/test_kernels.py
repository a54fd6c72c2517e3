"""Chunk attention kernels (forward from scratch, backward from o and lse) against torch SDPA
with a lower-right causal mask under autograd, fp64, MHA and GQA, with and without a prefix."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron_tsp.config import TSPConfigError
from megatron_tsp.tsp.kernels import chunk_backward, chunk_forward, resolve_backend


@pytest.mark.parametrize("backend", ["math", "math_split"])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("c,L", [(5, 5), (5, 12), (3, 17)])
def test_chunk_attention_matches_sdpa(backend, hq, hk, c, L):
    g = torch.Generator().manual_seed(hq * 100 + hk * 10 + L)
    b, d, scale = 2, 8, 0.3
    q = torch.randn(b, hq, c, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(b, hk, L, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(b, hk, L, d, dtype=torch.float64, generator=g, requires_grad=True)
    do = torch.randn(b, hq, c, d, dtype=torch.float64, generator=g)

    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(c, L), scale=scale, enable_gqa=hq != hk)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, (q, k, v), do)

    with torch.no_grad():
        o, lse = chunk_forward(q, k, v, scale, backend)
        dq, dk, dv = chunk_backward(do, q, k, v, o, lse, scale, backend)
    assert lse.shape == (b, hq, c) and lse.dtype == torch.float64
    for got, want in [(o, ref), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)]:
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["math", "math_split"])
def test_chunk_attention_writes_into_strided_outputs(backend):
    """`out=` / `dq=,dk=,dv=` write into strided views of larger buffers (TSP's [s, b, heads, d]
    layout); `accumulate` adds dK,dV to what the views hold, dq is always overwritten."""
    g = torch.Generator().manual_seed(7)
    b, hq, hk, c, L, d, scale = 2, 4, 2, 3, 11, 8, 0.4
    q = torch.randn(b, hq, c, d, dtype=torch.float64, generator=g)
    k = torch.randn(b, hk, L, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, hk, L, d, dtype=torch.float64, generator=g)
    do = torch.randn(b, hq, c, d, dtype=torch.float64, generator=g)
    o, lse = chunk_forward(q, k, v, scale, backend)
    dq, dk, dv = chunk_backward(do, q, k, v, o, lse, scale, backend)

    o_buf = torch.randn(c, b, hq, d, dtype=torch.float64, generator=g)  # [s, b, heads, d]; garbage first
    o2, lse2 = chunk_forward(q, k, v, scale, backend, out=o_buf.permute(1, 2, 0, 3))
    assert o2.data_ptr() == o_buf.data_ptr()
    torch.testing.assert_close(o_buf.permute(1, 2, 0, 3), o, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=1e-12)

    dq_buf = torch.randn(c, b, hq, d, dtype=torch.float64, generator=g)
    before = torch.randn(L + 2, b, hk, 2 * d, dtype=torch.float64, generator=g)  # [s, b, groups, k|v]
    for accumulate in (False, True):
        dkv_buf = before.clone()
        view = dkv_buf[:L].permute(1, 2, 0, 3)
        chunk_backward(do, q, k, v, o, lse, scale, backend, dq=dq_buf.permute(1, 2, 0, 3), dk=view[..., :d],
                       dv=view[..., d:], accumulate=accumulate)
        base = before[:L].permute(1, 2, 0, 3) if accumulate else torch.zeros_like(view)
        torch.testing.assert_close(dq_buf.permute(1, 2, 0, 3), dq, rtol=0, atol=1e-12)
        torch.testing.assert_close(view[..., :d], base[..., :d] + dk, rtol=0, atol=1e-12)
        torch.testing.assert_close(view[..., d:], base[..., d:] + dv, rtol=0, atol=1e-12)
        torch.testing.assert_close(dkv_buf[L:], before[L:], rtol=0, atol=0)  # rows beyond L untouched


def test_backend_errors_name_the_option():
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(TSPConfigError, match="parallel.tsp_attention_backend must be one of") as e:
        resolve_backend("bogus", q)
    assert e.value.option == "parallel.tsp_attention_backend"
    with pytest.raises(TSPConfigError, match="parallel.tsp_attention_backend = cudnn needs CUDA"):
        resolve_backend("cudnn", q)
    assert resolve_backend("auto", q) == "math"
