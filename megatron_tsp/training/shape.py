"""The GPT model's shape: the recipe's `model` keys, read by `training.recipe` without torch or
megatron (so `megatron-tsp train --help` starts fast); `training.build` builds models from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelShape:
    """A GPT model's shape. Field names follow Megatron's flags."""

    num_layers: int = 2
    """Transformer layers (--num-layers)."""
    hidden_size: int = 64
    """Hidden size h (--hidden-size)."""
    num_attention_heads: int = 4
    """Query heads (--num-attention-heads)."""
    num_query_groups: Optional[int] = None
    """KV groups for GQA (--num-query-groups); null for MHA."""
    ffn_hidden_size: int = 128
    """MLP width (--ffn-hidden-size)."""
    vocab_size: int = 128
    """Vocabulary size (padded); mock data draws tokens below it."""
    seq_length: int = 64
    """Tokens per sequence (--seq-length); a multiple of 2 x tsp_size under TSP."""
    swiglu: bool = True
    """Gated SiLU MLP (--swiglu); false: GELU."""
    add_bias_linear: bool = False
    """Biases in the linear layers."""
    normalization: str = "RMSNorm"
    """LayerNorm or RMSNorm."""
    position_embedding_type: str = "rope"
    """rope or learned_absolute."""
    share_embeddings_and_output_weights: bool = False
    """Tie the input embedding and the LM head."""
