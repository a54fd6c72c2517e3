"""What TSP supports, checked once, before any collective.

Every check here is a pure function of the configuration, so every rank raises the same
`TSPConfigError` before the first broadcast or all-gather: a bad flag never hangs a job.
"""

from __future__ import annotations

import ast
import os
import dataclasses
import functools
import inspect
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


class TSPConfigError(ValueError):
    """A configuration TSP cannot run. The message names the option or shape at fault: a
    megatron-tsp option by its recipe key (`parallel.tsp_recompute`, the degree `parallel.size`),
    which each front end says in its own spelling (pretrain_gpt.py's `--tsp-*` flags:
    megatron_lm.arguments.in_flags); Megatron's own options by Megatron's flags. `option`: the
    recipe key at fault, where one is."""

    def __init__(self, message: str = "", option: Optional[str] = None):
        super().__init__(message)
        self.option = option


def check_tsp_size(tsp_size: int) -> None:
    if not isinstance(tsp_size, int) or isinstance(tsp_size, bool) or tsp_size < 1:
        raise TSPConfigError(f"parallel.size must be a positive integer, got {tsp_size!r}", option="parallel.size")


def check_seq_length(seq_length: int, tsp_size: int, what: str = "--seq-length") -> None:
    """Zigzag needs 2*D equal chunks per sequence."""
    if seq_length % (2 * tsp_size) != 0:
        raise TSPConfigError(
            f"{what} = {seq_length} must be divisible by 2 x parallel.size = {2 * tsp_size} "
            f"(the zigzag layout cuts each sequence into 2*D equal chunks)", option="parallel.size"
        )


def check_world_size(world_size: int, tsp_size: int, pipeline_model_parallel_size: int = 1) -> None:
    model_size = tsp_size * pipeline_model_parallel_size
    if world_size % model_size != 0:
        raise TSPConfigError(
            f"world size {world_size} is not divisible by parallel.size ({tsp_size}) x "
            f"--pipeline-model-parallel-size ({pipeline_model_parallel_size}) = {model_size}"
        )


def check_parallel_sizes(
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
) -> None:
    """TSP takes Megatron's TP slot: it cannot be combined with native TP or CP (expert
    parallelism is checked by `check_expert_parallel`)."""
    if tensor_model_parallel_size not in (None, 1):
        raise TSPConfigError(
            f"--tensor-model-parallel-size = {tensor_model_parallel_size} cannot be combined with "
            f"parallel.size: TSP takes the tensor-parallel slot (leave it at 1)"
        )
    if context_parallel_size not in (None, 1):
        raise TSPConfigError(
            f"--context-parallel-size = {context_parallel_size} cannot be combined with "
            f"parallel.size: TSP already splits the sequence (leave it at 1)"
        )


def validate_transformer_config(config, tsp_size: int, seq_length: Optional[int] = None) -> None:
    """Reject every TransformerConfig option the TSP attention and MLP do not implement."""
    check_tsp_size(tsp_size)
    D = tsp_size
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    if heads % D != 0:
        raise TSPConfigError(
            f"--num-attention-heads = {heads} must be divisible by parallel.size = {D}"
        )
    if groups % D != 0:
        raise TSPConfigError(
            f"--num-query-groups = {groups} must be divisible by parallel.size = {D} "
            f"(each TSP weight shard holds whole KV groups)"
        )
    ffn = config.ffn_hidden_size
    if ffn % D != 0:
        raise TSPConfigError(f"--ffn-hidden-size = {ffn} must be divisible by parallel.size = {D}")
    if seq_length is not None:
        check_seq_length(seq_length, D)
    check_parallel_sizes(
        config.tensor_model_parallel_size if D == 1 else 1,
        config.context_parallel_size,
    )
    if config.num_moe_experts not in (None, 0):
        check_moe_config(config, D)
    if D > 1 and config.tensor_model_parallel_size != D:
        raise TSPConfigError(
            f"TransformerConfig.tensor_model_parallel_size = {config.tensor_model_parallel_size} "
            f"but parallel.size = {D}: build the config with megatron_tsp.tsp_transformer_config "
            f"(TSP runs in the tensor-parallel slot)"
        )
    if D > 1 and not config.sequence_parallel:
        raise TSPConfigError(
            "TransformerConfig.sequence_parallel must be True with parallel.size > 1 "
            "(norm gradients are summed over the TSP group like Megatron's sequence parallelism)"
        )
    unsupported = {
        "multi_latent_attention": ("--multi-latent-attention", bool),
        "qk_layernorm": ("--qk-layernorm", bool),
        "attention_output_gate": ("--attention-output-gate", bool),
        "tp_comm_overlap": ("--tp-comm-overlap", bool),
        "use_te_activation_func": ("--use-te-activation-func", bool),
        "attention_dropout": ("--attention-dropout", lambda v: v not in (None, 0, 0.0)),
        "fp8": ("--fp8-format", lambda v: v not in (None, False)),
        "flash_decode": ("--flash-decode", bool),
        "mrope_section": ("--mrope-section", lambda v: v is not None),
    }
    for name, (flag, bad) in unsupported.items():
        value = getattr(config, name, None)
        if bad(value):
            raise TSPConfigError(
                f"{flag} ({name}={value!r}) is not supported with parallel.size in this version"
            )
    if config.recompute_granularity == "selective":
        # Megatron's selective recompute checkpoints core_attention, which TSP attention never
        # calls (and TSP never keeps S x S scores): it would silently do nothing.
        raise TSPConfigError(
            "--recompute-granularity selective (parallel.recompute = selective) is not supported with "
            "parallel.size: use full (layer recompute) and/or parallel.tsp_recompute = full",
            option="parallel.recompute")


