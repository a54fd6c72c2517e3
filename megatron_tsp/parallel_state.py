"""The TSP axis: Megatron's process groups with the TSP group in the tensor-parallel slot.

A TSP rank is a weight-shard owner that also owns a token shard, so Megatron's data-,
pipeline- and expert-parallel groups, DDP, the sum of sequence-parallel norm gradients,
grad clipping, the distributed optimizer and dist-checkpointing all apply unchanged
(docs/design.md §9). `initialize_model_parallel` (TSP) and `initialize_native_model_parallel`
(the baselines: DP, TP, TP + SP, CP) build the groups and return them as one
`ProcessGroupCollection` (`.tp` is the TSP group); the caller keeps it and hands it to every
builder, train step and checkpoint call. This module keeps no group of its own, and no module
reads Megatron's global getters: the collection is read from them here once, right after
Megatron's `initialize_model_parallel` set them. Nothing is written into
`megatron.core.parallel_state` beyond what Megatron's own `initialize_model_parallel` sets (which
Megatron-LM reads). After Megatron-LM's own initialization, megatron-core's
`ProcessGroupCollection.use_mpu_process_groups()` gives the same collection.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.process_groups_config import ProcessGroupCollection

from . import compat  # noqa: F401  (the megatron-core version check, once)
from .config import TSPConfigError, check_parallel_sizes, check_tsp_size, check_world_size


def initialize_model_parallel(tsp_size: int = 1, pipeline_model_parallel_size: int = 1,
                              **kwargs) -> ProcessGroupCollection:
    """`megatron.core.parallel_state.initialize_model_parallel` with a TSP axis of size
    `tsp_size` in the TP slot. Other keyword arguments go to Megatron unchanged; native TP
    and CP are refused. `expert_model_parallel_size` = EP (experts 1/EP per rank) is built
    next to the TSP axis by Megatron's expert rank generator with expert TP = 1: EP = D gives
    EP groups equal to the TSP groups, EP = D x k spans k TSP groups of consecutive
    data-parallel ranks; expert-DP = world / (EP x PP). Validates before creating any group.
    Returns the groups as one ProcessGroupCollection (`.tp` is the TSP group): keep it, every
    builder takes it (`pg_collection`)."""
    from .config import check_expert_parallel

    check_tsp_size(tsp_size)
    check_parallel_sizes(kwargs.pop("tensor_model_parallel_size", 1), kwargs.get("context_parallel_size", 1))
    if not dist.is_initialized():
        raise TSPConfigError("torch.distributed must be initialized before initialize_model_parallel")
    check_world_size(dist.get_world_size(), tsp_size, pipeline_model_parallel_size)
    ep = kwargs.get("expert_model_parallel_size", 1)
    etp = kwargs.get("expert_tensor_parallel_size", 1)
    check_expert_parallel(None, ep, dist.get_world_size(), tsp_size,
                          pipeline_model_parallel_size, etp)
    kwargs["expert_tensor_parallel_size"] = 1  # Megatron's default (= TP) would gather tokens over TSP
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tsp_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )
    return _collect()


def initialize_native_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                                     context_parallel_size: int = 1, **kwargs) -> ProcessGroupCollection:
    """The baselines' groups (`build_gpt(layout='dp' | 'tp' | 'tp_sp')`, with CP and TP x CP):
    `megatron.core.parallel_state.initialize_model_parallel` unchanged, its groups returned as one
    ProcessGroupCollection (`.tp` the TP group, `.cp` the context-parallel group)."""
    if not dist.is_initialized():
        raise TSPConfigError("torch.distributed must be initialized before initialize_native_model_parallel")
    mpu.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size,
                                  pipeline_model_parallel_size=pipeline_model_parallel_size,
                                  context_parallel_size=context_parallel_size, **kwargs)
    return _collect()


def _collect() -> ProcessGroupCollection:
    """The groups Megatron's initialize_model_parallel just built, as one collection: the one
    read of its global getters, where they are set (the caller keeps the collection)."""
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel, which only forgets the groups, plus destroying them:
    each gloo group holds threads, and re-initializing without this leaks them."""
    for group in (getattr(mpu, "_global_process_group_list", None) or [])[1:]:  # [0] is WORLD
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
    mpu.destroy_model_parallel()  # forgets the list too
    _forget_dtensor_meshes()
    _forget_rope_modules()


def _forget_rope_modules() -> None:
    """Megatron's RotaryEmbedding.forward (and YaRN's) is an lru_cache keyed by the module, which
    holds its CP group: a destroyed group stayed alive there with its gloo threads (3 per model
    built, hundreds in a long test process or a bench sweep) and its RoPE table."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    caches = [rotary_pos_embedding.RotaryEmbedding.forward]
    try:
        from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding

        caches.append(yarn_rotary_pos_embedding.YarnRotaryEmbedding.forward)
    except ImportError:  # pragma: no cover - older megatron-core
        pass
    for forward in caches:
        if hasattr(forward, "cache_clear"):
            forward.cache_clear()


def _forget_dtensor_meshes() -> None:
    """DTensor caches sharding decisions by device mesh, and two meshes over the same ranks
    compare equal whatever their process groups: after the groups are rebuilt, a cached decision
    would name a destroyed group (FSDP over CP, `baselines.fsdp`, re-initialized in one process)."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache  # Python and C++ caches
    except ImportError:  # pragma: no cover - other torch versions
        return
    _clear_sharding_prop_cache()

