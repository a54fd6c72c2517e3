"""TSP self-attention: the weights travel to the tokens, one head group at a time.

Per layer, on TSP rank p holding tokens x_p (its two zigzag chunks) and owning shard p:

    out = 0
    for j in 0..D-1:                        # shard j+1's broadcast is posted before j computes
        W_j   = broadcast(packed shard j, src=j)
        q,k,v = x_p @ Wqkv_j (+ b) ; RoPE at the true positions of x_p
        post K,V_j = all_gather(k,v)        # in flight while shard j-1 is finished:
        finish(j-1): wait K,V_{j-1}, zigzag -> natural order,
                     o = each local chunk against its causal prefix (lower-right mask),
                     out += o @ Wo_{j-1}    # accumulates locally: no all-reduce
    finish(D-1)

Backward, per shard j: re-broadcast W_j; dWo_j = g^T o, do = g Wo_j; re-gather K,V (posted a
shard ahead) and run the attention kernel's backward from the saved o and log-sum-exp; post the
reduce-scatter of dK,dV to the token owners and, while it is in flight, finish shard j-1: undo
RoPE, dWqkv = dqkv^T x_p, post its reduction onto the owner, dx += dqkv Wqkv. With `recompute='none'` each shard's q, the
local k/v, o and the log-sum-exps are saved (what Megatron saves without recompute, over the
local tokens); with `'full'` only x_p and the owned shard are, and each shard's projection and
attention forward run again in backward. Never saved: another rank's shard, a gathered K/V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from . import comm
from ..config import TSPConfigError, TSPOptions, check_seq_length, require_group, validate_transformer_config
from .exchange import Reductions, broadcast_shards, run_holder_pre_hooks
from .documents import WHAT as DOC_IDS, check_document_ids, chunk_links, chunk_mask, is_document_ids, key_starts
from .kernels import chunk_backward, chunk_forward, resolve_backend
from .rope import Rotary
from .streamed_attention import StreamedAttentionFunction
from .zigzag import from_zigzag, local_chunk_starts, local_position_index, to_zigzag


def _bhcd(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[c, b, heads*hn] or [c, b, heads, hn] -> a [b, heads, c, hn] view."""
    c, b = t.shape[:2]
    return t.reshape(c, b, heads, -1).permute(1, 2, 0, 3)


