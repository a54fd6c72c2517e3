"""Layer and block specs: Megatron's local GPT spec with TSP's attention, ring MLP and
sequence-parallel-capable norms swapped in. Everything else (linear layers as shard holders,
bias-dropout-add, checkpoint key map) stays Megatron's, so TSP checkpoints are native-TP ones."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

import logging

from .. import compat
from .attention import TSPSelfAttention
from ..config import TSPOptions
from .mlp import TSPRingMLP
from .norm import TSPNorm


class _QuietTSPMLPNotice(logging.Filter):
    """TransformerLayer logs "Unknown MLP type" for any MLP subclass; ours is known."""

    def filter(self, record):
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_QuietTSPMLPNotice())


def _local_spec_with_sp_norms(config) -> ModuleSpec:
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=config.normalization))
    spec.submodules.input_layernorm = TSPNorm
    spec.submodules.pre_mlp_layernorm = TSPNorm
    return spec


def get_tsp_layer_spec(config, tsp_group=None, tsp_options: Optional[TSPOptions] = None) -> ModuleSpec:
    """A TransformerLayer spec running TSP attention and the ring MLP on `tsp_group`
    (Megatron's TP group when None), as `tsp_options` says (recompute, kernel)."""
    options = tsp_options or TSPOptions()
    spec = _local_spec_with_sp_norms(config)
    attention = spec.submodules.self_attention
    spec.submodules.self_attention = ModuleSpec(
        module=TSPSelfAttention, params={**attention.params, "tsp_options": options}, submodules=attention.submodules
    )
    mlp = spec.submodules.mlp
    # Up to megatron-core 0.17 TransformerLayer builds the MLP with `config` only, so the group
    # rides in params; from 0.18 it passes `pg_collection` (TSPRingMLP.as_mlp_submodule).
    spec.submodules.mlp = compat.mlp_spec(
        mlp, TSPRingMLP, compat.mlp_submodules(mlp), tp_group=tsp_group, tsp_options=options
    )
    return spec


def get_sp_layer_spec(config, core_attention=None) -> ModuleSpec:
    """Megatron's native local layer (TP, TP + sequence parallelism) with norms that accept
    sequence parallelism: the baseline and the reference of the parity tests. `core_attention`
    replaces Megatron's DotProductAttention (e.g. SDPACoreAttention for long contexts)."""
    spec = _local_spec_with_sp_norms(config)
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def _block(config, layer_spec, vp_stage: Optional[int], pp_rank: Optional[int]) -> TransformerBlockSubmodules:
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=TSPNorm)


def get_tsp_block_spec(config, vp_stage=None, pp_rank=None, tsp_group=None,
                       tsp_options: Optional[TSPOptions] = None) -> TransformerBlockSubmodules:
    """The decoder block of a TSP GPT model (the final norm sequence-parallel-capable too)."""
    return _block(config, get_tsp_layer_spec(config, tsp_group, tsp_options), vp_stage, pp_rank)


def get_sp_block_spec(config, vp_stage=None, pp_rank=None, core_attention=None) -> TransformerBlockSubmodules:
    return _block(config, get_sp_layer_spec(config, core_attention), vp_stage, pp_rank)
