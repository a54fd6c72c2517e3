"""TSP self-attention with streamed K/V (parallel.tsp_attention_kv = streamed): ring attention
inside each head shard, so no rank ever holds all S tokens' K/V or their gradients.

Per layer, on TSP rank p holding tokens x_p (zigzag chunks p and 2D-1-p, c = S/(2D) tokens each):

    out = 0
    for j in 0..D-1:                        # shard j+1's broadcast is posted before j computes
        W_j   = broadcast(packed shard j, src=j)
        q,k,v = x_p @ Wqkv_j (+ b) ; RoPE at the true positions of x_p
        o, lse = 0, -inf                     # [2c] rows, fp32 (fp64 for fp64 inputs)
        for t in 0..D-1:                     # K,V of rank src = p-t (its chunks src, 2D-1-src)
            post the hop: send K,V_t -> p+1, receive K,V_{t+1} <- p-1   (in flight while t computes)
            for each (query rows, key block) that causality allows (`_blocks`):
                t = 0:      chunk p   vs chunk p           (square causal block)
                            chunk 2D-1-p vs chunks p, 2D-1-p (prefix visible, last block causal)
                src < p:    both local chunks vs chunk src (no mask)
                src > p:    chunk 2D-1-p vs chunks src, 2D-1-src (no mask)
                (every other pair lies wholly above the diagonal: skipped)
                o_b, lse_b = kernel(q rows, K/V block)
                o, lse = online-softmax merge: lse' = logaddexp(lse, lse_b),
                         o = o exp(lse - lse') + o_b exp(lse_b - lse')
        out += o @ Wo_j                      # accumulates locally: no all-reduce

Packed sequences (document ids, `shard.doc_ids`): each block also gets the document mask of its
rows and keys (`_doc_blocks`); a block no query of it can see is skipped (forward and backward
decide from the same `shard.doc_links`), a block inside one document runs unmasked.

Every rank attends 3 blocks of c x c-equivalent work at t = 0 and 2 at every later step: the
zigzag keeps the ring's steps balanced, as it keeps the gathered schedule's chunks balanced.

Backward, per shard j: re-broadcast W_j; dWo_j = g^T o, do = g Wo_j; the K/V travel the ring
again (the next hop posted before each step computes); at step t the blocks of the forward run
their kernel backward from the *merged* o and lse (each block's softmax weights are exp(s - lse):
exact), dq accumulates locally (fp32), and the block's dK,dV go into a fresh fp32 partial of
src's K/V; the partial arriving from p-1 (every rank before it on the ring has added its share)
is added and the sum sent on to p+1 (in the K/V's dtype, as the gathered reduce-scatter sends).
After D hops src's accumulator is back at src, summed over the group. While that last hop is in
flight shard j-1 is finished: undo RoPE, dWqkv = dqkv^T x_p, post its reduction onto the owner,
dx += dqkv Wqkv.

Working set per step (besides q, o and the local k/v): the K/V held and the one arriving (two
ranks' 2c tokens), the dK,dV partial being built (fp32), the one arriving and the one being sent:
O(S/D x kv), never S x kv (planner: formulas.streamed_kv_buffers). Saved, as the gathered
schedule: with `recompute='none'` each shard's q, the local k/v, o and the log-sum-exps of the
local rows; with `'full'` only x_p and the owned shard (the projection and the streamed forward
run again in backward).

Communication: per shard, D-1 K/V hops forward; D-1 K/V hops and D dK,dV hops backward, each
posted before the compute it hides behind (the same bytes as the all-gather and reduce-scatter).
The GPU timing of that overlap is not measured yet.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from . import comm
from .exchange import Reductions, broadcast_shards
from .documents import HIDDEN, VISIBLE
from .kernels import chunk_backward, chunk_forward, full_backward, full_forward, resolve_backend
from .zigzag import local_chunk_ids, local_chunk_starts


def _bhcd(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[c, b, heads*hn] or [c, b, heads, hn] -> a [b, heads, c, hn] view (as attention.py's)."""
    c, b = t.shape[:2]
    return t.reshape(c, b, heads, -1).permute(1, 2, 0, 3)