@dataclass
class AttentionShard:
    """One weight shard's attention on the local tokens: forward, and backward from saved
    activations. Shapes: x [s, b, h]; q [s, b, heads, hn]; kv [s, b, groups, 2hn] (k after
    RoPE, then v); o [s, b, heads*hn]; lses: one [b, heads, c] per local chunk."""

    config: object
    group: object
    heads: int  # query heads per shard
    groups: int  # KV groups per shard
    head_dim: int
    softmax_scale: float
    chunk_starts: tuple  # true start positions of the two local chunks
    chunk_len: int
    backend: str = "auto"
    # Packed sequences: document ids [b, S] in natural order (`megatron_tsp.tsp.documents`) and,
    # per local chunk, the first key its queries can see (the keys before are skipped); for the
    # streamed schedule instead, which chunk sees which (`documents.chunk_links`).
    doc_ids: Optional[torch.Tensor] = None
    key_starts: Optional[tuple] = None
    doc_links: Optional[tuple] = None

    def key_range(self, i: int, backend: str):
        """The keys chunk i attends to, [lo, start + c), and its document mask (None without; for
        `flex` the chunk's query and key document ids, not a dense mask)."""
        start, c = self.chunk_starts[i], self.chunk_len
        if self.doc_ids is None:
            return 0, start + c, None
        if backend == "flex":  # every key from 0: the block mask skips what the documents hide, and a
            # key length fixed per chunk keeps compiled FlexAttention from recompiling at every batch
            return 0, start + c, (self.doc_ids[:, start : start + c], self.doc_ids[:, : start + c])
        lo = self.key_starts[i]
        return lo, start + c, chunk_mask(self.doc_ids, start, c, lo, start + c)

    def rotary(self, freqs, dtype) -> Optional[Rotary]:
        return None if freqs is None else Rotary(freqs, self.config, dtype, self.group)

    def project(self, x, w_qkv, b_qkv, rope: Optional[Rotary]):
        """[s, b, h] -> q [s, b, heads, hn], kv [s, b, groups, 2hn] (Megatron's grouped layout),
        RoPE applied while copying out of the GEMM's interleaved [q.. | k | v] per group."""
        return self.split(F.linear(x, w_qkv, b_qkv), rope)

    def split(self, mixed, rope: Optional[Rotary]):
        """The QKV GEMM's output [s, b, groups*(heads/groups + 2)*hn] -> q, kv as `project`."""
        s, b = mixed.shape[:2]
        hn, g, pg = self.head_dim, self.groups, self.heads // self.groups
        mixed = mixed.view(s, b, g, pg + 2, hn)
        q = mixed.new_empty(s, b, g, pg, hn)
        kv = mixed.new_empty(s, b, g, 2, hn)
        if rope is None:
            q.copy_(mixed[..., :pg, :])
            kv[..., 0, :].copy_(mixed[..., pg, :])
        else:
            rope.apply_into(q, mixed[..., :pg, :])
            rope.apply_into(kv[..., 0, :], mixed[..., pg, :])
        kv[..., 1, :].copy_(mixed[..., pg + 1, :])
        return q.view(s, b, self.heads, hn), kv.view(s, b, g, 2 * hn)

    def unproject(self, dq, dkv, rope: Optional[Rotary]):
        """The adjoint of `project` up to the GEMM: dq, dkv -> d(mixed) [s*b, out]. RoPE is a
        rotation by the position angles, so its adjoint is the rotation by minus them."""
        s, b = dq.shape[:2]
        hn, g, pg = self.head_dim, self.groups, self.heads // self.groups
        dm = dq.new_empty(s, b, g, pg + 2, hn)
        dq5, dkv5 = dq.view(s, b, g, pg, hn), dkv.view(s, b, g, 2, hn)
        if rope is None:
            dm[..., :pg, :].copy_(dq5)
            dm[..., pg, :].copy_(dkv5[..., 0, :])
        else:
            rope.apply_into(dm[..., :pg, :], dq5, inverse=True)
            rope.apply_into(dm[..., pg, :], dkv5[..., 0, :], inverse=True)
        dm[..., pg + 1, :].copy_(dkv5[..., 1, :])
        return dm.view(s * b, -1)

    def gather(self, kv, async_op=False):
        """Local K,V -> the whole sequence's, in natural order (with `async_op`: (zigzag, request),
        to be passed through `natural` after the wait)."""
        if async_op:
            return comm.all_gather_sequence_raw(kv, self.group, async_op=True)
        return self.natural(comm.all_gather_sequence_raw(kv, self.group))

    def natural(self, kv_gathered):
        return from_zigzag(kv_gathered, self.group.size(), dim=0)

    def attend(self, q, kv_nat):
        """Each local chunk against its causal prefix [0, start + c) of K,V -> o [s, b, heads*hn]
        (written chunk by chunk, no concatenation) and one log-sum-exp per chunk. With document
        ids: against [key start, start + c) only, under the document mask."""
        c, hn = self.chunk_len, self.head_dim
        backend = resolve_backend(self.backend, q, masked=self.doc_ids is not None)
        o = q.new_empty(q.shape[0], q.shape[1], self.heads * hn)
        lses = []
        for i in range(len(self.chunk_starts)):
            rows = slice(i * c, (i + 1) * c)
            lo, end, mask = self.key_range(i, backend)
            prefix = _bhcd(kv_nat[lo:end], self.groups)
            _, lse = chunk_forward(_bhcd(q[rows], self.heads), prefix[..., :hn], prefix[..., hn:],
                                   self.softmax_scale, backend, out=_bhcd(o[rows], self.heads),
                                   **({} if mask is None else {"mask": mask}))
            lses.append(lse)
        return o, lses

    def attend_backward(self, do, q, kv_nat, o, lses):
        """-> dq [s, b, heads, hn] and dK,dV of the whole sequence in natural order. The chunk
        with the longer prefix writes its dK,dV first (its prefix covers the other's), the other
        adds; only the keys no local query sees are zero-filled."""
        c, hn = self.chunk_len, self.head_dim
        backend = resolve_backend(self.backend, q, masked=self.doc_ids is not None)
        dq = torch.empty_like(q)
        order = sorted(range(len(self.chunk_starts)), key=lambda i: -self.chunk_starts[i])
        if self.doc_ids is None:
            dkv_nat = torch.empty_like(kv_nat)
            dkv_nat[self.chunk_starts[order[0]] + c :].zero_()
        else:  # the chunks' key ranges start anywhere: every chunk adds into zeros
            dkv_nat = torch.zeros_like(kv_nat)
        for n, i in enumerate(order):
            rows = slice(i * c, (i + 1) * c)
            lo, end, mask = self.key_range(i, backend)
            prefix, dprefix = _bhcd(kv_nat[lo:end], self.groups), _bhcd(dkv_nat[lo:end], self.groups)
            chunk_backward(
                _bhcd(do[rows], self.heads), _bhcd(q[rows], self.heads), prefix[..., :hn], prefix[..., hn:],
                _bhcd(o[rows], self.heads), lses[i], self.softmax_scale, backend,
                dq=_bhcd(dq[rows], self.heads), dk=dprefix[..., :hn], dv=dprefix[..., hn:],
                accumulate=n > 0 or self.doc_ids is not None, **({} if mask is None else {"mask": mask}),
            )
        return dq, dkv_nat

    def scatter(self, dkv_nat, async_op=False):
        """dK,dV of the whole sequence -> this rank's tokens, summed over the group (with
        `async_op`: (out, request))."""
        return comm.reduce_scatter_sequence_raw(to_zigzag(dkv_nat, self.group.size(), dim=0), self.group,
                                                async_op=async_op)


