"""Weights, gradients and optimizer state ZeRO-3-sharded over the data x context-parallel group
("FSDP over CP"): the baseline closest to TSP's idea of weights travelling to the tokens
(docs/design.md §7), with a conventional schedule.

Implementation: megatron-core's own `TorchFullyShardedDataParallel` (torch FSDP2 `fully_shard`
on every TransformerLayer, the embedding and the root module, over
`get_data_parallel_group(with_context_parallel=True)`), with Megatron's optimizer
(`get_megatron_optimizer`, not the distributed one: the parameters it sees are already the
local DTensor shards) and `finalize_model_grads`. Each layer's parameters are all-gathered
just before its forward and again before its backward, and freed after
(`reshard_after_forward=True`); gradients are reduce-scattered (averaged over data x context,
as Megatron DDP does) in backward, once per micro-batch.

megatron-core 0.16.1's Megatron-FSDP (`use_megatron_fsdp`) was not used: it needs its own
buffers, checkpoint format and CUDA; torch FSDP2 through Megatron's wrapper runs on CPU/gloo (CI)
and CUDA/NCCL with the local spec and the context-parallel attention unchanged. Two gaps of
the wrapper in 0.16.1 are closed here: `finalize_model_grads` calls
`finish_grad_sync(force_all_reduce=...)`, which its base class does not accept, and its
device mesh is hard-coded to CUDA (on CPU-only machines it is built on the CPU).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel

from .. import patches
from ..config import require_group


def _on_cpu(device_mesh):
    """Megatron's `DeviceMesh` whose `from_group` makes CPU meshes (it asks for cuda)."""

    class _CPUDeviceMesh:
        @staticmethod
        def from_group(group, device_type, *args, **kwargs):
            return device_mesh.from_group(group, "cpu", *args, **kwargs)

    return _CPUDeviceMesh


def _device_mesh_on_cpu_without_cuda():
    """`patches.FSDP_CPU_DEVICE_MESH` for the block, without CUDA."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return patches.applied(patches.FSDP_CPU_DEVICE_MESH, wrap=_on_cpu)


class FullyShardedOverDataAndContext(TorchFullyShardedDataParallel):
    """Megatron's TorchFullyShardedDataParallel on the data x context-parallel group, passed as
    `process_group` (`pg_collection.dp_cp`; required). The model's config must say `transformer_impl='local'`
    (true of every megatron_tsp model) so that the wrapper shards whole TransformerLayers,
    not their linear layers one by one."""

    def __init__(self, config, ddp_config, module, process_group):
        if config.transformer_impl != "local":
            raise ValueError(f"FSDP over CP wraps local-spec models: config.transformer_impl = "
                             f"{config.transformer_impl!r}, expected 'local'")
        group = require_group(process_group, "FullyShardedOverDataAndContext", "process_group")
        # FSDP2 shards each module's parameters as one flat group of one dtype ("FSDP expects
        # uniform original parameter dtype"): a guard, every parameter megatron_tsp builds
        # (TSPNorm's included) is already in the model's parameter dtype.
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != config.params_dtype:
                p.data = p.data.to(config.params_dtype)
        with _device_mesh_on_cpu_without_cuda():
            super().__init__(config, ddp_config, module, process_group=group)

    def finish_grad_sync(self, force_all_reduce: bool = False):
        """FSDP2 has reduce-scattered every gradient during backward: nothing left to do."""
