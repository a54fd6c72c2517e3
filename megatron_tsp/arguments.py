"""`--tsp-size` for Megatron-style argument parsers.

`add_tsp_args(parser)` adds the flags (usable as Megatron's `extra_args_provider`);
`apply_tsp_args(args)` maps it before Megatron validates its arguments: TSP takes the TP slot
(`tensor_model_parallel_size = D`, `sequence_parallel = True`, `args.tsp = True`). Works on a
plain argparse namespace: attributes Megatron would define are read with defaults.
"""

from __future__ import annotations

import argparse

from .config import (RECOMPUTE_MODES, TSPConfigError, TSPOptions, check_parallel_sizes, check_seq_length,
                     check_tsp_size)
from .kernels import BACKENDS


def add_tsp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("tsp", "folded tensor and sequence parallelism (megatron-tsp)")
    group.add_argument(
        "--tsp-size", type=int, default=1,
        help="Size D of the TSP axis: every rank of a group of D holds 1/D of each layer's weights "
             "and 1/D of the tokens. Takes the tensor-parallel slot; 1 disables TSP.",
    )
    group.add_argument(
        "--tsp-recompute", choices=RECOMPUTE_MODES, default="none",
        help="none: save each weight shard's q, k/v, attention output and fc1 output for backward "
             "(as Megatron without recompute); full: save only block inputs and recompute each shard's "
             "forward in backward (least memory).",
    )
    group.add_argument(
        "--tsp-attention-backend", choices=BACKENDS, default="auto",
        help="Chunk-attention kernel of TSP attention: auto (cudnn on GPUs in bf16/fp16, else math), "
             "cudnn, flash, math, math_split.",
    )
    return parser


def tsp_options_from_args(args: argparse.Namespace) -> TSPOptions:
    return TSPOptions(recompute=getattr(args, "tsp_recompute", "none"),
                      attention_backend=getattr(args, "tsp_attention_backend", "auto"))


def apply_tsp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate and map `--tsp-size` onto Megatron's arguments, in place. Raises TSPConfigError."""
    D = getattr(args, "tsp_size", 1) or 1
    check_tsp_size(D)
    args.tsp = D > 1
    if D == 1:
        return args
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    check_parallel_sizes(get("tensor_model_parallel_size", 1), get("context_parallel_size", 1),
                         get("expert_model_parallel_size", 1))
    if get("num_experts"):
        raise TSPConfigError("--num-experts (MoE) cannot be combined with --tsp-size in this version")
    for flag in ("reset_attention_mask", "reset_position_ids"):
        if get(flag):
            raise TSPConfigError(f"--{flag.replace('_', '-')} (packed sequences) cannot be combined with --tsp-size")
    if get("tp_comm_overlap"):
        raise TSPConfigError("--tp-comm-overlap cannot be combined with --tsp-size")
    heads = get("num_attention_heads")
    if heads is not None and heads % D:
        raise TSPConfigError(f"--num-attention-heads = {heads} must be divisible by --tsp-size = {D}")
    groups = get("num_query_groups") if get("group_query_attention") else None
    if groups is not None and groups % D:
        raise TSPConfigError(f"--num-query-groups = {groups} must be divisible by --tsp-size = {D}")
    if get("seq_length") is not None:
        check_seq_length(args.seq_length, D)
    args.tensor_model_parallel_size = D
    args.sequence_parallel = True
    return args
