"""What TSP supports, checked once, before any collective.

Every check here is a pure function of the configuration, so every rank raises the same
`TSPConfigError` before the first broadcast or all-gather: a bad flag never hangs a job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class TSPConfigError(ValueError):
    """A configuration TSP cannot run. The message names the flag or shape at fault."""


def check_tsp_size(tsp_size: int) -> None:
    if not isinstance(tsp_size, int) or isinstance(tsp_size, bool) or tsp_size < 1:
        raise TSPConfigError(f"--tsp-size must be a positive integer, got {tsp_size!r}")


def check_seq_length(seq_length: int, tsp_size: int, what: str = "--seq-length") -> None:
    """Zigzag needs 2*D equal chunks per sequence."""
    if seq_length % (2 * tsp_size) != 0:
        raise TSPConfigError(
            f"{what} = {seq_length} must be divisible by 2 x --tsp-size = {2 * tsp_size} "
            f"(the zigzag layout cuts each sequence into 2*D equal chunks)"
        )


def check_world_size(world_size: int, tsp_size: int, pipeline_model_parallel_size: int = 1) -> None:
    model_size = tsp_size * pipeline_model_parallel_size
    if world_size % model_size != 0:
        raise TSPConfigError(
            f"world size {world_size} is not divisible by --tsp-size ({tsp_size}) x "
            f"--pipeline-model-parallel-size ({pipeline_model_parallel_size}) = {model_size}"
        )


def check_parallel_sizes(
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
) -> None:
    """TSP takes Megatron's TP slot: it cannot be combined with native TP or CP."""
    if tensor_model_parallel_size not in (None, 1):
        raise TSPConfigError(
            f"--tensor-model-parallel-size = {tensor_model_parallel_size} cannot be combined with "
            f"--tsp-size: TSP takes the tensor-parallel slot (leave it at 1)"
        )
    if context_parallel_size not in (None, 1):
        raise TSPConfigError(
            f"--context-parallel-size = {context_parallel_size} cannot be combined with "
            f"--tsp-size: TSP already splits the sequence (leave it at 1)"
        )
    if expert_model_parallel_size not in (None, 1):
        raise TSPConfigError(
            f"--expert-model-parallel-size = {expert_model_parallel_size}: MoE is not supported "
            f"with --tsp-size in this version"
        )


