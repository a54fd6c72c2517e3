"""Layer and block specs: Megatron's local GPT spec with TSP's attention, MLP and
sequence-parallel-capable norms swapped in. Everything else (linear layers as shard holders,
bias-dropout-add, checkpoint key map) stays Megatron's, so TSP checkpoints are native-TP ones.
The baselines' spec (Megatron's layer with these norms) is `baselines/specs.py`'s."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .. import compat, patches
from .attention import TSPSelfAttention
from ..config import TSPOptions, require_group
from .mlp import TSPMLP
from .norm import TSPNorm


def local_spec_with_sp_norms(config, num_experts=None) -> ModuleSpec:
    """Megatron's local GPT layer spec with TSPNorm (sequence-parallel-capable) norms: the base
    of TSP's layer and of the baselines' (`baselines/specs.py`)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts, normalization=config.normalization,
                                                  moe_grouped_gemm=bool(getattr(config, "moe_grouped_gemm", False))))
    spec.submodules.input_layernorm = TSPNorm
    spec.submodules.pre_mlp_layernorm = TSPNorm
    return spec


def get_tsp_layer_spec(config, tsp_group=None, tsp_options: Optional[TSPOptions] = None, moe: bool = False) -> ModuleSpec:
    """A TransformerLayer spec running TSP attention and the TSP MLP on `tsp_group` (required;
    the layer's `pg_collection.tp` must be the same group), as `tsp_options` says. `moe=True`:
    the MLP is Megatron's MoELayer on this rank's tokens (`megatron_tsp.tsp.moe`; its groups come
    from the layer's pg_collection)."""
    require_group(tsp_group, "get_tsp_layer_spec", "tsp_group")
    patches.install(patches.UNKNOWN_MLP_NOTICE)  # TransformerLayer logs "Unknown MLP type" for ours (0.16.1)
    options = tsp_options or TSPOptions()
    spec = local_spec_with_sp_norms(config, config.num_moe_experts if moe else None)
    attention = spec.submodules.self_attention
    spec.submodules.self_attention = ModuleSpec(
        module=TSPSelfAttention, params={**attention.params, "tsp_options": options}, submodules=attention.submodules
    )
    mlp = spec.submodules.mlp
    if moe:
        from .moe import tsp_moe_mlp_spec

        spec.submodules.mlp = tsp_moe_mlp_spec(mlp, options)
        return spec
    # Up to megatron-core 0.17 TransformerLayer builds the MLP with `config` only, so the group
    # rides in params; from 0.18 it passes `pg_collection` (TSPMLP.as_mlp_submodule).
    spec.submodules.mlp = compat.mlp_spec(
        mlp, TSPMLP, compat.mlp_submodules(mlp), tp_group=tsp_group, tsp_options=options
    )
    return spec


def block_submodules(config, layer_spec, vp_stage: Optional[int], pp_rank: Optional[int]) -> TransformerBlockSubmodules:
    """A decoder block (final norm TSPNorm) of this pipeline stage's layers: `layer_spec(moe)`
    gives a layer's spec; MoE layers where `moe_layer_freq` puts them.
    `pp_rank` is required: Megatron reads its global pipeline rank when it is None."""
    if pp_rank is None:
        from ..config import TSPConfigError

        raise TSPConfigError("a block spec needs `pp_rank`, this rank's pipeline stage (pg_collection.pp.rank())")
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if not config.num_moe_experts:
        return TransformerBlockSubmodules(layer_specs=[layer_spec(False)] * n, layer_norm=TSPNorm)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from ..config import moe_layer_pattern

    pattern = moe_layer_pattern(config)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    specs = {is_moe: layer_spec(is_moe) for is_moe in set(pattern[offset:offset + n])}
    return TransformerBlockSubmodules(layer_specs=[specs[m] for m in pattern[offset:offset + n]], layer_norm=TSPNorm)


def get_tsp_block_spec(config, vp_stage=None, pp_rank=None, tsp_group=None,
                       tsp_options: Optional[TSPOptions] = None) -> TransformerBlockSubmodules:
    """The decoder block of a TSP GPT model (the final norm sequence-parallel-capable too);
    with `config.num_moe_experts`, MoE layers as `config.moe_layer_freq` says."""
    return block_submodules(config, lambda moe: get_tsp_layer_spec(config, tsp_group, tsp_options, moe=moe), vp_stage,
                            pp_rank)