class TSPAttentionFunction(torch.autograd.Function):
    """out = sum_j attention(x_p; shard j). Saves x_p, the owned shard and, unless
    recompute='full', each shard's (q, local kv, o, lses).

    Both directions run one shard behind their communication: the forward posts shard j's K/V
    all-gather and attends shard j-1 while it is in flight; the backward posts shard j's dK,dV
    reduce-scatter and finishes shard j-1 (the adjoint of its projection, its weight gradient)
    while it is in flight. So at most two shards' gathered (or scattered) K/V exist at a time."""

    @staticmethod
    def forward(ctx, x, w_qkv, b_qkv, w_proj, freqs, shard: AttentionShard, recompute: str):
        packer = comm.ShardPacker([w_qkv, b_qkv, w_proj])
        rope = shard.rotary(freqs, x.dtype)
        acc = {"out": None}
        saved = []

        def finish(q, kv, gathered, wp):
            kv_zig, request = gathered
            comm.wait_all([request])
            o, lses = shard.attend(q, shard.natural(kv_zig))
            del kv_zig, gathered
            y = F.linear(o, wp)
            acc["out"] = y if acc["out"] is None else acc["out"].add_(y)
            if recompute == "none":
                saved.extend([q, kv, o, *lses])

        pending = None
        for _, buf in broadcast_shards(packer.pack([w_qkv, b_qkv, w_proj]), packer, shard.group):
            wq, bq, wp = packer.unpack(buf)
            q, kv = shard.project(x, wq, bq, rope)
            gathered = shard.gather(kv, async_op=True)
            if pending is not None:
                finish(*pending)
            pending = (q, kv, gathered, wp)
            del buf, wq, bq, wp, q, kv, gathered
        finish(*pending)
        del pending
        ctx.shard, ctx.packer, ctx.recompute = shard, packer, recompute
        ctx.save_for_backward(x, w_qkv, b_qkv, w_proj, freqs, *saved)
        return acc["out"]

    @staticmethod
    def backward(ctx, grad_out):
        x, w_qkv, b_qkv, w_proj, freqs, *saved = ctx.saved_tensors
        shard, packer, group = ctx.shard, ctx.packer, ctx.shard.group
        D, p = group.size(), group.rank()
        rope = shard.rotary(freqs, x.dtype)
        n_chunks = len(shard.chunk_starts)
        per_shard = 3 + n_chunks
        acts = [saved[j * per_shard : (j + 1) * per_shard] for j in range(D)] if saved else None

        h = x.shape[-1]
        x2d, g2d = x.reshape(-1, h), grad_out.reshape(-1, h)
        dx = torch.zeros_like(x2d)
        reductions, owned = Reductions(group), {}
        gathers = {}  # j -> (zigzag K,V, request): shard j+1's gather posted while j computes

        def post_gather(j):
            if acts is not None and j < D:
                gathers[j] = shard.gather(acts[j][1], async_op=True)

        def finish(j, dq, scattered, wq, grad_buf):
            """Shard j after its dK,dV reduce-scatter: d(mixed) -> dx, dW_qkv, then the reduction."""
            dkv, request = scattered
            comm.wait_all([request])
            dmixed = shard.unproject(dq, dkv, rope)
            del dq, dkv, scattered
            gwq, gbq, _ = packer.unpack(grad_buf)
            torch.mm(dmixed.t(), x2d, out=gwq)
            if gbq is not None:
                torch.sum(dmixed, dim=0, out=gbq)
            reductions.post(grad_buf, j)
            dx.addmm_(dmixed, wq)  # while the reduction is in flight
            if j == p:
                owned["grad"] = grad_buf

        post_gather(0)
        pending = None
        for j, buf in broadcast_shards(packer.pack([w_qkv, b_qkv, w_proj]), packer, group):
            wq, bq, wp = packer.unpack(buf)
            if acts is not None:
                q, kv, o, *lses = acts[j]
                kv_zig, request = gathers.pop(j)
                comm.wait_all([request])
                kv_nat = shard.natural(kv_zig)
                del kv_zig
                post_gather(j + 1)
            else:
                q, kv = shard.project(x, wq, bq, rope)
                kv_nat = shard.gather(kv)
                o, lses = shard.attend(q, kv_nat)
            grad_buf = packer.empty()
            torch.mm(g2d.t(), o.reshape(-1, o.shape[-1]), out=packer.unpack(grad_buf)[2])
            do = torch.mm(g2d, wp).view(o.shape)
            dq, dkv_nat = shard.attend_backward(do, q, kv_nat, o, lses)
            del do, kv_nat, o, lses, q, kv
            scattered = shard.scatter(dkv_nat, async_op=True)
            del dkv_nat
            if pending is not None:
                finish(*pending)
            pending = (j, dq, scattered, wq, grad_buf)
            del dq, scattered, buf, wq, bq, wp, grad_buf
        finish(*pending)
        del pending
        reductions.wait()
        dw_qkv, db_qkv, dw_proj = packer.unpack(owned["grad"])
        return dx.view_as(x), dw_qkv, db_qkv, dw_proj, None, None, None