def tsp_transformer_config(tsp_size: int, seq_length: Optional[int] = None, **kwargs):
    """A Megatron `TransformerConfig` for a TSP run: the TSP axis in the TP slot
    (`tensor_model_parallel_size = D`, `sequence_parallel = D > 1`), validated."""
    from megatron.core.transformer import TransformerConfig

    check_tsp_size(tsp_size)
    check_parallel_sizes(kwargs.pop("tensor_model_parallel_size", 1), kwargs.get("context_parallel_size", 1))
    from .compat import transformer_config_defaults

    config = TransformerConfig(tensor_model_parallel_size=tsp_size, sequence_parallel=tsp_size > 1,
                               **transformer_config_defaults(**kwargs))
    validate_transformer_config(config, tsp_size, seq_length)
    return config


RECOMPUTE_MODES = ("none", "full")  # parallel.tsp_recompute: TSP's in-layer mode
LAYER_RECOMPUTE = ("none", "full", "selective")  # parallel.recompute: Megatron's recompute_granularity
RECOMPUTE_METHODS = ("uniform", "block")  # parallel.recompute_method
NORMALIZATIONS = ("RMSNorm", "LayerNorm")  # model.normalization
ROUTER_SCORES = ("softmax", "sigmoid")  # model.moe_router_score_function
MLP_EXCHANGES = ("ring", "broadcast", "tokens", "auto")
LM_HEADS = ("local", "megatron")
ATTENTION_KV = ("gathered", "streamed")  # parallel.tsp_attention_kv: how a head shard's K/V meet the queries
# parallel.cp_comm_type: the CP baseline's K/V all-gathered, or streamed around the CP ring (Megatron's names)
CP_COMM_TYPES = ("all_gather", "p2p")
# the chunk-attention kernels of tsp/kernels.py (`auto` picks one per device and shape there)
BACKENDS = ("auto", "cudnn", "flash", "math", "math_split", "flex")
# `auto` moves the tokens when a rank holds fewer than this many (S*b/D): below it, a weight
# shard's hop outlasts the shard's GEMMs and the ring cannot hide it (4 x H200: 7B width, 16K
# tokens = 4K per rank exposed the ring; docs/performance.md).
AUTO_TOKENS_BELOW = 8192


def resolve_mlp_exchange(exchange: str, local_tokens: int, tsp_size: int, compute_only: bool = False) -> str:
    """The exchange an MLP call runs: `auto` -> `tokens` below AUTO_TOKENS_BELOW tokens per rank
    (micro-batch x S / D) when D > 1, else `ring` (also in compute-only runs, which can skip only
    TSP's own collectives). Used by the MLP and by the planner."""
    if exchange != "auto":
        return exchange
    small = local_tokens < AUTO_TOKENS_BELOW and tsp_size > 1
    return "tokens" if small and not compute_only else "ring"


def check_choice(key: str, value, choices) -> None:
    """`value` one of `choices`, or one TSPConfigError naming the recipe key `key` ("parallel.tsp_lm_head")."""
    if value not in choices:
        raise TSPConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}", option=key)


def check_mlp_chunk_tokens(chunk) -> None:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise TSPConfigError(f"parallel.mlp_chunk_tokens must be a non-negative integer (0: untiled), got {chunk!r}",
                             option="parallel.mlp_chunk_tokens")


def _option(default, choices=None, flag: Optional[str] = None):
    """A TSPOptions field: its default, the values it takes (checked by TSPOptions.check) and its
    pretrain_gpt.py flag (None: none)."""
    return field(default=default, metadata={"choices": choices, "flag": flag})


# The old keyword names of TSPOptions (until the recipe keys became its field names); still
# accepted by TSPOptions(...) and dataclasses.replace, with a DeprecationWarning, for one release.
OLD_OPTION_NAMES = {"recompute": "tsp_recompute", "attention_backend": "tsp_attention_backend",
                    "mlp_exchange": "tsp_mlp_exchange", "lm_head": "tsp_lm_head", "attention_kv": "tsp_attention_kv",
                    "compute_only": "tsp_compute_only"}


