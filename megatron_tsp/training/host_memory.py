"""The node's host memory against what a run offloads to it (issue 26): the checkpointed layer
inputs of parallel.offload_activations and the optimizer state of train.optimizer_cpu_offload,
for every process of the node, counted with the planner's formulas (planner.formulas:
`checkpointed_inputs`, HOST_OPTIMIZER_BYTES_PER_PARAM). The driver checks it after building the
model (whose parameters it counts) and before the optimizer allocates its host state: every
rank raises the same one-line RecipeError before the first step, naming the keys."""

from __future__ import annotations

from typing import Dict, Optional

from .recipe import RecipeError

GIB = 2**30


class HostMemoryError(RecipeError):
    """A run whose offloaded tensors do not fit the node's host memory."""


def node_host_memory_gib(meminfo: str = "/proc/meminfo") -> Optional[float]:
    """This node's MemTotal in GiB (None where /proc/meminfo is not there to read)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None


def host_need_per_rank(recipe, local_params: int, dp_cp: int) -> Dict[str, float]:
    """Bytes of host memory one process pins: {'optimizer': ..., 'inputs': ...}.
    `local_params`: the parameters of this rank's model shard; `dp_cp`: the size of the group the
    distributed optimizer shards them over (data x context)."""
    from ..planner.formulas import HOST_OPTIMIZER_BYTES_PER_PARAM, checkpointed_inputs

    m, p, t = recipe.model, recipe.parallel, recipe.train
    out = {"optimizer": 0.0, "inputs": 0.0}
    if t.optimizer_cpu_offload:
        out["optimizer"] = local_params / dp_cp * t.optimizer_offload_fraction * HOST_OPTIMIZER_BYTES_PER_PARAM
    if p.offload_activations:
        stage_layers = m.num_layers // p.pipeline_size
        inputs = checkpointed_inputs(stage_layers, p.recompute, p.recompute_method, p.recompute_num_layers)
        # the norm / residual region's tokens of this rank: split by TSP / TP+SP and by CP
        g = recipe.group_sizes()
        shards = (g.axis if recipe.layout().sequence_parallel else 1) * g.cp
        dtype_bytes = 2 if m.dtype == "bfloat16" else 4
        # 1F1B keeps up to pipeline_size micro-batches in flight on the first stage
        out["inputs"] = (inputs * t.micro_batch_size * m.seq_length / shards * m.hidden_size * dtype_bytes
                         * p.pipeline_size)
    return out


def check_host_memory(recipe, local_params: int, dp_cp: int, ranks_per_node: int,
                      meminfo: str = "/proc/meminfo") -> Optional[float]:
    """Raise HostMemoryError when the node's processes would offload more than the node's host
    memory (train.host_memory_gb, else MemTotal); returns the need per node in bytes (None when
    nothing is offloaded)."""
    t, p = recipe.train, recipe.parallel
    if not (t.optimizer_cpu_offload or p.offload_activations):
        return None
    need = host_need_per_rank(recipe, local_params, dp_cp)
    per_node = sum(need.values()) * ranks_per_node
    host = t.host_memory_gb if t.host_memory_gb is not None else node_host_memory_gib(meminfo)
    if host is not None and per_node > host * GIB:
        where = "train.host_memory_gb" if t.host_memory_gb is not None else "this node's MemTotal"
        parts = [f"{need['optimizer'] / GIB:.3g} GiB optimizer state (train.optimizer_cpu_offload)"
                 if need["optimizer"] else "",
                 f"{need['inputs'] / GIB:.3g} GiB layer inputs (parallel.offload_activations)"
                 if need["inputs"] else ""]
        raise HostMemoryError(
            f"the offloaded tensors need {per_node / GIB:.3g} GiB of host memory per node ({ranks_per_node} processes "
            f"x {' + '.join(x for x in parts if x)}) but {where} = {host:.3g} GiB: offload less "
            "(train.optimizer_offload_fraction, parallel.recompute_num_layers), use more nodes, or set "
            "train.host_memory_gb to what the node really has")
    return per_node
