"""Attention of one query chunk against its causal prefix of keys, forward and backward.

TSP attention (and the CP baseline) computes, for a chunk of `c` queries at true positions
[start, start + c), attention over keys [0, start + c) with a lower-right causal mask: the
prefix [0, start) is fully visible, the last c keys form a square causal block.

    o, lse = chunk_forward(q, k, v, scale, backend)             # lse: log-sum-exp per query row
    dq, dk, dv = chunk_backward(do, q, k, v, o, lse, scale, backend)

Backward takes the forward's `o` and `lse` instead of an autograd graph, so a caller can save
(q, k/v of its own tokens, o, lse) and never keep a gathered K/V or a graph alive.

Backends (`backend=`):
- `flash`: one FlashAttention-2 call (torch's aten kernel), whose causal mask is lower-right.
- `cudnn`: cuDNN's causal mask is upper-left, so the chunk is split into the unmasked prefix and
  the square causal block, two calls merged by their log-sum-exps (as ring attention does);
  backward runs each part's kernel with the *merged* o and lse, which is exact.
- `math`: explicit matrices in the input dtype (CPU, fp32/fp64 tests, any head dim).
- `math_split`: `math` through the split-and-merge path (tests the merge on CPU).
- `flex`: torch's FlexAttention, its block mask built from the causal rule and, for document
  masks, the document ids (`mask=(doc_q [b, c], doc_k [b, L])`, never a dense mask): blocks the
  mask empties are skipped. Backward runs the forward again under autograd (one more forward); on
  CPU, where torch has no FlexAttention backward, the math kernel's with the same mask. Forward
  exact on CPU (eager, tests); compiled on CUDA, where it is UNTESTED (no GPU run yet).
- `auto`: cudnn on CUDA for fp16/bf16 (cuDNN ran causal attention ~2x faster than flash on
  H200, docs/design.md §8), else math.
Document masks (packed sequences, `megatron_tsp.tsp.documents`): `mask=` a boolean
[b, 1, c, L] (True = masked out) combined with the lower-right causal mask (chunk_*; full_*:
no causal mask); the `math` and `math_split` kernels take it (a row the mask empties, in one
part of the split or in a streamed block, gets lse -inf and no weight in the merge); `flash` /
`cudnn` have no such mask and refuse it.
Tensors: q [b, hq, c, d]; k, v [b, hk, L, d] with hq a multiple of hk (GQA: query head i uses
KV head i // (hq/hk), Megatron's grouped layout); o like q; lse [b, hq, c] float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch

from ..config import BACKENDS, TSPConfigError, check_choice


def resolve_backend(backend: str, q: torch.Tensor, masked: bool = False) -> str:
    """The kernel `backend` names for q; `masked`: a document mask will be passed (auto -> math)."""
    check_choice("parallel.tsp_attention_backend", backend, BACKENDS)
    fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    if backend == "flex":
        return backend
    if masked:
        _check_mask(backend if backend != "auto" else "math", True)
        return "math" if backend == "auto" else backend
    if backend == "auto":
        return "cudnn" if fast else "math"
    if backend in ("cudnn", "flash") and not fast:
        raise TSPConfigError(
            f"parallel.tsp_attention_backend = {backend} needs CUDA tensors in fp16/bf16 with head dim <= 256, "
            f"got {q.device.type} {q.dtype} head dim {q.shape[-1]}: use auto or math",
            option="parallel.tsp_attention_backend")
    return backend


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    hk = t.shape[1]
    return t if hk == hq else t.repeat_interleave(hq // hk, dim=1)


def _fold_kv(g: torch.Tensor, hk: int) -> torch.Tensor:
    b, hq, L, d = g.shape
    return g if hq == hk else g.view(b, hk, hq // hk, L, d).sum(dim=2)


# ---- one kernel call: no mask (causal=False) or a mask aligned to the lower right -----------


def _math_forward(q, k, v, scale, causal, mask=None):
    hq = q.shape[1]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    s = _masked_scores(q, k, scale, causal, mask)
    lse = torch.logsumexp(s.to(_acc(q)), dim=-1)
    # a row the mask empties (a document mask's part of a split): lse -inf, weights 0, not nan
    safe = lse if mask is None else lse.masked_fill(torch.isneginf(lse), 0.0)
    p = torch.exp(s.to(_acc(q)) - safe.unsqueeze(-1)).to(q.dtype)
    return torch.matmul(p, v), lse


def _masked_scores(q, k, scale, causal, mask):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        c, L = s.shape[-2:]
        s = s.masked_fill(_lower_right_mask(c, L, s.device), float("-inf"))
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return s


def _math_backward(do, q, k, v, o, lse, scale, causal, mask=None):
    hq, hk = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, hq), _expand_kv(v, hq)
    s = _masked_scores(q, ke, scale, causal, mask)
    acc = _acc(q)
    p = torch.exp(s.to(acc) - lse.unsqueeze(-1)).to(q.dtype)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, ve.transpose(-1, -2))
    delta = (do.to(acc) * o.to(acc)).sum(-1, keepdim=True)
    ds = (p.to(acc) * (dp.to(acc) - delta)).to(q.dtype) * scale
    dq = torch.matmul(ds, ke)
    dk = torch.matmul(ds.transpose(-1, -2), q)
    return dq, _fold_kv(dk, hk), _fold_kv(dv, hk)


def _acc(q: torch.Tensor) -> torch.dtype:
    """Softmax statistics in fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(q.dtype, torch.float32)


