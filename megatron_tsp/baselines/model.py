"""The baselines' model builder (layouts dp, tp, tp_sp of `megatron_tsp.layouts`): Megatron's
GPTModel on the block spec of `baselines/specs.py`, its core attention picked from the groups."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel

from ..config import TSPOptions
from .context_parallel import ContextParallelAttention
from .sdpa_attention import SDPACoreAttention
from .specs import get_sp_block_spec


def build_native_gpt(config, *, pg_collection, tsp_options: Optional[TSPOptions] = None,
                     core_attention: str = "local", **gpt_kwargs) -> GPTModel:
    """Megatron's GPTModel with the local spec on `pg_collection` (the registry's builder of the
    baselines; `training.build.build_gpt` calls it). Core attention: ContextParallelAttention
    when the context group has more than one rank, else torch SDPA (`core_attention` sdpa / cp)
    or Megatron's DotProductAttention (local). Of `tsp_options` only `mlp_chunk_tokens` applies
    (the token-tiled MLP). `gpt_kwargs`: GPTModel's other keyword arguments."""
    if pg_collection.cp.size() > 1:
        core = ContextParallelAttention
    else:
        core = SDPACoreAttention if core_attention in ("sdpa", "cp") else None
    chunk = tsp_options.mlp_chunk_tokens if tsp_options is not None else 0
    spec = get_sp_block_spec(config, pp_rank=pg_collection.pp.rank(), core_attention=core, mlp_chunk_tokens=chunk,
                             tp_group=pg_collection.tp)
    return GPTModel(config, spec, pg_collection=pg_collection, **gpt_kwargs)
