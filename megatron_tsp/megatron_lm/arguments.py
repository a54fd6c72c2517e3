"""`--tsp-size` for Megatron-style argument parsers.

`add_tsp_args(parser)` adds the flags (usable as Megatron's `extra_args_provider`);
`apply_tsp_args(args)` maps it before Megatron validates its arguments: TSP takes the TP slot
(`tensor_model_parallel_size = D`, `sequence_parallel = True`, `args.tsp = True`). Works on a
plain argparse namespace: attributes Megatron would define are read with defaults.

For Megatron-LM's `pretrain_gpt.py` (`megatron_tsp.megatron_lm.run`, `patches/`):
`add_tsp_args(parser, megatron_lm=True)` also adds `--tsp-recipe` and `--tsp-native-spec`, and
`install_tsp_parsing(parser)` makes the parser expand the recipe and apply the mapping itself,
so that every rank fails on a bad flag at parse time, before any collective.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from ..config import (BACKENDS, LM_HEADS, MLP_EXCHANGES, RECOMPUTE_MODES, TSPConfigError, TSPOptions, check_parallel_sizes,
                      check_seq_length, check_tsp_size)

NATIVE_SPECS = ("megatron", "sp_norm", "sdpa")


def add_tsp_args(parser: argparse.ArgumentParser, megatron_lm: bool = False) -> argparse.ArgumentParser:
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
    if megatron_lm:
        group.add_argument(
            "--tsp-recipe", metavar="FILE", default=None,
            help="YAML recipe in Megatron's functional-test format: MODEL_ARGS (flag: value; true = "
                 "bare flag, false/null = left out, a list = several values) are inserted before the "
                 "command line, whose flags replace the recipe's of the same name; ENV_VARS are set "
                 "unless already in the environment.",
        )
        group.add_argument(
            "--tsp-native-spec", choices=NATIVE_SPECS, default="megatron",
            help="Layer spec of runs without TSP (--tsp-size 1): megatron = Megatron's own choice "
                 "(plain pretrain_gpt.py); sp_norm = Megatron's local spec with sequence-parallel-"
                 "capable norms (--sequence-parallel without Transformer Engine or apex); sdpa = "
                 "sp_norm with torch scaled_dot_product_attention as core attention (the kernel "
                 "family TSP uses, no S x S scores). Ignored with --tsp-size > 1.",
        )
    group.add_argument(
        "--tsp-mlp-exchange", choices=MLP_EXCHANGES, default="auto",
        help="How the MLP meets its weights: ring (weight shards sent to the next rank, gradients travel "
             "with the shard), broadcast (from the owner, as attention; gradients reduced onto it), tokens "
             "(weights stay, tokens all-gathered and outputs reduce-scattered: Megatron's sequence-parallel "
             "MLP on the TSP group) or auto (tokens below 8192 tokens per rank, else ring).",
    )
    group.add_argument(
        "--tsp-lm-head", choices=LM_HEADS, default="local",
        help="local: the sequence-local LM head and cross entropy (logits of this rank's tokens only; "
             "vocab shards travel over the TSP group; online log-sum-exp chunked along tokens); "
             "megatron: Megatron's output layer + vocab-parallel cross entropy (all S tokens' logits).",
    )
    group.add_argument(
        "--tsp-lm-head-chunk-tokens", type=int, default=4096,
        help="Local tokens per chunk of the local LM head: at most this many x V/D logits at a time.",
    )
    return parser


def tsp_options_from_args(args: argparse.Namespace) -> TSPOptions:
    return TSPOptions(recompute=getattr(args, "tsp_recompute", "none"),
                      attention_backend=getattr(args, "tsp_attention_backend", "auto"),
                      mlp_exchange=getattr(args, "tsp_mlp_exchange", "auto"),
                      lm_head=getattr(args, "tsp_lm_head", "local"),
                      lm_head_chunk_tokens=getattr(args, "tsp_lm_head_chunk_tokens", 4096))


def apply_tsp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate and map `--tsp-size` onto Megatron's arguments, in place. Raises TSPConfigError."""
    D = getattr(args, "tsp_size", None)
    D = 1 if D is None else D  # --tsp-size 0 is an error, not "off"
    check_tsp_size(D)
    args.tsp = D > 1
    if D == 1:
        return args
    get = lambda name, default=None: getattr(args, name, default)
    check_parallel_sizes(get("tensor_model_parallel_size", 1), get("context_parallel_size", 1),
                         get("expert_model_parallel_size", 1))
    if get("num_experts"):
        raise TSPConfigError("--num-experts (MoE) cannot be combined with --tsp-size in this version")
    for flag in ("reset_attention_mask", "reset_position_ids"):
        if get(flag):
            raise TSPConfigError(f"--{flag.replace('_', '-')} (packed sequences) cannot be combined with --tsp-size")
    if get("sft"):
        raise TSPConfigError("--sft (packed sequences, THD) cannot be combined with --tsp-size")
    if get("hybrid_context_parallel"):
        raise TSPConfigError("--hybrid-context-parallel cannot be combined with --tsp-size")
    if get("tp_comm_overlap"):
        raise TSPConfigError("--tp-comm-overlap cannot be combined with --tsp-size")
    # Options of Megatron-LM's model builder that the TSP model does not implement.
    for name, flag in (("yaml_cfg", "--yaml-cfg"), ("use_legacy_models", "--use-legacy-models"),
                       ("spec", "--spec"), ("mtp_num_layers", "--mtp-num-layers"),
                       ("experimental_attention_variant", "--experimental-attention-variant"),
                       ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path")):
        if get(name):
            raise TSPConfigError(f"{flag} cannot be combined with --tsp-size: the TSP model has its own layer spec")
    heads = get("num_attention_heads")
    if heads is not None and heads % D:
        raise TSPConfigError(f"--num-attention-heads = {heads} must be divisible by --tsp-size = {D}")
    groups = get("num_query_groups") if get("group_query_attention") else None
    if groups is not None and groups % D:
        raise TSPConfigError(f"--num-query-groups = {groups} must be divisible by --tsp-size = {D}")
    if get("seq_length") is not None:
        check_seq_length(args.seq_length, D)
    if tsp_options_from_args(args).lm_head == "local" and get("defer_embedding_wgrad_compute"):
        raise TSPConfigError("--defer-embedding-wgrad-compute is not supported by the sequence-local LM head "
                             "(--tsp-lm-head local): use --tsp-lm-head megatron")
    args.tensor_model_parallel_size = D
    args.sequence_parallel = True
    return args


# -- Megatron-LM: recipes and parse-time mapping ---------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: str, where: str) -> str:
    def sub(match):
        name = match.group(1)
        if name not in os.environ:
            raise TSPConfigError(f"--tsp-recipe {where} uses ${{{name}}}, which is not set in the environment")
        return os.environ[name]
    return _ENV_REF.sub(sub, value)


def load_recipe(path: str) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """A recipe in Megatron's functional-test format (`MODEL_ARGS`, optional `ENV_VARS`) as
    ({flag: [values]} in file order, {variable: value}). `${VAR}` is taken from the environment."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise TSPConfigError(f"--tsp-recipe {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise TSPConfigError(f"--tsp-recipe {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("MODEL_ARGS"), dict):
        raise TSPConfigError(f"--tsp-recipe {path}: expected a mapping with a MODEL_ARGS mapping of flags")
    unknown = sorted(set(data) - {"MODEL_ARGS", "ENV_VARS"})
    if unknown:
        raise TSPConfigError(f"--tsp-recipe {path}: unknown section(s) {', '.join(unknown)} (valid: MODEL_ARGS, ENV_VARS)")
    flags: Dict[str, List[str]] = {}
    for flag, value in data["MODEL_ARGS"].items():
        where = f"MODEL_ARGS {flag}"
        if not isinstance(flag, str) or not flag.startswith("--") or "=" in flag:
            raise TSPConfigError(f"--tsp-recipe {path}: {where!r} is not a flag (write --name: value)")
        if flag == "--tsp-recipe":
            raise TSPConfigError(f"--tsp-recipe {path}: a recipe cannot include another (--tsp-recipe)")
        if value is False or value is None:
            continue
        if value is True:
            flags[flag] = []
        elif isinstance(value, list):
            flags[flag] = [_expand_env(str(v), f"{path}: {where}") for v in value]
        elif isinstance(value, dict):
            raise TSPConfigError(f"--tsp-recipe {path}: {where} is a mapping; expected a scalar or a list")
        else:
            flags[flag] = [_expand_env(str(value), f"{path}: {where}")]
    env = data.get("ENV_VARS") or {}
    if not isinstance(env, dict):
        raise TSPConfigError(f"--tsp-recipe {path}: ENV_VARS must be a mapping of variable: value")
    return flags, {str(k): _expand_env(str(v), f"{path}: ENV_VARS {k}") for k, v in env.items()}


def _flag_groups(argv: List[str]) -> List[Tuple[str, List[str]]]:
    """Split a command line into (flag, [its tokens]); `--flag=value` counts as the flag."""
    groups: List[Tuple[str, List[str]]] = []
    for token in argv:
        if token.startswith("--"):
            groups.append((token.split("=", 1)[0], [token]))
        elif groups:
            groups[-1][1].append(token)
        else:
            groups.append(("", [token]))
    return groups


def _recipe_path(argv: List[str]) -> Optional[str]:
    for flag, tokens in _flag_groups(argv):
        if flag == "--tsp-recipe":
            return tokens[0].split("=", 1)[1] if "=" in tokens[0] else (tokens[1] if len(tokens) > 1 else None)
    return None


def expand_tsp_recipe(argv: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """Replace `--tsp-recipe FILE` in `argv` by the recipe's flags, placed first; a flag given on
    the command line replaces the recipe's entry of the same name. Returns (argv, ENV_VARS)."""
    groups = _flag_groups(argv)
    recipes = [g for g in groups if g[0] == "--tsp-recipe"]
    if not recipes:
        return list(argv), {}
    if len(recipes) > 1:
        raise TSPConfigError("--tsp-recipe is given more than once")
    tokens = recipes[0][1]
    values = [tokens[0].split("=", 1)[1]] if "=" in tokens[0] else tokens[1:]
    if len(values) != 1:
        raise TSPConfigError("--tsp-recipe takes exactly one FILE")
    flags, env = load_recipe(values[0])
    given = {g[0] for g in groups}
    merged: List[str] = []
    for flag, flag_values in flags.items():
        if flag not in given:
            merged += [flag] + flag_values
    for flag, flag_tokens in groups:
        if flag != "--tsp-recipe":
            merged += flag_tokens
    return merged, env


def install_tsp_parsing(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser.parse_args` / `parse_known_args` expand `--tsp-recipe` (setting its ENV_VARS
    where unset) and apply `apply_tsp_args`. A bad input ends the process with one
    `error: ...` line naming the flag (exit code 2), on every rank, before any collective."""
    parse_known_args = parser.parse_known_args

    def parse_known_args_with_tsp(args: Optional[List[str]] = None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        try:
            recipe = _recipe_path(argv)
            argv, env = expand_tsp_recipe(argv)
        except TSPConfigError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        for name, value in env.items():
            os.environ.setdefault(name, value)
        namespace, extras = parse_known_args(argv, namespace)
        namespace.tsp_recipe = recipe
        try:
            apply_tsp_args(namespace)
        except TSPConfigError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        return namespace, extras

    parser.parse_known_args = parse_known_args_with_tsp
    return parser
