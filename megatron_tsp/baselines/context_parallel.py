"""Context parallelism with an all-gather of K/V, on torch SDPA: the CP baseline without
Transformer Engine.

Megatron's own context parallelism runs only inside TEDotProductAttention. This module is the
same algorithm as its `cp_comm_type="all_gather"` (TE's AttnFuncWithCPAndKVAllGather, the
Llama 3 scheme) with the attention kernel TSP uses, so the CP rows of the benchmark differ from
TSP in the parallel layout only.

Layout (Megatron's CP load balancing, `megatron_tsp.tsp.zigzag`): each sequence of S tokens is cut
into 2*CP chunks of c = S/(2 CP); CP rank r holds chunks r and 2CP-1-r. The batch is sliced that
way before the model (`cp_slice_batch`, Megatron's get_batch_on_this_cp_rank), and Megatron's
RotaryEmbedding slices the RoPE table the same way for `pg_collection.cp`.

Per layer, on CP rank r (query [s, b, np, hn] and key/value [s, b, ng, hn], s = S/CP local
tokens, heads already split by TP):

    KV  = all_gather over the CP group of [k | v]     (backward: reduce-scatter of dK, dV)
    KV  = zigzag -> natural order
    out = each local chunk against its causal prefix [0, start + c) of KV
          (TSP's chunk-attention kernels, megatron_tsp.tsp.kernels: cuDNN split on GPUs)

Memory: like TE, only the local K/V are kept for backward; the gathered K/V are gathered again
in backward (a saved-tensor hook swaps every view of them for a recipe) instead of being held
from forward to backward for every layer. The attention forward is not recomputed.

`cp_comm_type="p2p"` (Megatron's name for ring attention, TE's AttnFuncWithCPAndKVP2P): no rank
gathers the sequence's K/V. The local [k | v] travel around the CP ring, each local chunk meets
the blocks causality allows and the results merge by log-sum-exp; in backward the K/V travel
again and the dK/dV partials go around the ring back to their owner. It is TSP's streamed K/V
schedule (`megatron_tsp.tsp.streamed_attention`, the same zigzag layout) on the CP group: at most
two ranks' K/V (and dK/dV partials) at a time; saved for backward: q, the local [k | v], o and
the log-sum-exps. Same loss and gradients; with document ids each block gets its document mask
and blocks no query sees are skipped, as TSP's streamed schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from ..tsp import comm
from ..config import CP_COMM_TYPES, TSPConfigError, require_group
from ..config import check_context_parallel  # noqa: F401 (torch-free, in config)
from ..tsp.documents import WHAT as DOC_IDS, check_document_ids, chunk_links, chunk_mask, is_document_ids, key_starts
from ..tsp.kernels import chunk_backward, chunk_forward, resolve_backend
from ..tsp.streamed_attention import stream_backward, stream_forward
from ..tsp.zigzag import from_zigzag, local_chunk_starts, local_position_index

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)


def cp_slice(t: Tensor, cp_group, dim: int = 1) -> Tensor:
    """This CP rank's tokens of a full-sequence tensor (tokens, labels, loss mask, position ids:
    [b, S] -> [b, S/CP]), in zigzag order: chunks r and 2CP-1-r. Megatron's
    get_batch_on_this_cp_rank."""
    if cp_group is None or cp_group.size() == 1:
        return t
    S, cp = t.shape[dim], cp_group.size()
    check_context_parallel(S, cp, what="sequence length of the batch")
    return t.index_select(dim, local_position_index(S, cp, cp_group.rank(), t.device))


def cp_slice_batch(batch: dict, cp_group, dim: int = 1) -> dict:
    """`cp_slice` of every tensor of a batch dict (None stays None)."""
    return {k: None if v is None else cp_slice(v, cp_group, dim) for k, v in batch.items()}


class _RegatherInBackward:
    """saved_tensors_hooks that keep the local K/V instead of the gathered ones: every tensor
    autograd saves that is a view of `kv_natural` is stored as (offset, size, stride) and
    rebuilt in backward from a second all-gather (done once, on first use)."""

    def __init__(self, kv_local: Tensor, kv_natural: Tensor, group):
        self.kv_local, self.group = kv_local.detach(), group
        self.storage_ptr = kv_natural.untyped_storage().data_ptr()
        self.gathered: Optional[Tensor] = None

    def pack(self, t: Tensor):
        if t.untyped_storage().data_ptr() == self.storage_ptr:
            return (self, t.storage_offset(), tuple(t.shape), t.stride())
        return t

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        self, offset, shape, stride = packed
        if self.gathered is None:
            kv = comm.all_gather_sequence_raw(self.kv_local, self.group)
            self.gathered = from_zigzag(kv, self.group.size(), dim=0)
        return self.gathered.as_strided(shape, stride, offset)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _ChunkAttention(torch.autograd.Function):
    """One chunk against its causal prefix with TSP's kernels (`megatron_tsp.tsp.kernels`: cuDNN
    split on GPUs, math on CPU), so the CP baseline runs the same attention kernels as TSP."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, backend: str, mask=None):
        kw = {} if mask is None else {"mask": mask}
        o, lse = chunk_forward(q, k, v, scale, backend, **kw)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.scale, ctx.backend = scale, backend
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        kw = {} if mask is None else {"mask": mask}
        dq, dk, dv = chunk_backward(do, q, k, v, o, lse, ctx.scale, ctx.backend, **kw)
        return dq, dk, dv, None, None, None