class TSPSelfAttention(SelfAttention):
    """Megatron's SelfAttention whose `linear_qkv` / `linear_proj` hold this rank's weight shard
    (native TP layout, init and checkpoints), with the TSP schedule as forward.
    The TSP group is `pg_collection.tp` (required: never Megatron's global TP group). Input and output: this rank's tokens, [S/D, b, h]."""

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                 tsp_options: Optional[TSPOptions] = None, **kwargs):
        pg_collection = require_group(kwargs.get("pg_collection"), "TSPSelfAttention", "pg_collection")
        tp = require_group(getattr(pg_collection, "tp", None), "TSPSelfAttention", "pg_collection.tp")
        validate_transformer_config(config, tp.size())
        if attn_mask_type != AttnMaskType.causal:
            raise TSPConfigError(f"TSP attention supports causal masks only, got attn_mask_type={attn_mask_type}")
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        self.tsp_options = tsp_options or TSPOptions()
        self.tsp_group = self.pg_collection.tp
        if self.tsp_options.tsp_compute_only:
            self.tsp_group = comm.ComputeOnlyGroup(self.tsp_group)
        hn = self.hidden_size_per_attention_head
        self.softmax_scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(hn)
        # The per-call shard; TSP prefill (megatron_tsp.inference) swaps in one that keeps K/V.
        self.shard_class = AttentionShard

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        # attention_mask: document ids [b, S] (packed sequences, megatron_tsp.tsp.documents) mask
        # attention to each document; any other mask is ignored: TSP attention is causal (as
        # Megatron's flash/TE paths).
        if inference_context is not None or inference_params is not None:
            raise TSPConfigError("inference (KV cache) is not supported by TSP attention in this version")
        if packed_seq_params is not None:
            raise TSPConfigError("packed sequences (packed_seq_params / THD) are not supported by TSP attention")
        if attention_bias is not None or key_value_states is not None:
            raise TSPConfigError("attention_bias / cross-attention are not supported by TSP attention")
        if rotary_pos_cos is not None or rotary_pos_sin is not None or rotary_pos_cos_sin is not None:
            raise TSPConfigError("precomputed RoPE cos/sin (inference) are not supported by TSP attention")

        group = self.tsp_group
        D, p = group.size(), group.rank()
        s_local = hidden_states.shape[0]
        S = s_local * D
        check_seq_length(S, D, what="sequence length (S/D local tokens x parallel.size)")
        doc_ids, starts, documents = None, local_chunk_starts(S, D, p), {}
        streamed = self.tsp_options.tsp_attention_kv == "streamed"
        if is_document_ids(attention_mask):
            check_document_ids(attention_mask, hidden_states.shape[1], S, what=DOC_IDS)
            doc_ids = attention_mask.to(hidden_states.device)
            resolve_backend(self.tsp_options.tsp_attention_backend, hidden_states, masked=True)  # before any collective
            # the streamed schedule meets keys a chunk at a time, the gathered one a key range per chunk
            documents = ({"doc_ids": doc_ids, "doc_links": chunk_links(doc_ids, S // (2 * D))} if streamed
                         else {"doc_ids": doc_ids, "key_starts": key_starts(doc_ids, starts)})
        freqs = None
        if rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple):
                q_emb, k_emb = rotary_pos_emb
                if k_emb is not q_emb and not torch.equal(q_emb, k_emb):
                    raise TSPConfigError("TSP attention needs the same RoPE table for queries and keys")
                rotary_pos_emb = q_emb
            if rotary_pos_emb.shape[0] < S:
                raise TSPConfigError(
                    f"RoPE table has {rotary_pos_emb.shape[0]} positions but the sequence has {S}: "
                    "pass the full-sequence table (Megatron does when sequence_parallel=True)"
                )
            freqs = rotary_pos_emb.index_select(0, local_position_index(S, D, p, rotary_pos_emb.device))

        run_holder_pre_hooks(self.linear_qkv, self.linear_proj)
        shard = self.shard_class(
            config=self.config,
            group=group,
            heads=self.num_attention_heads_per_partition,
            groups=self.num_query_groups_per_partition,
            head_dim=self.hidden_size_per_attention_head,
            softmax_scale=self.softmax_scale,
            chunk_starts=starts,
            chunk_len=S // (2 * D),
            backend=self.tsp_options.tsp_attention_backend,
            **documents,
        )
        # parallel.tsp_attention_kv: K/V all-gathered (this module) or streamed around the ring
        function = StreamedAttentionFunction if streamed else TSPAttentionFunction
        out = function.apply(
            hidden_states, self.linear_qkv.weight, self.linear_qkv.bias, self.linear_proj.weight, freqs, shard,
            self.tsp_options.tsp_recompute,
        )
        return out, self.linear_proj.bias
