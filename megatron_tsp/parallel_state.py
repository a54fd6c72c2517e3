"""The TSP axis: Megatron's process groups with the TSP group in the tensor-parallel slot.

A TSP rank is a weight-shard owner that also owns a token shard, so Megatron's data-,
pipeline- and expert-parallel groups, DDP, the sum of sequence-parallel norm gradients,
grad clipping, the distributed optimizer and dist-checkpointing all apply unchanged
(docs/design.md §9). `initialize_model_parallel` registers the getters below on
`megatron.core.parallel_state`, next to Megatron's pipeline and expert getters (importing this
module patches nothing); modules still take their group explicitly.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.process_groups_config import ProcessGroupCollection

from . import compat  # noqa: F401  (the megatron-core version check, once)
from .config import TSPConfigError, check_parallel_sizes, check_tsp_size, check_world_size


def initialize_model_parallel(tsp_size: int = 1, pipeline_model_parallel_size: int = 1, **kwargs) -> None:
    """`megatron.core.parallel_state.initialize_model_parallel` with a TSP axis of size
    `tsp_size` in the TP slot. Other keyword arguments go to Megatron unchanged; native TP,
    CP and expert parallelism are refused. Validates before creating any group."""
    check_tsp_size(tsp_size)
    check_parallel_sizes(
        kwargs.pop("tensor_model_parallel_size", 1),
        kwargs.get("context_parallel_size", 1),
        kwargs.get("expert_model_parallel_size", 1),
    )
    if not dist.is_initialized():
        raise TSPConfigError("torch.distributed must be initialized before initialize_model_parallel")
    check_world_size(dist.get_world_size(), tsp_size, pipeline_model_parallel_size)
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tsp_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )
    mpu._TENSOR_AND_SEQUENCE_PARALLEL_GROUP = mpu.get_tensor_model_parallel_group()
    _register_getters()


def destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel, which only forgets the groups, plus destroying them:
    each gloo group holds threads, and re-initializing without this leaks them."""
    mpu._TENSOR_AND_SEQUENCE_PARALLEL_GROUP = None
    for group in (getattr(mpu, "_global_process_group_list", None) or [])[1:]:  # [0] is WORLD
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
    mpu._global_process_group_list = None
    mpu.destroy_model_parallel()
    _forget_dtensor_meshes()


def _forget_dtensor_meshes() -> None:
    """DTensor caches sharding decisions by device mesh, and two meshes over the same ranks
    compare equal whatever their process groups: after the groups are rebuilt, a cached decision
    would name a destroyed group (FSDP over CP, `baselines.fsdp`, re-initialized in one process)."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache  # Python and C++ caches
    except ImportError:  # pragma: no cover - other torch versions
        return
    _clear_sharding_prop_cache()


def get_tsp_group():
    group = getattr(mpu, "_TENSOR_AND_SEQUENCE_PARALLEL_GROUP", None)
    if group is None:
        raise RuntimeError("the TSP group is not initialized: call megatron_tsp.initialize_model_parallel")
    return group


def get_tsp_world_size() -> int:
    return get_tsp_group().size()


def get_tsp_rank() -> int:
    return get_tsp_group().rank()


def tsp_process_groups() -> ProcessGroupCollection:
    """Megatron's ProcessGroupCollection of the current groups; `.tp` is the TSP group."""
    return ProcessGroupCollection.use_mpu_process_groups()


def _register_getters() -> None:
    """Put the TSP getters beside Megatron's get_pipeline_model_parallel_group / get_expert_*
    ones. Done by initialize_model_parallel, never at import (importing patches nothing)."""
    mpu.get_tensor_and_sequence_parallel_group = get_tsp_group
    mpu.get_tensor_and_sequence_parallel_world_size = get_tsp_world_size
    mpu.get_tensor_and_sequence_parallel_rank = get_tsp_rank