def attend_chunks_to_prefix(q: Tensor, k: Tensor, v: Tensor, chunk_starts, scale: float,
                            backend: str = "auto", doc_ids: Optional[Tensor] = None) -> Tensor:
    """q [s, b, np, hn] (the two local chunks, s = 2c), k/v [L, b, ng, hn] in natural order ->
    [s, b, np * hn]: each chunk against its causal prefix [0, start + c), lower-right causal.
    With document ids [b, L] (packed sequences): against [its first document's start, start + c)
    under the document mask, as TSP attention."""
    s, b, np_, hn = q.shape
    c = s // 2
    backend = resolve_backend(backend, q, masked=doc_ids is not None)
    firsts = key_starts(doc_ids, chunk_starts) if doc_ids is not None else (0,) * len(chunk_starts)
    outs = []
    for i, start in enumerate(chunk_starts):
        lo = firsts[i]
        mask = None if doc_ids is None else chunk_mask(doc_ids, start, c, lo, start + c)
        q_chunk = q[i * c : (i + 1) * c].permute(1, 2, 0, 3)  # [b, np, c, hn]
        k_prefix, v_prefix = (t[lo : start + c].permute(1, 2, 0, 3) for t in (k, v))  # [b, ng, L, hn]
        o = _ChunkAttention.apply(q_chunk, k_prefix, v_prefix, scale, backend, mask)
        outs.append(o.permute(2, 0, 1, 3).reshape(c, b, np_ * hn))
    return torch.cat(outs, dim=0)


@dataclass(frozen=True)
class RingShard:
    """What `tsp.streamed_attention.stream_forward` / `stream_backward` read of their shard
    (`tsp.attention.AttentionShard`'s fields), for the CP group's one head set: the ring is the
    CP group, the heads those of this TP rank."""

    group: object
    heads: int
    groups: int
    head_dim: int
    softmax_scale: float
    chunk_starts: tuple  # true start positions of the two local zigzag chunks
    chunk_len: int
    backend: str = "auto"
    # packed sequences: document ids [b, S] (natural order) and `documents.chunk_links` of them
    doc_ids: Optional[Tensor] = None
    doc_links: Optional[tuple] = None


class _RingAttention(torch.autograd.Function):
    """o = ring attention of the local queries against every rank's K/V (cp_comm_type p2p).
    Saves q, the local [k | v], o and the log-sum-exps: never K/V of other ranks."""

    @staticmethod
    def forward(ctx, q, k, v, shard: RingShard):
        kv = torch.cat([k, v], dim=-1)  # [s, b, ng, 2hn]: one ring hop carries K and V
        o, lse = stream_forward(shard, q, kv)
        ctx.save_for_backward(q, kv, o, lse)
        ctx.shard = shard
        return o

    @staticmethod
    def backward(ctx, do):
        q, kv, o, lse = ctx.saved_tensors
        dq, (dkv, requests, sent) = stream_backward(ctx.shard, do.contiguous(), q, kv, o, lse)
        comm.wait_all(requests)  # the last dK/dV hop brings this rank's sum home
        del sent  # alive until its hop completed
        dkv = dkv.to(kv.dtype)
        hn = ctx.shard.head_dim
        return dq, dkv[..., :hn], dkv[..., hn:], None


