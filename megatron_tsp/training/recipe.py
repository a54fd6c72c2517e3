"""Training recipes: YAML files in `configs/` plus `key=value` overrides.

A recipe has four sections, each a dataclass whose fields document themselves:
`model` (ModelShape), `parallel`, `train`, `data`. Unknown keys, wrong types and impossible
layouts raise one `RecipeError` that names the key and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ..config import TSPConfigError, TSPOptions, check_seq_length
from .build import ModelShape

LAYOUTS = ("tsp", "dp", "tp", "tp_sp")
DTYPES = ("float32", "bfloat16")
RECOMPUTE = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


class RecipeError(TSPConfigError):
    """A recipe or override that cannot run."""


@dataclass
class ModelRecipe(ModelShape):
    """The model: its shape (ModelShape's fields) and how it is stored and initialised."""

    dtype: str = "float32"
    """Parameter and compute dtype: float32 or bfloat16 (bfloat16 needs a GPU)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    cpu_init: Optional[bool] = None
    """Draw the initial weights on the CPU, the same for every layout and pipeline split (slow
    for large models); null: on CPU-only machines, Megatron's GPU init otherwise."""

    def shape(self) -> ModelShape:
        names = {f.name for f in dataclasses.fields(ModelShape)}
        return ModelShape(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass
class ParallelRecipe:
    layout: str = "tsp"
    """tsp (the product), or the baselines dp, tp (tensor parallel), tp_sp (tensor + sequence parallel)."""
    size: int = 2
    """The size of the tsp / tp axis (ignored by dp)."""
    pipeline_size: int = 1
    """Pipeline-parallel stages (composes with every layout)."""
    tsp_recompute: str = "none"
    """TSP backward: none (save each shard's q, k/v, attention output and fc1 output, as Megatron
    does without recompute) or full (save only block inputs, recompute each shard's forward)."""
    tsp_attention_backend: str = "auto"
    """TSP chunk-attention kernel: auto (cudnn on GPUs in bf16/fp16, else math), cudnn, flash,
    math, math_split."""
    tsp_mlp_exchange: str = "auto"
    """How TSP's MLP meets its weights: ring (weight shards sent to the next rank), broadcast (from
    the owner, as attention; gradients reduced onto the owner), tokens (weights stay; tokens
    all-gathered, outputs reduce-scattered: Megatron's sequence-parallel MLP) or auto (tokens
    below 8192 tokens per rank, else ring)."""
    tsp_lm_head: Optional[str] = None
    """TSP's LM head and cross entropy: local (the default with layout tsp; each rank computes
    logits for its own tokens only, vocab shards travel over the TSP group, online log-sum-exp
    chunked along tokens: at most lm_head_chunk_tokens x V/D logits at a time) or megatron
    (Megatron's output layer + vocab-parallel cross entropy: all S tokens' logits, S x V/D per
    rank). Same loss and gradients. null: local. local needs layout tsp."""
    lm_head_chunk_tokens: int = 4096
    """Local tokens per chunk of the local LM head (parallel.tsp_lm_head = local), >= 1."""
    tsp_compute_only: bool = False
    """Benchmarks only: skip every TSP collective (results are wrong) to time compute alone."""
    high_priority_comm: bool = False
    """Create the TSP / tensor-parallel group's NCCL stream at high CUDA priority (Megatron's
    high_priority_stream_groups=['tp']), so its kernels get SMs ahead of queued compute blocks
    (TSP's collectives run asynchronously beside compute; the baselines' are synchronous)."""
    comm_max_ctas: int = 0
    """NCCL's max CTAs (thread blocks, i.e. SMs) per collective of the TSP / tensor-parallel group
    (Megatron's nccl_comm_cfgs max_ctas), to bound what overlapped communication takes from the
    kernels beside it; 0: NCCL's default. GPUs only."""
    gemm_sm_carveout: int = 0
    """SMs that cuBLAS GEMMs leave free (torch._C._set_sm_carveout_experimental; process-wide,
    GPUs only), so asynchronous collectives find SMs while a GEMM runs; 0: cuBLAS's default."""
    baseline_attention: str = "sdpa"
    """Core attention of the baselines: sdpa (torch scaled_dot_product_attention, as TSP uses) or
    local (Megatron's DotProductAttention, which materializes the S x S scores)."""
    context_size: int = 1
    """Context-parallel size CP of the baselines dp, tp, tp_sp (CP 4: layout dp; TP2 x CP2: layout
    tp or tp_sp with size 2): each sequence is cut into 2*CP zigzag chunks, rank r of the CP group
    holds chunks r and 2CP-1-r, and K/V are all-gathered over the group (torch SDPA,
    megatron_tsp.baselines.context_parallel). Not with tsp, which already splits the sequence."""
    fsdp: bool = False
    """Baselines: weights, gradients and optimizer state ZeRO-3-sharded over the data x context
    group (torch FSDP2 through megatron-core's TorchFullyShardedDataParallel; "FSDP over CP"
    with context_size > 1). Not with tsp, train.distributed_optimizer, pipeline_size > 1 or
    checkpoints."""
    recompute: str = "none"
    """Layer activation recompute, every layout (Megatron's recompute_granularity): none; full
    (Megatron's layer checkpointing: a recomputed layer keeps only its input [S/D, b, h] and runs
    its forward again in backward; around TSP layers parallel.tsp_recompute applies inside that
    recomputation); selective (Megatron's core-attention recompute: baselines only, TSP attention
    never keeps S x S scores)."""
    recompute_method: str = "uniform"
    """With recompute = full (Megatron's recompute_method): uniform (every layer recomputed, in
    chunks of recompute_num_layers layers of which only the chunk's input is kept) or block (the
    first recompute_num_layers layers of each pipeline stage recomputed, the others save their
    activations: the memory/speed knob)."""
    recompute_num_layers: Optional[int] = None
    """With recompute = full (Megatron's recompute_num_layers): layers per checkpointed chunk
    (uniform; must divide the layers per pipeline stage) or recomputed layers per pipeline stage
    (block); null: 1 (uniform) or every layer of the stage (block)."""
    offload_activations: bool = False
    """With recompute = full, every layout: the checkpointed layers' saved inputs go to pinned host
    memory in forward and come back ahead of their layer's backward on a side stream (prefetched
    one layer ahead: at most two on the GPU during backward). On CPU a host copy."""


@dataclass
class TrainRecipe:
    steps: int = 30
    """Optimizer steps to run (in total, counting resumed ones)."""
    micro_batch_size: int = 2
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 4
    """Sequences per step; a multiple of micro_batch_size x data-parallel size."""
    lr: float = 3e-3
    """Adam learning rate (constant)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    distributed_optimizer: bool = False
    """Megatron's distributed optimizer (optimizer state sharded over data parallel). Its
    checkpoints (fully_reshardable format) resume exactly, at any layout."""
    seed: int = 1234
    """Seed of weights and data order."""
    log_interval: int = 5
    """Steps between log lines on rank 0."""
    save_dir: Optional[str] = None
    """Checkpoint directory (distributed checkpoint format); null: no checkpoints."""
    save_interval: int = 0
    """Save every N steps (and always at the end when save_dir is set); 0: only at the end."""
    resume: bool = False
    """Resume from the latest checkpoint in save_dir, at any layout (TSP / TP / TP+SP size,
    pipeline, data parallel); refused, with the differences listed, when the model's shapes,
    vocabulary or dtype or train.distributed_optimizer differ."""
    collective_timeout_s: float = 600.0
    """How long a collective (and the start-up rendezvous of the process groups) waits for its
    peers before it fails with an error naming the missing peer; a rank that died or hangs (a lost
    node) then ends the job within this time instead of hanging it (torch.distributed's timeout of
    the default and of Megatron's groups; 600 = Megatron-LM's --distributed-timeout-minutes 10).
    Longer than the slowest checkpoint save."""
    save_on_signal: bool = True
    """On SIGINT / SIGTERM / SIGUSR1 (Ctrl-C; SLURM before a kill or preemption), finish the
    current step, save a checkpoint (when save_dir is set) and exit 0; a second Ctrl-C aborts
    at once. false: stop the same way without saving."""
    metrics_file: Optional[str] = None
    """Append one JSON line per step to this file (rank 0)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 when stdout is a terminal."""


@dataclass
class DataRecipe:
    path: Optional[str] = None
    """Megatron indexed dataset prefix (PATH.bin + PATH.idx); null: mock data."""
    split: str = "100,0,0"
    """train,valid,test split of the indexed dataset."""
    cache_dir: Optional[str] = None
    """Where Megatron caches the dataset indices (defaults next to the data)."""


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- validation -----------------------------------------------------------------------
    def check(self, world_size: Optional[int] = None) -> "Recipe":
        m, p, t = self.model, self.parallel, self.train
        if p.layout not in LAYOUTS:
            raise RecipeError(f"parallel.layout = {p.layout!r} is not one of {', '.join(LAYOUTS)}")
        if p.baseline_attention not in ("sdpa", "local"):
            raise RecipeError(f"parallel.baseline_attention = {p.baseline_attention!r} is not one of sdpa, local")
        try:
            self.tsp_options()
        except TSPConfigError as e:
            raise RecipeError(str(e).replace("--tsp-lm-head-chunk-tokens", "parallel.lm_head_chunk_tokens")
                              .replace("--tsp-lm-head", "parallel.tsp_lm_head")
                              .replace("--tsp-recompute", "parallel.tsp_recompute")
                              .replace("--tsp-attention-backend", "parallel.tsp_attention_backend")
                              .replace("--tsp-mlp-exchange", "parallel.tsp_mlp_exchange")) from None
        if p.tsp_lm_head == "local" and p.layout != "tsp":
            raise RecipeError(f"parallel.tsp_lm_head = local needs parallel.layout = tsp (got {p.layout}): the "
                              "baselines run Megatron's LM head (leave it null or set megatron)")
        if m.dtype not in DTYPES:
            raise RecipeError(f"model.dtype = {m.dtype!r} is not one of {', '.join(DTYPES)}")
        if m.normalization not in ("LayerNorm", "RMSNorm"):
            raise RecipeError(f"model.normalization = {m.normalization!r} is not one of LayerNorm, RMSNorm")
        if m.position_embedding_type not in ("rope", "learned_absolute"):
            raise RecipeError(f"model.position_embedding_type = {m.position_embedding_type!r} is not one of rope, learned_absolute")
        for key in ("steps", "micro_batch_size", "global_batch_size"):
            if getattr(t, key) < 1:
                raise RecipeError(f"train.{key} = {getattr(t, key)} must be >= 1")
        for key in ("size", "pipeline_size", "context_size"):
            if getattr(p, key) < 1:
                raise RecipeError(f"parallel.{key} = {getattr(p, key)} must be >= 1")
        cp = p.context_size
        if p.layout == "tsp" and (cp > 1 or p.fsdp):
            key = "parallel.context_size = %d" % cp if cp > 1 else "parallel.fsdp = true"
            raise RecipeError(f"{key} cannot be combined with parallel.layout = tsp: TSP already splits the sequence "
                              "and the weights over its group (context_size and fsdp are for the baselines dp, tp, tp_sp)")
        if cp > 1 and p.baseline_attention != "sdpa":
            raise RecipeError(f"parallel.context_size = {cp} runs on torch SDPA: parallel.baseline_attention = "
                              f"{p.baseline_attention!r} must be sdpa")
        if p.comm_max_ctas < 0:
            raise RecipeError(f"parallel.comm_max_ctas = {p.comm_max_ctas} must be >= 0")
        if p.comm_max_ctas and not _cuda_available():
            raise RecipeError("parallel.comm_max_ctas needs NCCL process groups (GPUs); this machine has none")
        if p.gemm_sm_carveout < 0:
            raise RecipeError(f"parallel.gemm_sm_carveout = {p.gemm_sm_carveout} must be >= 0")
        if p.gemm_sm_carveout and not _cuda_available():
            raise RecipeError("parallel.gemm_sm_carveout needs GPUs; this machine has none")
        if p.high_priority_comm and not _cuda_available():
            raise RecipeError("parallel.high_priority_comm = true needs NCCL process groups (GPUs); this machine has none")
        if p.fsdp:
            for bad, key in ((t.distributed_optimizer, "train.distributed_optimizer = true (fsdp already shards the optimizer state)"),
                             (p.pipeline_size > 1, f"parallel.pipeline_size = {p.pipeline_size}"),
                             (t.save_dir is not None, "train.save_dir (checkpoints of FSDP runs are not supported)")):
                if bad:
                    raise RecipeError(f"parallel.fsdp = true cannot be combined with {key}")
        size = self.axis_size
        for what, value in (("model.num_attention_heads", m.num_attention_heads),
                            ("model.num_query_groups", m.num_query_groups or m.num_attention_heads),
                            ("model.ffn_hidden_size", m.ffn_hidden_size)):
            if value % size:
                raise RecipeError(f"{what} = {value} must be divisible by parallel.size = {size} ({p.layout})")
        if p.layout == "tsp":
            try:
                check_seq_length(m.seq_length, size, what="model.seq_length")
            except TSPConfigError as e:
                raise RecipeError(str(e).replace("--tsp-size", "parallel.size")) from None
        if cp > 1:
            from ..baselines.context_parallel import check_context_parallel

            try:
                check_context_parallel(m.seq_length, cp, size, sequence_parallel=p.layout == "tp_sp")
            except TSPConfigError as e:
                raise RecipeError(str(e)) from None
        elif p.layout == "tp_sp" and m.seq_length % size:
            raise RecipeError(f"model.seq_length = {m.seq_length} must be divisible by parallel.size = {size} (tp_sp)")
        if m.num_layers % p.pipeline_size:
            raise RecipeError(f"model.num_layers = {m.num_layers} must be divisible by parallel.pipeline_size = {p.pipeline_size}")
        self._check_recompute()
        if t.save_interval < 0:
            raise RecipeError("train.save_interval must be >= 0")
        if not t.collective_timeout_s > 0:
            raise RecipeError(f"train.collective_timeout_s = {t.collective_timeout_s} must be > 0 (seconds)")
        if t.resume and not t.save_dir:
            raise RecipeError("train.resume = true needs train.save_dir")
        if world_size is not None:
            model = size * p.pipeline_size * cp
            if world_size % model:
                with_cp = f" x parallel.context_size ({cp})" if cp > 1 else ""
                raise RecipeError(
                    f"world size {world_size} does not fit the layout: parallel.size ({size}) x "
                    f"parallel.pipeline_size ({p.pipeline_size}){with_cp} = {model} must divide it "
                    f"(launch with torchrun --nproc-per-node a multiple of {model})"
                )
            dp = world_size // model
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise RecipeError(
                    f"train.global_batch_size = {t.global_batch_size} must be a multiple of "
                    f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
                )
        return self

    def _check_recompute(self) -> None:
        m, p = self.model, self.parallel
        if p.recompute not in RECOMPUTE:
            raise RecipeError(f"parallel.recompute = {p.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if p.recompute_method not in RECOMPUTE_METHODS:
            raise RecipeError(f"parallel.recompute_method = {p.recompute_method!r} is not one of "
                              f"{', '.join(RECOMPUTE_METHODS)}")
        if p.recompute == "selective" and p.layout == "tsp":
            raise RecipeError("parallel.recompute = selective (Megatron's core-attention recompute) is for the "
                              "baselines: TSP attention never keeps S x S scores; use parallel.recompute = full "
                              "and/or parallel.tsp_recompute = full")
        if p.recompute != "full":
            for bad, key in ((p.recompute_method != "uniform", f"parallel.recompute_method = {p.recompute_method}"),
                             (p.recompute_num_layers is not None,
                              f"parallel.recompute_num_layers = {p.recompute_num_layers}"),
                             (p.offload_activations, "parallel.offload_activations = true")):
                if bad:
                    raise RecipeError(f"{key} needs parallel.recompute = full (Megatron's layer checkpointing), "
                                      f"got parallel.recompute = {p.recompute}")
            return
        per_stage = m.num_layers // p.pipeline_size
        n = p.recompute_num_layers
        if n is not None and not 1 <= n <= per_stage:
            raise RecipeError(f"parallel.recompute_num_layers = {n} must be between 1 and the layers per pipeline "
                              f"stage, {per_stage} (model.num_layers {m.num_layers} / parallel.pipeline_size "
                              f"{p.pipeline_size})")
        if n is not None and p.recompute_method == "uniform" and per_stage % n:
            raise RecipeError(f"parallel.recompute_num_layers = {n} must divide the {per_stage} layers per pipeline "
                              "stage with parallel.recompute_method = uniform (checkpointed chunks of N layers)")

    def recompute_config(self) -> dict:
        """The TransformerConfig fields of parallel.recompute / recompute_method / recompute_num_layers."""
        p = self.parallel
        if p.recompute == "none":
            return {}
        if p.recompute == "selective":
            return {"recompute_granularity": "selective"}  # recompute_modules: Megatron's default core_attn
        n = p.recompute_num_layers
        if n is None:
            n = 1 if p.recompute_method == "uniform" else self.model.num_layers // p.pipeline_size
        return {"recompute_granularity": "full", "recompute_method": p.recompute_method, "recompute_num_layers": n}

    def tsp_options(self) -> TSPOptions:
        p = self.parallel
        return TSPOptions(recompute=p.tsp_recompute, attention_backend=p.tsp_attention_backend,
                          mlp_exchange=p.tsp_mlp_exchange, lm_head=p.tsp_lm_head or "local",
                          lm_head_chunk_tokens=p.lm_head_chunk_tokens, compute_only=p.tsp_compute_only)

    @property
    def axis_size(self) -> int:
        return 1 if self.parallel.layout == "dp" else self.parallel.size


# -- loading ---------------------------------------------------------------------------------

def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _coerce(key: str, value: Any, hint) -> Any:
    """Check `value` against the type hint of `key`; ints are accepted for floats."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise RecipeError(f"{key} = {value!r} has the wrong type: expected {getattr(hint, '__name__', hint)}")


def _apply(recipe: Recipe, data: dict, origin: str) -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    for section, values in data.items():
        if section not in sections:
            raise RecipeError(f"{origin}: unknown section {section!r}; valid sections: {', '.join(sections)}")
        target = getattr(recipe, section)
        hints = get_type_hints(type(target))
        if not isinstance(values, dict):
            raise RecipeError(f"{origin}: section {section!r} must be a mapping")
        for key, value in values.items():
            if key not in hints:
                raise RecipeError(
                    f"{origin}: unknown key {section}.{key}; valid keys of {section}: {', '.join(hints)}"
                )
            setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))


def parse_override(text: str) -> dict:
    """`a.b=value` -> {'a': {'b': value}} (the value parsed as YAML: 4, 1e-3, true, null, text)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise RecipeError(f"override {text!r} must look like section.key=value (e.g. parallel.size=4)")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return {section: {name: value}}


def load_recipe(path: Optional[str] = None, overrides: List[str] = ()) -> Recipe:
    """The recipe at `path` (default: configs/tiny.yaml's embedded twin) with overrides applied."""
    recipe = Recipe()
    if path is not None:
        if not os.path.isfile(path):
            raise RecipeError(f"recipe file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        _apply(recipe, data, path)
    for text in overrides:
        _apply(recipe, parse_override(text), "override")
    return recipe.check()


def valid_keys() -> str:
    lines = []
    for f in dataclasses.fields(Recipe):
        lines.append(f"{f.name}: " + ", ".join(fl.name for fl in dataclasses.fields(f.default_factory)))
    return "\n".join(lines)