def _lower_right_mask(c: int, L: int, device) -> torch.Tensor:
    """True where query i (at position L - c + i) must not see key j."""
    i = torch.arange(c, device=device).unsqueeze(1)
    j = torch.arange(L, device=device).unsqueeze(0)
    return j > i + (L - c)


def _flash_forward(q, k, v, scale, causal):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


_FLASH_AUX = {}


def _flash_aux(q, k, v, scale):
    """The non-varlen, no-dropout extras the flash backward takes (cum_seq_q/k as the forward
    returns them, i.e. undefined; rng state), read once from a tiny forward per device/dtype."""
    key = (q.device, q.dtype)
    if key not in _FLASH_AUX:
        t = torch.zeros(1, 1, 8, q.shape[-1], device=q.device, dtype=q.dtype)
        out = torch.ops.aten._scaled_dot_product_flash_attention(t, t, t, 0.0, False, False, scale=scale)
        _FLASH_AUX[key] = (out[2], out[3], out[6], out[7])
    return _FLASH_AUX[key]


def _flash_backward(do, q, k, v, o, lse, scale, causal):
    c, L = q.shape[2], k.shape[2]
    cum_q, cum_k, seed, offset = _flash_aux(q, k, v, scale)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, cum_q, cum_k, c, L, 0.0, causal, seed, offset, scale=scale
    )
    return dq, dk, dv


def _cudnn_forward(q, k, v, scale, causal):
    # cuDNN's causal mask is upper-left: only used on square blocks (c == L) or unmasked.
    hq = q.shape[1]
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, _expand_kv(k, hq), _expand_kv(v, hq), None, True, 0.0, causal, False, scale=scale
    )
    return out[0], out[1].reshape(q.shape[:3])


_CUDNN_AUX = {}


def _cudnn_aux(q, scale):
    """The no-dropout rng extras the cuDNN backward takes, read once from a tiny forward."""
    key = (q.device, q.dtype)
    if key not in _CUDNN_AUX:
        t = torch.zeros(1, 1, 8, q.shape[-1], device=q.device, dtype=q.dtype)
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(t, t, t, None, True, 0.0, False, False, scale=scale)
        _CUDNN_AUX[key] = (out[6], out[7])
    return _CUDNN_AUX[key]