class ContextParallelAttention(MegatronModule):
    """Core attention (Megatron's `SelfAttentionSubmodules.core_attention` contract, as
    `DotProductAttention` / `SDPACoreAttention`) with context parallelism over
    `pg_collection.cp`: K/V all-gathered along the sequence, each local zigzag chunk against its
    causal prefix (`cp_comm_type` None or "all_gather"), or streamed around the CP ring ("p2p",
    from TransformerConfig.cp_comm_type). Heads are split by TP
    (`pg_collection.tp`) as in Megatron; composes with sequence parallelism (the layer's
    linear_qkv all-gathers the CP rank's tokens over TP).

    Causal self-attention only; an attention_mask of document ids [b, S] (packed sequences,
    `megatron_tsp.tsp.documents`: the whole sequence, natural order) masks each document, any
    other is ignored (as in Megatron's TE/flash paths); no dropout, THD packed_seq_params,
    attention bias or sliding windows."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        *,
        pg_collection: ProcessGroupCollection,
    ):
        super().__init__(config=config)
        require_group(pg_collection, "ContextParallelAttention", "pg_collection")
        self.tp_group = require_group(getattr(pg_collection, "tp", None), "ContextParallelAttention", "pg_collection.tp")
        self.cp_group = require_group(getattr(pg_collection, "cp", None), "ContextParallelAttention", "pg_collection.cp")
        if config.context_parallel_size != self.cp_group.size():
            raise TSPConfigError(f"TransformerConfig.context_parallel_size = {config.context_parallel_size} but the "
                                 f"context-parallel group has {self.cp_group.size()} ranks")
        if cp_comm_type is not None and cp_comm_type not in CP_COMM_TYPES:
            raise TSPConfigError(f"cp_comm_type = {cp_comm_type!r} (parallel.cp_comm_type): ContextParallelAttention "
                                 f"implements {' and '.join(CP_COMM_TYPES)}")
        self.cp_comm_type = cp_comm_type or "all_gather"
        if attn_mask_type not in _CAUSAL_TYPES:
            raise TSPConfigError(f"ContextParallelAttention supports causal masks only, got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise TSPConfigError(f"ContextParallelAttention does not support attention dropout ({dropout})")
        if config.window_size is not None:
            raise TSPConfigError(f"ContextParallelAttention does not support sliding-window attention ({config.window_size})")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise TSPConfigError(f"ContextParallelAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        tp = self.tp_group.size()
        for what, value in (("num_attention_heads", config.num_attention_heads), ("num_query_groups", config.num_query_groups)):
            if value % tp:
                raise TSPConfigError(f"{what} = {value} must be divisible by the tensor-parallel size {tp}")
        self.layer_number = max(1, layer_number)
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        head_dim = divide(config.kv_channels * config.num_attention_heads, config.num_attention_heads)
        # As DotProductAttention: query-key layer scaling divides and the softmax multiplies back.
        self.softmax_scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
        self.regather_kv_in_backward = True
        """Gather K/V again in backward (TE's memory profile) instead of saving the gathered K/V."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """[s, b, np, hn], [s, b, ng, hn] x2 (this CP rank's tokens, zigzag) -> [s, b, np * hn]."""
        if packed_seq_params is not None:
            raise TSPConfigError("ContextParallelAttention does not support packed sequences (packed_seq_params)")
        if attention_bias is not None:
            raise TSPConfigError("ContextParallelAttention does not support attention_bias")
        if attn_mask_type is not None and attn_mask_type not in _CAUSAL_TYPES:
            raise TSPConfigError(f"ContextParallelAttention supports causal masks only, got {attn_mask_type}")
        s, hn = query.shape[0], query.shape[3]
        if key.shape[0] != s:
            raise TSPConfigError(f"ContextParallelAttention is self-attention: {s} queries but {key.shape[0]} keys")
        group = self.cp_group
        cp, r = group.size(), group.rank()
        S = s * cp
        check_context_parallel(S, cp, what=f"sequence length ({s} local tokens x context-parallel size)",
                               cp_key="context-parallel size")
        if s % 2:
            raise TSPConfigError(f"ContextParallelAttention needs an even number of local tokens, got {s}")
        doc_ids = None
        if is_document_ids(attention_mask):  # before the all-gather / the first ring hop
            check_document_ids(attention_mask, query.shape[1], S, what=DOC_IDS)
            doc_ids = attention_mask.to(query.device)
            resolve_backend("auto", query, masked=True)
        if self.cp_comm_type == "p2p":
            # the streamed blocks take each block's document mask (and skip the hidden ones) from these
            documents = {} if doc_ids is None else {"doc_ids": doc_ids, "doc_links": chunk_links(doc_ids, s // 2)}
            shard = RingShard(group, query.shape[2], key.shape[2], hn, self.softmax_scale,
                              tuple(local_chunk_starts(S, cp, r)), s // 2, **documents)
            return _RingAttention.apply(query, key, value, shard)
        kv_local = torch.cat([key, value], dim=-1)  # [s, b, ng, 2hn]: one all-gather for K and V
        kv_natural = from_zigzag(comm.all_gather_sequence(kv_local, group), cp, dim=0)
        k, v = kv_natural[..., :hn], kv_natural[..., hn:]
        starts = local_chunk_starts(S, cp, r)
        if cp > 1 and self.regather_kv_in_backward and torch.is_grad_enabled():
            with _RegatherInBackward(kv_local, kv_natural, group).hooks():
                return attend_chunks_to_prefix(query, k, v, starts, self.softmax_scale, doc_ids=doc_ids)
        return attend_chunks_to_prefix(query, k, v, starts, self.softmax_scale, doc_ids=doc_ids)
