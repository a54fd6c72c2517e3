"""Model, DDP and optimizer set-up from megatron-core's own parts (the one training step and data
path are the driver's: training/loop.py). Layouts are those of `megatron_tsp.layouts`: `tsp`
(TSPGPTModel on the TSP group) and the baselines `dp`, `tp`, `tp_sp` (Megatron's GPTModel with
the local spec and sequence-parallel-capable norms), each built by its record's builder.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import TransformerConfig

from ..baselines.context_parallel import check_context_parallel
from ..compat import transformer_config_defaults
from ..config import ModelShape, TSPConfigError, TSPOptions, check_seq_length, validate_transformer_config  # noqa: F401 (ModelShape: its old home)
from ..config import require_group
from ..layouts import get_layout


def init_distributed(timeout_s: Optional[float] = None) -> str:
    """torch.distributed from torchrun's environment (a world of one without it):
    NCCL with one GPU per process when CUDA is present, else gloo on CPU. Patches nothing: an
    entry point that runs megatron-core on CPU installs the shims itself (`cpu.install_cpu_shims`).
    `timeout_s`: how long a collective may wait for its peers before it fails (torch's default
    when None); a group that already exists keeps its own."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from datetime import timedelta

        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=timedelta(seconds=timeout_s) if timeout_s is not None else None)
    return dist.get_backend()


def transformer_config(shape: ModelShape, tp_size: int, sequence_parallel: bool, dtype=torch.float32,
                       pipeline_size: int = 1, **kw) -> TransformerConfig:
    """Megatron's TransformerConfig of `shape` on `tp_size` (TP or TSP) ranks and `pipeline_size`
    stages; a config reads no group (`build_gpt` gives it the sizes of the groups it builds on,
    expert sizes included)."""
    cpu_init = kw.pop("use_cpu_initialization", True)  # TP-invariant init: same weights for every layout
    kw.setdefault("transformer_impl", "local")  # the local spec (no Transformer Engine layers)
    if shape.num_experts and "num_moe_experts" not in kw:
        from ..tsp.moe import moe_config_kwargs

        kw = {**moe_config_kwargs(shape), **kw}
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pipeline_size,
        sequence_parallel=sequence_parallel,
        add_bias_linear=shape.add_bias_linear,
        gated_linear_unit=shape.swiglu,
        activation_func=F.silu if shape.swiglu else F.gelu,
        bias_activation_fusion=False,
        normalization=shape.normalization,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=cpu_init,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **transformer_config_defaults(**kw),
    )


def _group_size(group) -> int:
    return group.size() if group is not None else 1


def _group_rank(group) -> int:
    return group.rank() if group is not None else 0