def _cudnn_backward(do, q, k, v, o, lse, scale, causal):
    hq, hk = q.shape[1], k.shape[1]
    c, L = q.shape[2], k.shape[2]
    seed, offset = _cudnn_aux(q, scale)
    ke, ve = _expand_kv(k, hq), _expand_kv(v, hq)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, ke, ve, o, lse.unsqueeze(-1), seed, offset, None, None, None, c, L, 0.0, causal, scale=scale,
    )
    return dq, _fold_kv(dk, hk), _fold_kv(dv, hk)


# ---- FlexAttention (document masks as ids; untested on GPUs) --------------------------------


@functools.lru_cache(maxsize=None)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _flex_block_mask(q, k, causal, docs):
    from torch.nn.attention.flex_attention import create_block_mask

    c, L = q.shape[2], k.shape[2]
    shift = L - c  # query i sits at key position i + (L - c): the lower-right causal mask
    doc_q, doc_k = docs if docs is not None else (None, None)

    def mask_mod(b, h, qi, ki):
        keep = ki <= qi + shift if causal else ki >= 0
        return keep if doc_q is None else keep & (doc_q[b, qi] == doc_k[b, ki])

    return create_block_mask(mask_mod, q.shape[0] if docs is not None else None, None, c, L, device=q.device,
                             **({"_compile": True} if q.is_cuda else {}))


def _flex_forward(q, k, v, scale, causal, mask=None):
    import warnings

    with warnings.catch_warnings():  # eager (CPU): torch warns that it is unfused, which is the point there
        warnings.simplefilter("ignore")
        o, lse = _flex_fn(q.is_cuda)(q, k, v, block_mask=_flex_block_mask(q, k, causal, mask), scale=scale,
                                     enable_gqa=k.shape[1] != q.shape[1], return_lse=True)
    return o, lse


def _flex_backward(do, q, k, v, o, lse, scale, causal, mask=None):
    if not q.is_cuda:  # torch has no FlexAttention backward on CPU: the math kernel, the same mask
        dense = None if mask is None else (mask[0].unsqueeze(-1) != mask[1].unsqueeze(-2)).unsqueeze(1)
        return _math_backward(do, q, k, v, o, lse, scale, causal, mask=dense)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = _flex_forward(*leaves, scale, causal, mask)
        return torch.autograd.grad(out, leaves, do)


_CALLS = {
    "math": (_math_forward, _math_backward),
    "math_split": (_math_forward, _math_backward),
    "flash": (_flash_forward, _flash_backward),
    "cudnn": (_cudnn_forward, _cudnn_backward),
    "flex": (_flex_forward, _flex_backward),
}
_ONE_CALL = {"math", "flash", "flex"}  # kernels that take a lower-right mask with c < L directly
_TAKES_MASK = {"math", "math_split", "flex"}  # kernels that take a document mask (`mask=`; flex: the ids)


def _check_mask(backend: str, mask) -> None:
    if mask is not None and backend not in _TAKES_MASK:
        raise TSPConfigError(f"parallel.tsp_attention_backend = {backend} cannot apply a document mask (packed "
                             f"sequences, data.reset_attention_mask): use {' or '.join(sorted(_TAKES_MASK))}",
                             option="parallel.tsp_attention_backend")


def _part(mask, lo, hi):
    return None if mask is None else mask[..., lo:hi]


def _kw(mask):
    return {} if mask is None else {"mask": mask}


# ---- a chunk against its causal prefix ----------------------------------------------------


