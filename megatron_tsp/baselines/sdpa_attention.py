"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, for baselines.

`SDPACoreAttention` is a drop-in replacement for Megatron's local `DotProductAttention` in
`SelfAttentionSubmodules.core_attention`: same constructor, same layouts (query
[sq, b, np, hn], key/value [sk, b, ng, hn] in, context [sq, b, np * hn] out), same softmax
scale and the same masking rules, but the scores go through PyTorch's fused attention
kernels (flash / memory-efficient on CUDA), so the [b, np, sq, sk] score matrix is never
materialized. It lets the native TP and TP + sequence-parallel baselines reach long contexts
without Transformer Engine. `get_sdpa_layer_spec` is the native local layer spec with it.

Packed sequences: document ids as `attention_mask` (see SDPACoreAttention). Not supported (a
ValueError at construction or in forward): context parallelism, THD packed_seq_params,
attention bias, sliding-window attention, non-vanilla softmax types and
num_query_groups < tensor-parallel size.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from ..config import require_group
from ..tsp.documents import WHAT as DOC_IDS, check_document_ids, full_mask, is_document_ids
from .specs import get_sp_layer_spec

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)


class SDPACoreAttention(MegatronModule):
    """Megatron's `DotProductAttention` contract on PyTorch's scaled_dot_product_attention.

    Masks follow DotProductAttention: with a causal mask type the causal mask is applied by
    the kernel (`is_causal=True`; a given `attention_mask` is then ignored, as in Transformer
    Engine's and TSP's attention), unless it is document ids [b, S] (an integer tensor: packed
    sequences, `megatron_tsp.tsp.documents`), then causal within each document; with any other
    type a given `attention_mask` (boolean,
    Megatron's convention: True = masked out, broadcastable to [b, np, sq, sk]) is applied,
    and none means no masking.
    """

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
        self.config: TransformerConfig = config

        if config.context_parallel_size > 1:
            raise ValueError(
                f"SDPACoreAttention does not support context parallelism "
                f"(context_parallel_size={config.context_parallel_size})"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPACoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"SDPACoreAttention does not support sliding-window attention (window_size={config.window_size})")

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in DotProductAttention

        require_group(pg_collection, "SDPACoreAttention", "pg_collection")
        require_group(getattr(pg_collection, "tp", None), "SDPACoreAttention", "pg_collection.tp")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp

        world_size = pg_collection.tp.size()
        if config.num_query_groups < world_size:
            raise ValueError(
                f"SDPACoreAttention needs num_query_groups ({config.num_query_groups}) >= "
                f"tensor-parallel size ({world_size})"
            )
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)

        # DotProductAttention divides its scale by layer_number under
        # apply_query_key_layer_scaling and its softmax multiplies the scores back by
        # layer_number (a no-op up to rounding, for fp16 range), so the effective scale is:
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None else softmax_scale
        )
        self.attention_dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """[sq, b, np, hn], [sk, b, ng, hn] x2 -> [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention does not support packed sequences (THD / packed_seq_params)")
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        if np_ % ng:
            raise ValueError(f"query heads ({np_}) must be a multiple of key/value groups ({ng})")

        is_causal, sdpa_mask = False, None
        if mask_type in _CAUSAL_TYPES and is_document_ids(attention_mask):
            # packed sequences: causal within each document, the S x S mask Megatron's
            # create_attention_mask would build (the baseline's memory, not TSP's)
            check_document_ids(attention_mask, b, sk, what=DOC_IDS)
            if sq != sk:
                raise ValueError(f"SDPACoreAttention: document ids need sq == sk, got sq={sq}, sk={sk}")
            sdpa_mask = ~full_mask(attention_mask.to(query.device))
        elif mask_type in _CAUSAL_TYPES:
            # DotProductAttention: no mask for a single query (KV-cache decoding); otherwise the
            # causal mask of a square score matrix.
            if sq > 1:
                if sq != sk:
                    raise ValueError(f"SDPACoreAttention: a causal mask needs sq == sk, got sq={sq}, sk={sk}")
                is_causal = True
        elif attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"attention_mask must be boolean (True = masked out), got {attention_mask.dtype}")
            sdpa_mask = ~attention_mask  # SDPA's boolean mask: True = take part in attention

        # [s, b, n, hn] -> [b, n, s, hn] (views; the head dim stays contiguous)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = ng != np_
        if gqa and not native_gqa_ok(q):
            # Expand K/V as DotProductAttention does (O(s) memory), so that a fused kernel
            # without GQA support (memory-efficient) can run instead of the S x S math path.
            k, v = (t.repeat_interleave(np_ // ng, dim=1) for t in (k, v))
            gqa = False
        dropout_p = self.attention_dropout_p if self.training else 0.0
        # As DotProductAttention: attention dropout under the model-parallel RNG state unless
        # sequence parallelism is on.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0.0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=gqa,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def native_gqa_ok(q: Tensor) -> bool:
    """Whether to hand grouped K/V to SDPA (`enable_gqa=True`) rather than expanding them.

    On CUDA only the flash and cuDNN kernels take grouped K/V, and neither runs float32: there
    `enable_gqa=True` falls back to the math kernel, which materializes the S x S scores
    (seen with torch 2.11 on an H200: fp32 GQA at S=4096 used ~2 GiB vs ~80 MiB expanded).
    On the CPU every path is fine."""
    return q.device.type != "cuda" or q.dtype in (torch.float16, torch.bfloat16)


def get_sdpa_layer_spec(config) -> ModuleSpec:
    """Megatron's native local layer (TP, TP + sequence parallelism, as `get_sp_layer_spec`)
    with `SDPACoreAttention` as its core attention."""
    spec = copy.deepcopy(get_sp_layer_spec(config))
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
