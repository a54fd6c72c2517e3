"""The baselines' layer and block specs (layouts dp, tp, tp_sp of `megatron_tsp.layouts`):
Megatron's native local GPT layer with sequence-parallel-capable norms (TSPNorm), optionally
another core attention (SDPA, context parallelism) and the token-tiled MLP. The reference of the
parity tests."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from .. import compat
from ..config import require_group
from ..tsp.specs import block_submodules, local_spec_with_sp_norms
from ..tsp.tiled_mlp import TiledMLP


def get_sp_layer_spec(config, core_attention=None, moe: bool = False, mlp_chunk_tokens: int = 0,
                      tp_group=None) -> ModuleSpec:
    """Megatron's native local layer (TP, TP + sequence parallelism) with norms that accept
    sequence parallelism: the baseline and the reference of the parity tests. `core_attention`
    replaces Megatron's DotProductAttention (e.g. SDPACoreAttention for long contexts).
    `moe=True`: Megatron's own local MoE MLP (MoELayer, SequentialMLP, SharedExpertMLP).
    `mlp_chunk_tokens` > 0: the dense MLP runs on token chunks (`tsp.tiled_mlp.TiledMLP`, Megatron's
    MLP otherwise; parallel.mlp_chunk_tokens) on `tp_group` (required then: the layer's TP group)."""
    spec = local_spec_with_sp_norms(config, config.num_moe_experts if moe else None)
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    if mlp_chunk_tokens and not moe:
        require_group(tp_group, "get_sp_layer_spec(mlp_chunk_tokens > 0)", "tp_group")
        mlp = spec.submodules.mlp
        spec.submodules.mlp = compat.mlp_spec(mlp, TiledMLP, compat.mlp_submodules(mlp), tp_group=tp_group,
                                              mlp_chunk_tokens=mlp_chunk_tokens)
    return spec


def get_sp_block_spec(config, vp_stage=None, pp_rank=None, core_attention=None, mlp_chunk_tokens: int = 0,
                      tp_group=None) -> TransformerBlockSubmodules:
    """The decoder block of the baselines' GPTModel (`get_sp_layer_spec` per layer, MoE layers
    where `config.moe_layer_freq` puts them; `pp_rank` required)."""
    return block_submodules(config, lambda moe: get_sp_layer_spec(config, core_attention, moe=moe,
                                                                  mlp_chunk_tokens=mlp_chunk_tokens,
                                                                  tp_group=tp_group), vp_stage, pp_rank)