@dataclass
class TSPOptions:
    """How the TSP blocks run, each option declared once: these fields are the recipe's
    `parallel` keys of the same names (ParallelRecipe inherits them), pretrain_gpt.py's `--tsp-*`
    flags (megatron_lm/arguments.py) and what the TSP core takes, passed explicitly through the
    layer spec (no global state). Checked when built (`check`: one TSPConfigError naming the
    recipe key); build a new one (dataclasses.replace) rather than changing one in place."""

    tsp_recompute: str = _option("none", RECOMPUTE_MODES, "--tsp-recompute")
    """TSP backward: none (save each shard's q, k/v, attention output and fc1 output, as Megatron
    does without recompute) or full (save only block inputs, recompute each shard's forward)."""
    tsp_attention_backend: str = _option("auto", BACKENDS, "--tsp-attention-backend")
    """TSP chunk-attention kernel: auto (cudnn on GPUs in bf16/fp16, else math; math under document
    masks), cudnn, flash, math, math_split, flex (torch FlexAttention, block mask from the document
    ids; exact on CPU, untested on GPUs)."""
    tsp_mlp_exchange: str = _option("auto", MLP_EXCHANGES, "--tsp-mlp-exchange")
    """How TSP's MLP meets its weights: ring (weight shards sent to the next rank), broadcast (from
    the owner, as attention; gradients reduced onto the owner), tokens (weights stay; tokens
    all-gathered, outputs reduce-scattered: Megatron's sequence-parallel MLP) or auto (tokens
    below AUTO_TOKENS_BELOW tokens per rank, else ring)."""
    tsp_lm_head: Optional[str] = _option(None, LM_HEADS, "--tsp-lm-head")
    """TSP's LM head and cross entropy: local (the default with layout tsp; each rank computes
    logits for its own tokens only, vocab shards travel over the TSP group, online log-sum-exp
    chunked along tokens: at most lm_head_chunk_tokens x V/D logits at a time) or megatron
    (Megatron's output layer + vocab-parallel cross entropy: all S tokens' logits, S x V/D per
    rank). Same loss and gradients. null: local. local needs layout tsp."""
    lm_head_chunk_tokens: int = _option(4096, None, "--tsp-lm-head-chunk-tokens")
    """Local tokens per chunk of the local LM head (parallel.tsp_lm_head = local), >= 1."""
    mlp_chunk_tokens: int = _option(0, None, "--tsp-mlp-chunk-tokens")
    """Token-tiled MLP, every layout (TSP's ring / broadcast / tokens exchanges, the baselines'
    Megatron MLP alike): 0 = untiled; N > 0 = the MLP runs on chunks of at most N of the rank's
    tokens (the baselines cut along the sequence: max(1, N // micro-batch) positions per chunk;
    TP+SP all-gathers and reduce-scatters chunk by chunk). Its forward keeps only its input; its
    backward rebuilds one chunk at a time and accumulates the weight gradients, so the MLP's
    backward working set (fc1 output, activation, their gradients: six [s, f/D] pieces) is one
    chunk's instead of the rank's s tokens', for one more fc1 + activation per chunk (TSP with
    tsp_recompute = full already pays it). Same loss and gradients. Default 0 until the GPU
    measurement picks a chunk (time within 3% of untiled at 128K tokens per rank)."""
    tsp_attention_kv: str = _option("gathered", ATTENTION_KV, "--tsp-attention-kv")
    """How TSP attention meets each head shard's K/V: gathered (all-gathered into the whole
    sequence: S tokens' K/V and their gradients on every rank, the peak at D = 4 and millions of
    tokens) or streamed (ring attention inside the shard: K/V travel around the TSP ring chunk by
    chunk, merged by log-sum-exp; dK/dV travel back the same way; at most two ranks' K/V, S/D
    tokens each, at a time). Same loss and gradients. Default gathered until the GPU timing of
    the ring's overlap with the attention kernels is measured."""
    tsp_compute_only: bool = _option(False)  # no pretrain_gpt.py flag: the benchmarks' switch
    """Benchmarks only: skip every TSP collective (results are wrong) to time compute alone."""

    def __post_init__(self):
        if self.tsp_lm_head is None:  # the core sees the head it runs (the recipe keeps null: ParallelRecipe)
            self.tsp_lm_head = "local"
        self.check()

    def check(self) -> None:
        """Every TSP option's values, one TSPConfigError naming the first bad one by its recipe key."""
        for f in dataclasses.fields(TSPOptions):
            value = getattr(self, f.name)
            if f.metadata["choices"] and not (f.name == "tsp_lm_head" and value is None):  # null: local
                check_choice(f"parallel.{f.name}", value, f.metadata["choices"])
        chunk = self.lm_head_chunk_tokens
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise TSPConfigError(f"parallel.lm_head_chunk_tokens must be a positive integer, got {chunk!r}",
                                 option="parallel.lm_head_chunk_tokens")
        check_mlp_chunk_tokens(self.mlp_chunk_tokens)
        if self.tsp_compute_only and self.tsp_mlp_exchange == "tokens":
            raise TSPConfigError("parallel.tsp_mlp_exchange = tokens runs Megatron's own collectives, which the "
                                 "compute-only benchmark mode cannot skip: use ring, broadcast or auto",
                                 option="parallel.tsp_mlp_exchange")