def _blocks(p: int, src: int, c: int) -> List[Tuple[slice, slice, bool]]:
    """(local query rows, key rows of src's K/V, causal) of every block rank p attends when it
    holds src's K/V; local rows [0, c) are chunk p, [c, 2c) chunk 2D-1-p (src's keys alike).
    Causal blocks end on the diagonal (lower-right mask); the others are wholly visible."""
    first, second, both = slice(0, c), slice(c, 2 * c), slice(0, 2 * c)
    if src == p:
        return [(first, first, True), (second, both, True)]
    if src < p:  # chunk src precedes both local chunks; chunk 2D-1-src follows both
        return [(both, first, False)]
    return [(second, both, False)]  # src > p: both of src's chunks lie between chunk p and 2D-1-p


def _doc_blocks(shard, p: int, src: int, c: int, flex: bool, local_ids):
    """`_blocks` under the document mask (packed sequences): (rows, keys, causal, mask) of every
    block rank p attends when it holds src's K/V. A block no query can see (HIDDEN for each of its
    (query chunk, key chunk) pairs, `documents.chunk_links`) is skipped, in forward and backward
    alike (the links come with the shard); a wholly visible one runs without a mask (None); the
    others get the document mask of their rows and keys (flex: their ids), combined with the
    block's causal mask by the kernel. Without document ids: `_blocks`, mask None."""
    if local_ids is None:
        return [(rows, keys, causal, None) for rows, keys, causal in _blocks(p, src, c)]
    D = shard.group.size()
    mine, theirs = local_chunk_ids(D, p), local_chunk_ids(D, src)
    src_ids = _local_ids(shard.doc_ids, src, D, c)
    out = []
    for rows, keys, causal in _blocks(p, src, c):
        links = {shard.doc_links[i][k] for i in mine[rows.start // c : rows.stop // c]
                 for k in theirs[keys.start // c : keys.stop // c]}
        if links == {HIDDEN}:
            continue
        mask = None
        if links != {VISIBLE}:
            doc_q, doc_k = local_ids[:, rows], src_ids[:, keys]
            mask = (doc_q, doc_k) if flex else (doc_q.unsqueeze(-1) != doc_k.unsqueeze(-2)).unsqueeze(1)
        out.append((rows, keys, causal, mask))
    return out


def _shard_ids(shard, p: int, c: int):
    """Rank p's document ids (`_local_ids`), or None without documents: a shard may carry none
    (`doc_ids` / `doc_links` are optional: another caller's shard object may have neither)."""
    doc_ids = getattr(shard, "doc_ids", None)
    return None if doc_ids is None else _local_ids(doc_ids, p, shard.group.size(), c)


def _local_ids(doc_ids: torch.Tensor, r: int, D: int, c: int) -> torch.Tensor:
    """The document ids [b, 2c] of rank r's tokens, in local (zigzag) order."""
    a, z = local_chunk_starts(2 * D * c, D, r)
    return torch.cat([doc_ids[:, a : a + c], doc_ids[:, z : z + c]], dim=1)


def _ring(kv: torch.Tensor, group):
    """Yields (src, K/V of rank src) for src = p, p-1, ..., p-D+1 (mod D); the next hop (send to
    p+1, receive from p-1) is in flight while a step computes."""
    D, p = group.size(), group.rank()
    held = kv
    for t in range(D):
        if t + 1 < D:
            incoming = torch.empty_like(held)
            requests = comm.ring_shift(held, incoming, group)
        yield (p - t) % D, held
        if t + 1 < D:
            comm.wait_all(requests)
            held, incoming, requests = incoming, None, None  # a done request still holds what it sent


def _merge(o_acc, lse_acc, o_b, lse_b) -> None:
    """Online softmax, in place: (o_acc, lse_acc) <- the merge with a block's (o_b, lse_b). A row
    with no visible key on either side (lse -inf on both, a document mask's) stays o 0, lse -inf:
    its weights are taken against 0 there, so exp(-inf - 0) = 0 and never exp(-inf + inf) = nan."""
    lse = torch.logaddexp(lse_acc, lse_b.to(lse_acc.dtype))
    safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    o_acc.mul_(torch.exp(lse_acc - safe).unsqueeze(-1))
    o_acc.add_(o_b.to(o_acc.dtype) * torch.exp(lse_b.to(lse.dtype) - safe).unsqueeze(-1))
    lse_acc.copy_(lse)


def stream_forward(shard, q: torch.Tensor, kv: torch.Tensor):
    """q [s, b, heads, hn], this rank's kv [s, b, groups, 2hn] -> o [s, b, heads*hn] (q's dtype)
    and the log-sum-exp of every local row [b, heads, s] (fp32, fp64 for fp64 inputs). `shard`:
    the call's attention.AttentionShard (group, heads, groups, head_dim, scale, chunk_len, backend;
    optionally doc_ids [b, S] and their doc_links, `documents.chunk_links(doc_ids, c)`: document masks)."""
    group, c, hn, H, G = shard.group, shard.chunk_len, shard.head_dim, shard.heads, shard.groups
    p = group.rank()
    local_ids = _shard_ids(shard, p, c)
    backend = resolve_backend(shard.backend, q, masked=local_ids is not None)
    s, b = q.shape[:2]
    acc = torch.promote_types(q.dtype, torch.float32)  # the merge in fp32 (fp64 for fp64 inputs)
    o_acc = torch.zeros(s, b, H, hn, dtype=acc, device=q.device)
    lse = torch.full((b, H, s), float("-inf"), dtype=acc, device=q.device)
    qb, ob = _bhcd(q, H), _bhcd(o_acc, H)
    for src, held in _ring(kv, group):
        kb = _bhcd(held, G)
        for rows, keys, causal, mask in _doc_blocks(shard, p, src, c, backend == "flex", local_ids):
            attend = chunk_forward if causal else full_forward
            o_b, lse_b = attend(qb[:, :, rows], kb[:, :, keys, :hn], kb[:, :, keys, hn:], shard.softmax_scale, backend,
                                **({} if mask is None else {"mask": mask}))
            _merge(ob[:, :, rows], lse[:, :, rows], o_b, lse_b)
        del held, kb
    return o_acc.to(q.dtype).view(s, b, H * hn), lse


def stream_backward(shard, do, q, kv, o, lse):
    """-> dq [s, b, heads, hn] (q's dtype) and (buffer, requests, sent): this rank's dK,dV
    [s, b, groups, 2hn], summed over the group once the requests complete (the last ring hop,
    left in flight for the caller to overlap; `sent` is the buffer that hop sends, kept alive
    until then). Each rank sums its blocks' dK,dV and the arriving partial in fp32 (fp64 for
    fp64 inputs); the partials travel in the K/V's dtype, rounded once per hop as the gathered
    schedule's reduce-scatter rounds them (half the bytes of fp32 partials, buffers and hops)."""
    group, c, hn, H, G = shard.group, shard.chunk_len, shard.head_dim, shard.heads, shard.groups
    D, p = group.size(), group.rank()
    local_ids = _shard_ids(shard, p, c)
    backend = resolve_backend(shard.backend, q, masked=local_ids is not None)
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    qb, dqb, dob, ob = _bhcd(q, H), _bhcd(dq, H), _bhcd(do, H), _bhcd(o, H)
    arriving = None  # (the dK,dV accumulator of the K/V held now, its requests, the partial being sent)
    for src, held in _ring(kv, group):
        kb = _bhcd(held, G)
        partial = torch.zeros(held.shape, dtype=acc, device=held.device)
        pb = _bhcd(partial, G)
        for rows, keys, causal, mask in _doc_blocks(shard, p, src, c, backend == "flex", local_ids):
            grads = chunk_backward if causal else full_backward
            dq_b, dk_b, dv_b = grads(dob[:, :, rows], qb[:, :, rows], kb[:, :, keys, :hn], kb[:, :, keys, hn:],
                                     ob[:, :, rows], lse[:, :, rows].contiguous(), shard.softmax_scale, backend,
                                     **({} if mask is None else {"mask": mask}))
            dqb[:, :, rows].add_(dq_b)
            pb[:, :, keys, :hn].add_(dk_b)
            pb[:, :, keys, hn:].add_(dv_b)
        del held, kb, pb
        if arriving is not None:
            buf, requests, _ = arriving
            comm.wait_all(requests)
            partial.add_(buf)
            del buf, requests
            arriving = None  # frees the arrived buffer and the one sent last step
        if D == 1:
            return dq.to(q.dtype), (partial, [], None)
        send = partial.to(kv.dtype)
        del partial
        incoming = torch.empty_like(send)
        arriving = (incoming, comm.ring_shift(send, incoming, group), send)
        del incoming, send
    return dq.to(q.dtype), arriving


class StreamedAttentionFunction(torch.autograd.Function):
    """out = sum_j attention(x_p; shard j), K/V streamed around the ring. Saves x_p, the owned
    shard and, unless recompute='full', each shard's (q, local kv, o, lse): the same as
    `attention.TSPAttentionFunction`, whose arguments it takes."""

    @staticmethod
    def forward(ctx, x, w_qkv, b_qkv, w_proj, freqs, shard, recompute: str):
        packer = comm.ShardPacker([w_qkv, b_qkv, w_proj])
        rope = shard.rotary(freqs, x.dtype)
        out, saved = None, []
        for _, buf in broadcast_shards(packer.pack([w_qkv, b_qkv, w_proj]), packer, shard.group):
            wq, bq, wp = packer.unpack(buf)
            q, kv = shard.project(x, wq, bq, rope)
            o, lse = stream_forward(shard, q, kv)
            y = F.linear(o, wp)
            out = y if out is None else out.add_(y)
            if recompute == "none":
                saved.extend([q, kv, o, lse])
            del buf, wq, bq, wp, q, kv, o, lse, y
        ctx.shard, ctx.packer, ctx.recompute = shard, packer, recompute
        ctx.save_for_backward(x, w_qkv, b_qkv, w_proj, freqs, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w_qkv, b_qkv, w_proj, freqs, *saved = ctx.saved_tensors
        shard, packer, group = ctx.shard, ctx.packer, ctx.shard.group
        D, p = group.size(), group.rank()
        rope = shard.rotary(freqs, x.dtype)
        acts = [saved[4 * j : 4 * (j + 1)] for j in range(D)] if saved else None

        h = x.shape[-1]
        x2d, g2d = x.reshape(-1, h), grad_out.reshape(-1, h)
        dx = torch.zeros_like(x2d)
        reductions, owned = Reductions(group), {}

        def finish(j, dq, streamed, wq, grad_buf):
            """Shard j once its dK,dV are home: d(mixed) -> dx, dW_qkv, then the reduction."""
            dkv, requests, _ = streamed
            comm.wait_all(requests)
            dmixed = shard.unproject(dq, dkv.to(dq.dtype), rope)
            del dq, dkv, streamed
            gwq, gbq, _ = packer.unpack(grad_buf)
            torch.mm(dmixed.t(), x2d, out=gwq)
            if gbq is not None:
                torch.sum(dmixed, dim=0, out=gbq)
            reductions.post(grad_buf, j)
            dx.addmm_(dmixed, wq)  # while the reduction is in flight
            if j == p:
                owned["grad"] = grad_buf

        pending = None
        for j, buf in broadcast_shards(packer.pack([w_qkv, b_qkv, w_proj]), packer, group):
            wq, bq, wp = packer.unpack(buf)
            if acts is not None:
                q, kv, o, lse = acts[j]
            else:
                q, kv = shard.project(x, wq, bq, rope)
                o, lse = stream_forward(shard, q, kv)
            grad_buf = packer.empty()
            torch.mm(g2d.t(), o.reshape(-1, o.shape[-1]), out=packer.unpack(grad_buf)[2])
            do = torch.mm(g2d, wp).view(o.shape)
            dq, streamed = stream_backward(shard, do, q, kv, o, lse)
            del do, o, lse, q, kv
            if pending is not None:
                finish(*pending)  # while shard j's last dK,dV hop is in flight
            pending = (j, dq, streamed, wq, grad_buf)
            del dq, streamed, buf, wq, bq, wp, grad_buf
        finish(*pending)
        del pending
        reductions.wait()
        dw_qkv, db_qkv, dw_proj = packer.unpack(owned["grad"])
        return dx.view_as(x), dw_qkv, db_qkv, dw_proj, None, None, None