def chunk_forward(q, k, v, scale: float, backend: str, out=None, mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (the last c positions of a length-L sequence) over k, v [.., L, d].
    With `out` (a [b, hq, c, d] tensor or strided view), o is written there; with `mask`
    (boolean [b, 1, c, L], True = masked out), that mask as well as the causal one."""
    fwd, _ = _CALLS[backend]
    _check_mask(backend, mask)
    c, L = q.shape[2], k.shape[2]
    if backend in _ONE_CALL or L == c:
        o, lse = fwd(q, k, v, scale, True, **_kw(mask))
        return (o, lse) if out is None else (out.copy_(o), lse)
    # prefix: no causal mask; then the square causal block
    o1, lse1 = fwd(q, k[:, :, : L - c], v[:, :, : L - c], scale, False, **_kw(_part(mask, 0, L - c)))
    o2, lse2 = fwd(q, k[:, :, L - c :], v[:, :, L - c :], scale, True, **_kw(_part(mask, L - c, L)))
    lse = torch.logaddexp(lse1, lse2)
    # o = o1 w1 + o2 w2 with w_i = exp(lse_i - lse), accumulated in lse's (fp32) precision
    acc = torch.mul(o1, torch.exp(lse1 - lse).unsqueeze(-1))
    acc.addcmul_(o2, torch.exp(lse2 - lse).unsqueeze(-1))
    return (acc.to(q.dtype) if out is None else out.copy_(acc)), lse


def _write(dst, src, accumulate: bool):
    return dst.add_(src) if accumulate else dst.copy_(src)


def chunk_backward(do, q, k, v, o, lse, scale: float, backend: str, dq=None, dk=None, dv=None,
                   accumulate: bool = False, mask=None):
    """dq, dk, dv of `chunk_forward`, from its o and lse (no autograd graph). Given `dq`, `dk`,
    `dv` (tensors or strided views shaped like q, k, v), the gradients are written there, or
    added to what they hold with `accumulate` (dq is always overwritten). `mask` as the forward's."""
    _, bwd = _CALLS[backend]
    _check_mask(backend, mask)
    c, L = q.shape[2], k.shape[2]
    if backend in _ONE_CALL or L == c:
        parts = [(0, bwd(do, q, k, v, o, lse, scale, True, **_kw(mask)))]
    else:
        parts = [(0, bwd(do, q, k[:, :, : L - c], v[:, :, : L - c], o, lse, scale, False,
                         **_kw(_part(mask, 0, L - c)))),
                 (L - c, bwd(do, q, k[:, :, L - c :], v[:, :, L - c :], o, lse, scale, True,
                             **_kw(_part(mask, L - c, L))))]
    dqs = [p[1][0] for p in parts]
    if dq is None:
        dq = dqs[0] if len(dqs) == 1 else dqs[0].add_(dqs[1])
    elif len(dqs) == 1:
        dq.copy_(dqs[0])
    else:
        torch.add(dqs[0], dqs[1], out=dq)
    if dk is None:
        if len(parts) == 1:
            return dq, parts[0][1][1], parts[0][1][2]
        return dq, torch.cat([p[1][1] for p in parts], dim=2), torch.cat([p[1][2] for p in parts], dim=2)
    for start, (_, dk_i, dv_i) in parts:
        n = dk_i.shape[2]
        _write(dk[:, :, start : start + n], dk_i, accumulate)
        _write(dv[:, :, start : start + n], dv_i, accumulate)
    return dq, dk, dv


# ---- a block of keys wholly before the queries (streamed K/V) -------------------------------


def full_forward(q, k, v, scale: float, backend: str, mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over every key of k, v (no causal mask): a block of keys that all lie before
    the queries, as streamed K/V attention (tsp/streamed_attention.py) meets them. -> o, lse. With
    `mask` (as chunk_forward's, [b, 1, c, L]) a document mask; a row it empties gets lse -inf, o 0."""
    fwd, _ = _CALLS[backend]
    _check_mask(backend, mask)
    return fwd(q, k, v, scale, False, **_kw(mask))


def full_backward(do, q, k, v, o, lse, scale: float, backend: str, mask=None):
    """dq, dk, dv of `full_forward`'s block, from the o and lse of the whole row (the merge of
    every block the queries saw): each block's softmax weights are exp(s - lse), so this is exact.
    `mask` as the forward's."""
    _, bwd = _CALLS[backend]
    _check_mask(backend, mask)
    return bwd(do, q, k, v, o, lse, scale, False, **_kw(mask))