def _old_names(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        old = sorted(k for k in kwargs if k in OLD_OPTION_NAMES)
        if old:
            warnings.warn(f"TSPOptions({'=, '.join(old)}=) is deprecated: the options take their recipe keys' names "
                          f"({'=, '.join(OLD_OPTION_NAMES[k] for k in old)}=)", DeprecationWarning, stacklevel=2)
            # the old names win: dataclasses.replace passes every other field under its new name too
            kwargs = {**{k: v for k, v in kwargs.items() if k not in old},
                      **{OLD_OPTION_NAMES[k]: kwargs[k] for k in old}}
        init(self, *args, **kwargs)

    return __init__


TSPOptions.__init__ = _old_names(TSPOptions.__init__)  # TSPOptions' own: ParallelRecipe's __init__ is its own


# -- the options, declared once -------------------------------------------------------------
# Every recipe key is a field below with its default and a docstring (its meaning). The YAML recipe
# (training/recipe.py), `train --help`, the `--tsp-*` flags of pretrain_gpt.py (megatron_lm/arguments.py)
# and the planner's recipe reader (planner/recipe_reader.py) derive from them; this module imports
# neither torch nor megatron, so the planner reads them where torch is not installed.

@dataclass
class ModelShape:
    """A GPT model's shape. Field names follow Megatron's flags."""

    num_layers: int = 2
    """Transformer layers (--num-layers)."""
    hidden_size: int = 64
    """Hidden size h (--hidden-size)."""
    num_attention_heads: int = 4
    """Query heads (--num-attention-heads)."""
    num_query_groups: Optional[int] = None
    """KV groups for GQA (--num-query-groups); null for MHA."""
    ffn_hidden_size: int = 128
    """MLP width (--ffn-hidden-size)."""
    vocab_size: int = 128
    """Vocabulary size (padded); mock data draws tokens below it."""
    seq_length: int = 64
    """Tokens per sequence (--seq-length); a multiple of 2 x tsp_size under TSP."""
    swiglu: bool = True
    """Gated SiLU MLP (--swiglu); false: GELU."""
    add_bias_linear: bool = False
    """Biases in the linear layers."""
    normalization: str = "RMSNorm"
    """LayerNorm or RMSNorm."""
    position_embedding_type: str = "rope"
    """rope or learned_absolute."""
    share_embeddings_and_output_weights: bool = False
    """Tie the input embedding and the LM head."""
    num_experts: Optional[int] = None
    """Mixture of experts: routed experts per MoE layer (--num-experts); null: a dense model.
    Under TSP the MoE layer is Megatron's MoELayer on each rank's tokens (megatron_tsp.tsp.moe)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of each routed expert's MLP (--moe-ffn-hidden-size); null: ffn_hidden_size."""
    moe_router_topk: int = 2
    """Experts per token (--moe-router-topk)."""
    moe_router_score_function: str = "softmax"
    """Router score: softmax or sigmoid (--moe-router-score-function)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts before the top-k (true; needed for top-1) or over the chosen k
    logits after it (false: Mixtral / OLMoE routing) (--moe-router-pre-softmax)."""
    moe_router_load_balancing_type: str = "aux_loss"
    """aux_loss (over the micro-batch), seq_aux_loss (per sequence), global_aux_loss (over the
    global batch) or none (--moe-router-load-balancing-type). Not sinkhorn under TSP."""
    moe_aux_loss_coeff: float = 0.01
    """Load-balancing loss coefficient (--moe-aux-loss-coeff); 0: off."""
    moe_z_loss_coeff: Optional[float] = None
    """Router z-loss coefficient (--moe-z-loss-coeff); null: off."""
    moe_expert_capacity_factor: Optional[float] = None
    """Token dropping: each expert takes at most factor x tokens x top-k / experts of the
    micro-batch (--moe-expert-capacity-factor); null: no dropping. Under TSP the capacity is
    decided over the whole micro-batch, as on one process."""
    moe_token_drop_policy: str = "probs"
    """Which tokens an over-full expert drops: probs (lowest router probability) or position (the
    last in the sequence) (--moe-token-drop-policy)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert every token also passes (--moe-shared-expert-intermediate-size;
    under TSP it runs as the TSP MLP, so divisible by the TSP size); null: none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output per token by sigmoid(x . g), g a learned [h] weight
    (--moe-shared-expert-gate, the Qwen2-MoE family); needs a shared expert."""
    moe_layer_freq: int = 1
    """An MoE layer every N layers, the others dense, starting with layer 0 (--moe-layer-freq)."""


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
class ParallelSizes:
    """The parallel section's first keys: the layout and its sizes (ParallelRecipe)."""

    layout: str = "tsp"
    """tsp (the product), or the baselines dp, tp (tensor parallel), tp_sp (tensor + sequence parallel)."""
    size: int = 2
    """The size of the tsp / tp axis (ignored by dp)."""
    pipeline_size: int = 1
    """Pipeline-parallel stages (composes with every layout)."""
    expert_size: int = 1
    """Expert-parallel size EP of MoE models (--expert-model-parallel-size): each rank holds
    model.num_experts / EP experts. Under tsp, EP = size puts the experts on the TSP group and
    EP = size x k spans k TSP groups of data-parallel ranks; expert tensor parallelism is 1."""
    moe_dispatcher: str = "alltoall"
    """MoE token dispatcher (--moe-token-dispatcher-type): alltoall (tokens sent to their experts'
    ranks). tsp refuses allgather (it gathers every rank's hidden states) and flex (untested)."""


@dataclass
class ParallelRecipe(TSPOptions, ParallelSizes):
    """How the model is split: the layout, its sizes, the TSP options (TSPOptions' fields, the
    tsp_* keys below) and the memory and communication levers."""
    # fields: ParallelSizes', then TSPOptions', then these (dataclasses take the bases' in reverse MRO)

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
    cp_comm_type: str = "all_gather"
    """How the context-parallel baseline's attention meets the other CP ranks' K/V (Megatron's
    TransformerConfig.cp_comm_type, its --cp-comm-type): all_gather (K/V of all S tokens gathered
    on every CP rank, dK/dV reduce-scattered; TE's all-gather CP) or p2p (ring attention: each
    rank's K/V travel around the CP ring, merged by log-sum-exp, dK/dV partials sent back to their
    owner: at most two ranks' K/V of S/CP tokens at a time; TSP's streamed K/V schedule on the CP
    group; document masks as there). Same loss and gradients. Needs context_size > 1. Default
    all_gather until the ring's GPU timing is measured."""
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

    def __post_init__(self):
        """Nothing here: a recipe is filled key by key and checked as a whole (Recipe.check, whose
        RecipeError names the key; tsp_options() builds the core's TSPOptions), and keeps its
        nulls (tsp_lm_head: the layout's head)."""


@dataclass
class TrainRecipe:
    """The optimizer, the steps, checkpoints and logging."""

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
    optimizer_cpu_offload: bool = False
    """Model states off the GPU: the fp32 main weights and Adam's two moments live in pinned host
    memory and Adam steps there, on the CPU (megatron-core's optimizer CPU offload, its
    HybridDeviceOptimizer: the precision-aware distributed optimizer hands it each rank's shard).
    The GPU keeps the bf16 weights and fp32 gradients: 6 bytes per parameter instead of 18; the
    host holds 16 per parameter of the rank's optimizer shard (main weight, two moments, a pinned
    fp32 copy of the gradient). Needs model.dtype = bfloat16 and train.distributed_optimizer =
    true (the shard over data parallel: every layout; at data parallel 1 the rank's whole model);
    not with parallel.fsdp. Same losses as without it to float rounding (the host Adam is torch's
    fused CPU AdamW). The node's host memory must hold it: see train.host_memory_gb."""
    optimizer_offload_fraction: float = 1.0
    """With optimizer_cpu_offload: the fraction (0 < x <= 1) of the rank's optimizer shard, by
    parameters in order, whose state goes to the host; the rest steps on the GPU."""
    host_memory_gb: Optional[float] = None
    """Host memory per node (GiB) for what the run offloads (parallel.offload_activations' layer
    inputs, train.optimizer_cpu_offload's optimizer state, as the planner counts them, for every
    process of the node); null: this node's MemTotal (/proc/meminfo). A run that needs more is
    refused before its first step, naming these keys."""
    seed: int = 1234
    """Seed of weights and data order."""
    log_interval: int = 5
    """Steps between log lines on rank 0."""
    save_dir: Optional[str] = None
    """Checkpoint directory (distributed checkpoint format); null: no checkpoints."""
    save_interval: int = 0
    """Save every N steps (and always at the end when save_dir is set); 0: only at the end."""
    keep_checkpoints: int = 0
    """How many complete checkpoints save_dir keeps (the newest); 0: all. An older one is removed
    only once a newer one is complete and `latest` names it; the one `latest` names never is."""
    resume: bool = False
    """Resume from the latest checkpoint in save_dir, at any layout (TSP / TP / TP+SP size,
    pipeline, data parallel); refused, with the differences listed, when the model's shapes,
    vocabulary or dtype or train.distributed_optimizer differ. A save_dir that is missing or
    holds no checkpoint is an error (never a silent start from step 1); a corrupt latest
    checkpoint is an error naming the last complete one (never a silent fallback)."""
    resume_if_present: bool = False
    """For jobs a scheduler requeues (SLURM --requeue, preemptible queues): resume from save_dir's
    latest checkpoint when there is one, else start at step 1 and say so in one line (Megatron-LM's
    --load behaviour); implies train.resume. CLI: --resume-if-present DIR."""
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
    """The training data: Megatron's mock GPT dataset or an indexed dataset."""

    path: Optional[str] = None
    """Megatron indexed dataset prefix (PATH.bin + PATH.idx); null: mock data."""
    split: str = "100,0,0"
    """train,valid,test split of the indexed dataset."""
    cache_dir: Optional[str] = None
    """Where Megatron caches the dataset indices (defaults next to the data)."""
    reset_attention_mask: bool = False
    """Packed sequences: a token attends only to its own document (documents end at the EOD token;
    Megatron's GPTDataset option of that name). TSP, the CP and the TP + SP (sdpa) baselines."""
    reset_position_ids: bool = False
    """Positions restart at 0 after every EOD token (Megatron's option): learned absolute
    embeddings and, under parallel.layout = tsp, RoPE read them."""
    eod_mask_loss: bool = False
    """No loss on the EOD tokens (Megatron's option)."""
    eod_id: Optional[int] = None
    """The end-of-document token id; null: model.vocab_size - 1 (what the mock data ends documents with)."""
    mock_document_length: int = 0
    """Mock data only (data.path null): 0 keeps Megatron's MockGPTDataset (documents of 1..4095
    tokens counting up); N > 0 packs documents of random lengths 1..N (random tokens, each ended by
    the EOD token), for tests and benchmarks of data.reset_attention_mask."""




# recipe section -> its dataclass (training/recipe.py's Recipe has one field per section)
RECIPE_SECTIONS = {"model": ModelRecipe, "parallel": ParallelRecipe, "train": TrainRecipe, "data": DataRecipe}
# names a docstring may cite, rendered with their value (a number typed once, here)
_DOC_NAMES = {"AUTO_TOKENS_BELOW": str(AUTO_TOKENS_BELOW)}


def field_docs(cls) -> Dict[str, str]:
    """{field: its docstring} of a dataclass and its bases (the string literal under each field,
    as torchtitan's config documents its fields), read from the source with `ast`: Python keeps
    no attribute docstrings at run time. A field without one is missing from the result."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                text = " ".join(after.value.value.split())
                for name, value in _DOC_NAMES.items():
                    text = text.replace(name, value)
                out[stmt.target.id] = text
    return out


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def recipe_fields(keys: Dict[str, str], defaults: Optional[Dict[str, object]] = None):
    """A class decorator (under `@dataclass`) for another front end's inputs that are recipe keys:
    the fields `keys` ({name: its recipe section}, in this order) with the type and default the
    recipe declares, put before the class's own fields. `defaults` holds the front end's own
    defaults where they differ (dataclasses.MISSING: a required field). The meanings stay in the
    recipe's docstrings (`field_docs(RECIPE_SECTIONS[section])[name]`)."""
    defaults = defaults or {}

    def add(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        annotations = {}
        for name, section in keys.items():
            f = {f.name: f for f in dataclasses.fields(RECIPE_SECTIONS[section])}[name]
            annotations[name] = f.type
            default = defaults.get(name, field_default(f))
            if default is not dataclasses.MISSING:
                setattr(cls, name, default)
        cls.__annotations__ = {**annotations, **own}
        return cls

    return add


def recipe_keys() -> Dict[str, Tuple[object, str]]:
    """{"section.key": (default, meaning)} of every recipe key, in declaration order."""
    out = {}
    for section, cls in RECIPE_SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = (field_default(f), docs.get(f.name, ""))
    return out


def _yaml_value(value) -> str:
    return "null" if value is None else "true" if value is True else "false" if value is False else str(value)


def recipe_help(width: int = 100) -> str:
    """Every recipe key with its default and meaning (`megatron-tsp train --help`)."""
    lines = []
    for section, cls in RECIPE_SECTIONS.items():
        lines.append(f"{section}: {' '.join((cls.__doc__ or '').split())}")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  {section}.{f.name} (default: {_yaml_value(field_default(f))})")
            lines += textwrap.wrap(docs.get(f.name, ""), width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


# parallel.<key> of each TSP option (TSPOptions' fields) -> (its --tsp-* flag of pretrain_gpt.py, its
# choices), from the fields' declaration: megatron_lm/arguments.py's flags and the flags its errors say
# for the recipe keys the core names (in_flags) read this.
TSP_OPTION_KEYS = {f.name: (f.metadata["flag"], f.metadata["choices"]) for f in dataclasses.fields(TSPOptions)}

# Megatron-LM options whose model builder paths the TSP model and our native specs do not take
# (each has a spec of its own in Megatron's gpt_builder): refused at parse time with --tsp-size and
# at build time with our specs (megatron_lm/arguments.py, megatron_lm/build.py).
REFUSED_BUILDER_FLAGS = (("yaml_cfg", "--yaml-cfg"), ("use_legacy_models", "--use-legacy-models"), ("spec", "--spec"),
                         ("num_experts", "--num-experts"), ("mtp_num_layers", "--mtp-num-layers"),
                         ("experimental_attention_variant", "--experimental-attention-variant"),
                         ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"))


def tsp_options_from(get) -> TSPOptions:
    """TSPOptions from `get(recipe key)` (a parallel.<key> of TSP_OPTION_KEYS; None: the default)."""
    return TSPOptions(**{key: value for key in TSP_OPTION_KEYS if (value := get(key)) is not None})


def require_group(group, what: str, argument: str):
    """`group`, or one clear error naming the argument that should have carried it: a TSP module
    never falls back to Megatron's global groups (which may not be the ones it runs on)."""
    if group is None:
        raise TSPConfigError(
            f"{what} needs its process group passed explicitly as `{argument}` "
            "(megatron_tsp.initialize_model_parallel returns the ProcessGroupCollection)"
        )
    return group


def require_groups(pg_collection, names, what: str):
    """`pg_collection` holding every group in `names` (`compat.DDP_GROUPS`, ...), or one clear
    error naming the missing ones: Megatron's DDP, optimizer, finalize_model_grads and schedules
    read the global groups (or make a stand-in) for what they are not handed."""
    require_group(pg_collection, what, "pg_collection")
    missing = [n for n in names if n not in vars(pg_collection)]
    if missing:
        raise TSPConfigError(f"{what}: `pg_collection` lacks the group(s) {', '.join(missing)} (the collection "
                             "megatron_tsp.initialize_model_parallel returns has them all)")
    return pg_collection


# -- mixture of experts (megatron_tsp.tsp.moe runs them) -------------------------------------

DISPATCHERS = ("alltoall",)
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def moe_layer_pattern(config) -> List[int]:
    """1 for an MoE layer, 0 for a dense one, per layer (Megatron's reading of
    `moe_layer_freq`: an int N puts experts in layers 0, N, 2N, ...; a list gives each layer)."""
    freq, n = config.moe_layer_freq, config.num_layers
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        return [1 if i % freq == 0 else 0 for i in range(n)]
    if isinstance(freq, (list, tuple)) and len(freq) == n and all(v in (0, 1) for v in freq):
        return list(freq)
    raise TSPConfigError(
        f"--moe-layer-freq = {freq!r} must be a positive integer or a list of {n} zeros and ones "
        f"(one per layer, --num-layers = {n})"
    )


def check_expert_parallel(num_experts: Optional[int], expert_model_parallel_size: int, world_size: int, tsp_size: int,
                          pipeline_model_parallel_size: int = 1, expert_tensor_parallel_size: int = 1) -> None:
    """The expert-parallel layout: EP divides the experts (unchecked when `num_experts` is None,
    as when the groups are built) and fits the ranks of a pipeline stage."""
    ep = expert_model_parallel_size
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise TSPConfigError(f"--expert-model-parallel-size must be a positive integer, got {ep!r}")
    if expert_tensor_parallel_size not in (None, 1):
        raise TSPConfigError(
            f"--expert-tensor-parallel-size = {expert_tensor_parallel_size} cannot be combined with parallel.size: "
            f"expert tensor parallelism all-gathers each rank's tokens over its group; use 1 (the default with TSP)"
        )
    if num_experts is not None and ep > 1 and not num_experts:
        raise TSPConfigError(f"--expert-model-parallel-size = {ep} needs --num-experts")
    if num_experts and num_experts % ep:
        raise TSPConfigError(
            f"--num-experts = {num_experts} must be divisible by --expert-model-parallel-size = {ep}"
        )
    stage = world_size // pipeline_model_parallel_size
    if world_size % pipeline_model_parallel_size or stage % ep:
        raise TSPConfigError(
            f"--expert-model-parallel-size = {ep} does not fit the world: the {world_size} ranks / "
            f"--pipeline-model-parallel-size {pipeline_model_parallel_size} = {stage} ranks per stage "
            f"must be a multiple of it (EP spans TSP ranks, D = {tsp_size}, then data-parallel ranks)"
        )


def check_moe_config(config, tsp_size: int) -> None:
    """Every MoE option the TSP layer does not run exactly, refused (pure function of the config)."""
    E = config.num_moe_experts
    if not isinstance(E, int) or isinstance(E, bool) or E < 1:
        raise TSPConfigError(f"--num-experts must be a positive integer, got {E!r}")
    dispatcher = config.moe_token_dispatcher_type
    if dispatcher not in DISPATCHERS:
        why = {
            "allgather": "it all-gathers every rank's hidden states over TP x EP, i.e. the whole sequence",
            "flex": "DeepEP / HybridEP is not tested with TSP in this version",
        }.get(dispatcher, "unknown dispatcher")
        raise TSPConfigError(
            f"--moe-token-dispatcher-type = {dispatcher!r} is not supported with parallel.size ({why}): use alltoall"
        )
    etp = getattr(config, "expert_tensor_parallel_size", 1)
    if etp not in (None, 1):
        raise TSPConfigError(
            f"--expert-tensor-parallel-size = {etp} cannot be combined with parallel.size: expert tensor "
            f"parallelism all-gathers each rank's tokens over its group; use 1"
        )
    k = config.moe_router_topk
    if not 1 <= k <= E:
        raise TSPConfigError(f"--moe-router-topk = {k} must be between 1 and --num-experts = {E}")
    types = config.moe_router_load_balancing_type
    for t in types if isinstance(types, list) else [types]:
        if t not in LOAD_BALANCING:
            raise TSPConfigError(
                f"--moe-router-load-balancing-type = {t!r} is not supported with parallel.size "
                f"(use one of {', '.join(LOAD_BALANCING)}; sinkhorn normalises over each rank's tokens)"
            )
    shared = config.moe_shared_expert_intermediate_size
    if shared is not None:
        if shared % tsp_size:
            raise TSPConfigError(
                f"--moe-shared-expert-intermediate-size = {shared} must be divisible by parallel.size = {tsp_size} "
                f"(the shared expert runs as the TSP MLP)"
            )
        if config.add_bias_linear:
            raise TSPConfigError("shared experts need --disable-bias-linear (add_bias_linear = False), as in Megatron")
    elif getattr(config, "moe_shared_expert_gate", False):
        raise TSPConfigError("--moe-shared-expert-gate gates the shared expert: it needs "
                             "--moe-shared-expert-intermediate-size")
    unsupported = {
        "moe_shared_expert_overlap": "--moe-shared-expert-overlap",
        "moe_router_fusion": "--moe-router-fusion",
        "moe_latent_size": "--moe-latent-size",
        "moe_use_upcycling": "--moe-use-upcycling",
        "moe_enable_routing_replay": "--moe-enable-routing-replay",
    }
    for name, flag in unsupported.items():
        value = getattr(config, name, None)
        if value:
            raise TSPConfigError(f"{flag} ({name}={value!r}) is not supported with parallel.size in this version")
    if tsp_size > 1 and config.moe_expert_capacity_factor is not None and config.moe_pad_expert_input_to_capacity:
        raise TSPConfigError(
            "--moe-pad-expert-input-to-capacity is not supported with parallel.size > 1: the capacity is decided over "
            "the whole micro-batch, so a rank's share of an expert's capacity varies (drop without padding)"
        )
    policy = config.moe_token_drop_policy
    if config.moe_expert_capacity_factor is not None and policy not in ("probs", "position"):
        raise TSPConfigError(f"--moe-token-drop-policy = {policy!r} must be probs or position")
    moe_layer_pattern(config)


def moe_config_kwargs(shape, dispatcher: str = "alltoall") -> dict:
    """TransformerConfig fields of a ModelShape's MoE fields (empty for a dense shape)."""
    if not shape.num_experts:
        return {}
    return dict(
        num_moe_experts=shape.num_experts, moe_ffn_hidden_size=shape.moe_ffn_hidden_size or shape.ffn_hidden_size,
        moe_router_topk=shape.moe_router_topk, moe_router_score_function=shape.moe_router_score_function,
        moe_router_pre_softmax=shape.moe_router_pre_softmax,
        moe_router_load_balancing_type=shape.moe_router_load_balancing_type,
        moe_aux_loss_coeff=shape.moe_aux_loss_coeff, moe_z_loss_coeff=shape.moe_z_loss_coeff,
        moe_expert_capacity_factor=shape.moe_expert_capacity_factor, moe_token_drop_policy=shape.moe_token_drop_policy,
        moe_shared_expert_intermediate_size=shape.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=shape.moe_shared_expert_gate,
        moe_layer_freq=shape.moe_layer_freq, moe_token_dispatcher_type=dispatcher,
    )


def check_context_parallel(seq_length: int, cp_size: int, tp_size: int = 1, sequence_parallel: bool = False,
                           what: str = "model.seq_length", cp_key: str = "parallel.context_size",
                           tp_key: str = "parallel.size") -> None:
    """The sequence must cut into 2*CP equal chunks, and (sequence parallel) each CP rank's
    S/CP tokens into TP equal slices."""
    if cp_size < 1:
        raise TSPConfigError(f"{cp_key} = {cp_size} must be >= 1")
    if cp_size > 1 and seq_length % (2 * cp_size):
        raise TSPConfigError(f"{what} = {seq_length} must be divisible by 2 x {cp_key} = {2 * cp_size} "
                             "(context parallelism cuts each sequence into 2*CP equal chunks)")
    if sequence_parallel and (seq_length // cp_size) % tp_size:
        raise TSPConfigError(f"{what} / {cp_key} = {seq_length // cp_size} must be divisible by {tp_key} = "
                             f"{tp_size} (sequence parallelism splits each CP rank's tokens over TP)")


def yaml_problem(error) -> str:
    """A YAML error in a few words: its problem and line/column (1-based), and the line where the
    construct it broke starts ("while parsing a flow sequence" at line 3), no excerpt of the file."""
    mark, context_mark = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    problem, context = getattr(error, "problem", None), getattr(error, "context", None)
    if mark is None or problem is None:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if context and context_mark is not None and context_mark.line != mark.line:
        text += f" ({context} started at line {context_mark.line + 1})"
    return text


def read_yaml_file(path: str, error=TSPConfigError):
    """The YAML document at `path` ({} when empty). A file that is missing, unreadable or not
    valid YAML raises `error` in one line naming the file (and the line: docs/training.md)."""
    import yaml

    if not os.path.isfile(path):
        raise error(f"recipe file {path!r} does not exist")
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise error(f"recipe file {path!r} is not valid YAML: {yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"recipe file {path!r} cannot be read: {e}") from None