def resolve(ref: str):
    """The object a layout record names as `module:attribute` (`megatron_tsp.layouts`)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_gpt(shape: ModelShape, layout: str = "tsp", dtype=torch.float32, seed: int = 1234,
              sequence_parallel: Optional[bool] = None, core_attention: str = "local",
              tsp_options: Optional[TSPOptions] = None, offload_activations: bool = False, *,
              pg_collection: ProcessGroupCollection, **config_kw):
    """A GPT model on the process groups `pg_collection` (required: the collection
    `megatron_tsp.initialize_model_parallel` or `initialize_native_model_parallel` returned);
    every module of the model gets its group from it (`.tp` is the TSP / TP group, `.pp` the
    pipeline, `.cp` the context, `.ep` / `.expt_tp` the experts'). `layout`: a name of
    `megatron_tsp.layouts.LAYOUTS` (the recipe's parallel.layout), whose record's builder builds it.

    - `layout='tsp'`: TSPGPTModel, the TSP axis in the TP slot (`megatron_tsp.
      initialize_model_parallel(tsp_size=D)`), run as `tsp_options` say (recompute, attention
      kernel, compute-only). Takes full sequences.
    - Every layout: `tsp_options.mlp_chunk_tokens` > 0 runs the dense MLP on token chunks (TSP's
      exchanges tiled, or Megatron's MLP as `tsp.tiled_mlp.TiledMLP`); the other TSPOptions are
      TSP's own and the baselines ignore them.
    - `layout='dp'`, `'tp'`, `'tp_sp'`: Megatron's GPTModel with the local spec
      (`baselines.model.build_native_gpt`) on a TP group of one rank (dp) or more: TP, or TP +
      sequence parallelism (tp_sp, when the TP group has more than one rank; `sequence_parallel`
      given overrides the layout's). Core attention: Megatron's DotProductAttention
      (`core_attention='local'`) or torch SDPA (`'sdpa'`, the kernels TSP uses: for long contexts).
    - Context parallelism: a baseline layout on groups built with `context_parallel_size=CP`
      (`megatron_tsp.initialize_native_model_parallel(tensor_model_parallel_size=T,
      context_parallel_size=CP)`; CP=4 alone, or TP2 x CP2). The core attention is then
      `baselines.context_parallel.ContextParallelAttention` (K/V all-gathered over the CP group,
      torch SDPA; `core_attention='sdpa'` or `'cp'`). The model takes this CP rank's tokens:
      slice tokens, labels, position ids and loss mask with `baselines.context_parallel.cp_slice`.
      Weights ZeRO-3-sharded over the data x context group: `wrap_ddp_and_optimizer(fsdp=True)`.
    - Layer recompute (every layout): Megatron's `recompute_granularity` ('full': layer
      checkpointing, `recompute_method` uniform / block, `recompute_num_layers`; 'selective': core
      attention, baselines only) in `config_kw`; `offload_activations=True` (with 'full') moves
      the checkpointed layer inputs to host memory (`megatron_tsp.tsp.offload`).
    """
    if offload_activations and config_kw.get("recompute_granularity") != "full":
        raise TSPConfigError("parallel.offload_activations = true needs parallel.recompute = full (it offloads the "
                             f"checkpointed layers' inputs); got recompute_granularity = "
                             f"{config_kw.get('recompute_granularity')!r}")
    record = get_layout(layout, "build_gpt: layout")
    pgs = require_group(pg_collection, "build_gpt", "pg_collection")
    D, cp = pgs.tp.size(), pgs.cp.size()
    if record.size_group is None and D > 1:
        raise TSPConfigError(f"build_gpt: layout = {layout!r} ({record.title}) runs on a TP group of one rank; "
                             f"pg_collection.tp has {D}")
    if record.uses_tsp or sequence_parallel is None:
        sp = record.sequence_parallel and D > 1
    else:
        sp = sequence_parallel
    if cp > 1:
        if not record.context_parallel:
            raise TSPConfigError(f"context parallelism (parallel.context_size / context_parallel_size = {cp}) "
                                 f"cannot be combined with {record.title} (parallel.layout = {layout}): "
                                 f"{record.why_no_context}")
        if core_attention not in ("sdpa", "cp"):
            raise TSPConfigError(f"context parallelism (parallel.context_size = {cp}) runs on torch SDPA: "
                                 f"parallel.baseline_attention / core_attention = {core_attention!r} must be sdpa")
        check_context_parallel(shape.seq_length, cp, D, sp)
    experts = config_kw["num_moe_experts"] if "num_moe_experts" in config_kw else shape.num_experts
    if experts:  # experts on the groups built (megatron_tsp.tsp.moe: expert TP = 1 under TSP)
        config_kw.setdefault("expert_model_parallel_size", _group_size(getattr(pgs, "ep", None)))
        config_kw.setdefault("expert_tensor_parallel_size", _group_size(getattr(pgs, "expt_tp", None)))
    config = transformer_config(shape, D, sequence_parallel=sp, dtype=dtype, pipeline_size=pgs.pp.size(),
                                context_parallel_size=cp, **config_kw)
    if config.num_moe_experts:
        from .. import compat
        from ..tsp.moe import forget_router_metrics

        compat.bind_missing_te_general_gemm()  # megatron-core 0.16.1's router without Transformer Engine
        forget_router_metrics()  # a new model: its own layer count
    if record.uses_tsp:
        validate_transformer_config(config, D, shape.seq_length)
    torch.manual_seed(seed)
    # Megatron's RNG streams keyed by this rank's place in the groups built on (not the globals).
    mrandom.model_parallel_cuda_manual_seed(seed, tp_rank=pgs.tp.rank(), ep_rank=_group_rank(getattr(pgs, "ep", None)),
                                            etp_rank=_group_rank(getattr(pgs, "expt_tp", None)))
    model = resolve(record.builder)(
        config,
        pg_collection=pgs,
        tsp_options=tsp_options,
        core_attention=core_attention,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        position_embedding_type=shape.position_embedding_type,
        share_embeddings_and_output_weights=shape.share_embeddings_and_output_weights,
        pre_process=pgs.pp.rank() == 0,
        post_process=pgs.pp.rank() == pgs.pp.size() - 1,
    )
    if config.use_cpu_initialization:
        layout_invariant_init(model, seed, pgs.tp)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.num_moe_experts:
        from ..tsp.moe import release_dispatcher_probs

        release_dispatcher_probs(model)
    if offload_activations:
        from ..tsp.offload import offload_layer_inputs

        offload_layer_inputs(model)
    return model


def _global_name(model, name: str) -> str:
    """Parameter name with the pipeline stage's local layer index made global, and a tied
    output layer named as the embedding it copies."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    if parts[0] == "output_layer" and model.share_embeddings_and_output_weights:
        parts = ["embedding", "word_embeddings", "weight"]
    return ".".join(parts)


@torch.no_grad()
def layout_invariant_init(model, seed: int, tp_group) -> None:
    """Redraw every weight matrix from a generator keyed by (seed, global parameter name) and
    keep this rank's TP/TSP shard of it: the same initial model for every layout, pipeline split
    included (Megatron's CPU init draws each stage's layers in stage order). Megatron's
    init_method / output_layer_init_method scales; norms and biases keep their constant init.
    `tp_group`: the group the model's TP / TSP shards are laid out on."""
    import zlib

    from ..tsp.moe import expert_param_global_name

    config = model.config
    out_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    tp = tp_group
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        expert = getattr(p, "allreduce", True) is False  # Megatron's mark of an MoE expert's parameter
        # An expert is whole on its rank (expert TP = 1) and named by its global expert index.
        D, r = (1, 0) if expert else (tp.size(), tp.rank())
        gname = _global_name(model, expert_param_global_name(model, name) if expert else name)
        shape = list(p.shape)
        dim, stride = (p.partition_dim, getattr(p, "partition_stride", 1)) if getattr(p, "tensor_model_parallel", False) else (None, 1)
        if dim is not None:
            shape[dim] *= D
        std = out_std if gname.endswith(("linear_proj.weight", "linear_fc2.weight")) else config.init_method_std
        g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(gname.encode()))
        full = torch.randn(shape, generator=g, dtype=torch.float32) * std
        if dim is not None and D > 1:
            full = torch.cat(torch.chunk(full, stride * D, dim=dim)[r::D], dim=dim)
        p.copy_(full.to(p.dtype))


def wrap_ddp_and_optimizer(model, lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True, weight_decay=0.0,
                           overlap=False, bucket_size=None, fsdp=False, *, pg_collection: ProcessGroupCollection,
                           optimizer_cpu_offload: bool = False, optimizer_offload_fraction: float = 1.0):
    """Megatron DDP + optimizer; gradients are averaged over the data x context-parallel group.
    `overlap`: overlap the gradient reduce-scatter with backward and (distributed optimizer) the
    parameter all-gather with the next forward. `fsdp=True`: weights, gradients and optimizer
    state ZeRO-3-sharded over the data x context group instead (`baselines.fsdp`; Megatron's
    plain optimizer over the local shards, so `use_distributed_optimizer` must be False).
    `pg_collection`: the groups the model was built on (required), handed to DDP and the
    optimizer, so neither reads Megatron's global groups.
    `optimizer_cpu_offload`: megatron-core's optimizer CPU offload (train.optimizer_cpu_offload):
    the precision-aware distributed optimizer hands this rank's shard to its
    HybridDeviceOptimizer, which keeps the fp32 main weights and Adam's moments in pinned host
    memory for `optimizer_offload_fraction` of the shard's parameters and steps them with torch's
    CPU AdamW; the GPU keeps the bf16 weights and the fp32 gradient buffer. Needs a bf16 model and
    `use_distributed_optimizer`, not `fsdp`."""
    from .. import compat
    from ..config import require_groups

    pgs = require_groups(pg_collection, compat.OPTIMIZER_GROUPS, "get_megatron_optimizer")
    config = model.config
    if optimizer_cpu_offload:
        for bad, why in ((fsdp, "parallel.fsdp = true"),
                         (not use_distributed_optimizer, "train.distributed_optimizer = false"),
                         (not config.bf16, f"model.dtype = {str(config.params_dtype).replace('torch.', '')}")):
            if bad:  # megatron-core's path: bf16 shards of the distributed optimizer (recipe.check says why)
                raise TSPConfigError(f"train.optimizer_cpu_offload = true cannot be combined with {why}")
        if not 0 < optimizer_offload_fraction <= 1:
            raise TSPConfigError(f"train.optimizer_offload_fraction = {optimizer_offload_fraction} must be in (0, 1]")
        # megatron-core hands the offload an fp32 parameter of a bf16 model as a view that torch's
        # optimizers refuse ("can't optimize a non-leaf Tensor"): say so here instead
        fp32 = [name for name, p in model.named_parameters() if p.dtype == torch.float32]
        if fp32:
            raise TSPConfigError(f"train.optimizer_cpu_offload = true steps bf16 parameters only: {fp32[0]} "
                                 f"(and {len(fp32) - 1} more) is float32")
        compat.te_version_check_without_te()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
                                               overlap_grad_reduce=overlap,
                                               overlap_param_gather=overlap and use_distributed_optimizer,
                                               bucket_size=bucket_size)
    if fsdp:
        if use_distributed_optimizer:
            raise TSPConfigError("parallel.fsdp = true already shards the optimizer state over data x context: "
                                 "set train.distributed_optimizer = false")
        from ..baselines.fsdp import FullyShardedOverDataAndContext

        ddp = FullyShardedOverDataAndContext(config, ddp_config, model, process_group=pgs.dp_cp)
    else:
        ddp = DistributedDataParallel(config, ddp_config, model,
                                      **compat.ddp_group_kwargs(require_groups(pgs, compat.DDP_GROUPS, "DistributedDataParallel")))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=lr, clip_grad=clip_grad, weight_decay=weight_decay,
            use_distributed_optimizer=use_distributed_optimizer,
            bf16=config.bf16, params_dtype=config.params_dtype,
            **(dict(optimizer_cpu_offload=True, optimizer_offload_fraction=float(optimizer_offload_fraction),
                    # HybridDeviceOptimizer takes the shards as they are (bf16, fp32 gradients beside)
                    use_precision_aware_optimizer=True,
                    # one CPU Adam per parameter, copies on side streams: the next copy overlaps a step
                    overlap_cpu_optimizer_d2h_h2d=True) if optimizer_cpu_offload else {}),
        ),
        [ddp],
        **compat.optimizer_group_kwargs(pgs),
    )
    return ddp, optimizer