def validate_transformer_config(config, tsp_size: int, seq_length: Optional[int] = None) -> None:
    """Reject every TransformerConfig option the TSP attention and ring MLP do not implement."""
    check_tsp_size(tsp_size)
    D = tsp_size
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    if heads % D != 0:
        raise TSPConfigError(
            f"--num-attention-heads = {heads} must be divisible by --tsp-size = {D}"
        )
    if groups % D != 0:
        raise TSPConfigError(
            f"--num-query-groups = {groups} must be divisible by --tsp-size = {D} "
            f"(each TSP weight shard holds whole KV groups)"
        )
    ffn = config.ffn_hidden_size
    if ffn % D != 0:
        raise TSPConfigError(f"--ffn-hidden-size = {ffn} must be divisible by --tsp-size = {D}")
    if seq_length is not None:
        check_seq_length(seq_length, D)
    check_parallel_sizes(
        config.tensor_model_parallel_size if D == 1 else 1,
        config.context_parallel_size,
        config.expert_model_parallel_size,
    )
    if D > 1 and config.tensor_model_parallel_size != D:
        raise TSPConfigError(
            f"TransformerConfig.tensor_model_parallel_size = {config.tensor_model_parallel_size} "
            f"but --tsp-size = {D}: build the config with megatron_tsp.tsp_transformer_config "
            f"(TSP runs in the tensor-parallel slot)"
        )
    if D > 1 and not config.sequence_parallel:
        raise TSPConfigError(
            "TransformerConfig.sequence_parallel must be True with --tsp-size > 1 "
            "(norm gradients are summed over the TSP group like Megatron's sequence parallelism)"
        )
    unsupported = {
        "num_moe_experts": ("--num-experts", lambda v: v not in (None, 0)),
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
    for field, (flag, bad) in unsupported.items():
        value = getattr(config, field, None)
        if bad(value):
            raise TSPConfigError(
                f"{flag} ({field}={value!r}) is not supported with --tsp-size in this version"
            )
    if config.recompute_granularity == "selective":
        # Megatron's selective recompute checkpoints core_attention, which TSP attention never
        # calls (and TSP never keeps S x S scores): it would silently do nothing.
        raise TSPConfigError(
            "--recompute-granularity selective (parallel.recompute = selective) is not supported with "
            "--tsp-size: use full (layer recompute) and/or --tsp-recompute full"
        )


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


RECOMPUTE_MODES = ("none", "full")
MLP_EXCHANGES = ("ring", "broadcast", "tokens", "auto")
LM_HEADS = ("local", "megatron")
# the chunk-attention kernels of tsp/kernels.py (`auto` picks one per device and shape there)
BACKENDS = ("auto", "cudnn", "flash", "math", "math_split")
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


@dataclass(frozen=True)
class TSPOptions:
    """How the TSP blocks run; passed explicitly through the layer spec (no global state).

    recompute: `none` saves, per weight shard, what the backward reads (attention: q and the
      local k/v after RoPE, the attention output and its log-sum-exp; MLP: the fc1 output), as
      Megatron does without recompute; `full` saves only the block input and recomputes each
      shard's forward in backward (least memory, one more forward of GEMMs and attention).
    attention_backend: the chunk-attention kernel (BACKENDS).
    mlp_exchange: how the MLP meets its weights: `ring` (weight shards travel to the next rank,
      gradients travel with the shard), `broadcast` (from the owner, as attention does;
      gradients reduced onto the owner), `tokens` (the weights stay; the tokens are all-gathered
      and the output reduce-scattered: Megatron's sequence-parallel MLP on the TSP group, for
      short sequences where moving tokens is cheaper than moving weights), or `auto` (`tokens`
      when a rank holds fewer than AUTO_TOKENS_BELOW tokens, else `ring`). The same math.
    lm_head: `local` (default): the sequence-local LM head and cross entropy (megatron_tsp.tsp.lm_head:
      each rank computes logits for its own tokens only, the vocab shards travel over the group,
      online log-sum-exp); `megatron`: Megatron's output layer + vocab-parallel cross entropy
      (all S tokens' logits, S x V/D per rank). The same loss and gradients.
    lm_head_chunk_tokens: local tokens per chunk of the local head: at most this many x V/D logits
      exist at a time (forward and backward).
    compute_only: benchmark only. Every TSP collective is skipped (shards and K/V stay local, so
      the numbers are wrong) to time the same kernels without communication.
    """

    recompute: str = "none"
    attention_backend: str = "auto"
    mlp_exchange: str = "auto"
    lm_head: str = "local"
    lm_head_chunk_tokens: int = 4096
    compute_only: bool = False

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_MODES:
            raise TSPConfigError(f"--tsp-recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {self.recompute!r}")
        if self.mlp_exchange not in MLP_EXCHANGES:
            raise TSPConfigError(
                f"--tsp-mlp-exchange must be one of {', '.join(MLP_EXCHANGES)}, got {self.mlp_exchange!r}"
            )
        if self.lm_head not in LM_HEADS:
            raise TSPConfigError(f"--tsp-lm-head must be one of {', '.join(LM_HEADS)}, got {self.lm_head!r}")
        chunk = self.lm_head_chunk_tokens
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise TSPConfigError(f"--tsp-lm-head-chunk-tokens must be a positive integer, got {chunk!r}")
        if self.compute_only and self.mlp_exchange == "tokens":
            raise TSPConfigError("--tsp-mlp-exchange tokens runs Megatron's own collectives, which the compute-only "
                                 "benchmark mode cannot skip: use ring, broadcast or auto")
        if self.attention_backend not in BACKENDS:
            raise TSPConfigError(
                f"--tsp-attention-backend must be one of {', '.join(BACKENDS)}, got {self.attention_backend!r}"
            )
