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
import dataclasses
import functools
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from ..config import (REFUSED_BUILDER_FLAGS, TSP_OPTION_KEYS, TSPConfigError, TSPOptions,
                      check_expert_parallel, check_moe_config, check_parallel_sizes, check_seq_length, check_tsp_size,
                      field_default, field_docs, tsp_options_from)

NATIVE_SPECS = ("megatron", "sp_norm", "sdpa")


def add_tsp_args(parser: argparse.ArgumentParser, megatron_lm: bool = False) -> argparse.ArgumentParser:
    group = parser.add_argument_group("tsp", "folded tensor and sequence parallelism (megatron-tsp)")
    group.add_argument(
        "--tsp-size", type=int, default=1,
        help="Size D of the TSP axis: every rank of a group of D holds 1/D of each layer's weights "
             "and 1/D of the tokens. Takes the tensor-parallel slot; 1 disables TSP.",
    )
    _add_option_flags(group, ("tsp_recompute", "tsp_attention_backend", "tsp_attention_kv"))
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
    _add_option_flags(group, ("tsp_mlp_exchange", "tsp_lm_head", "lm_head_chunk_tokens", "mlp_chunk_tokens"))
    return parser


def _add_option_flags(group, keys) -> None:
    """The --tsp-* flags of these TSP options (config.TSPOptions' fields, the recipe's parallel.<key>s):
    flag, choices, help and default from the field, declared once in megatron_tsp.config."""
    docs, fields = field_docs(TSPOptions), {f.name: f for f in dataclasses.fields(TSPOptions)}
    for key in keys:
        flag, choices = TSP_OPTION_KEYS[key]
        default = field_default(fields[key])
        if default is None:  # a per-layout recipe default (tsp_lm_head: null = local): the core's
            default = getattr(TSPOptions(), key)
        group.add_argument(flag, choices=choices, default=default, type=None if choices else type(default),
                           help=f"Recipe key parallel.{key}. " + docs[key].replace("%", "%%")
                           + f" (default: {default})")


# The recipe keys the core's errors name (config.TSPConfigError) -> this front end's flags.
TSP_FLAGS = {"parallel.size": "--tsp-size",
             **{f"parallel.{key}": flag for key, (flag, _) in TSP_OPTION_KEYS.items() if flag}}
_RECIPE_KEY = re.compile(r"\bparallel\.\w+")


def flag_words(text: str) -> str:
    """`text` with each recipe key that pretrain_gpt.py takes as a flag (TSP_FLAGS) said as the flag."""
    return _RECIPE_KEY.sub(lambda m: TSP_FLAGS.get(m.group(0), m.group(0)), text)


def in_flags(error: TSPConfigError) -> TSPConfigError:
    """`error`, in place, as pretrain_gpt.py says it: its message with the flags for the recipe
    keys the core names, and `error.flag`, the flag of `error.option` (None where it has none)."""
    if error.args and isinstance(error.args[0], str):
        error.args = (flag_words(error.args[0]),) + error.args[1:]
    error.flag = TSP_FLAGS.get(getattr(error, "option", None))
    return error


def flag_errors(fn):
    """`fn` whose TSPConfigErrors say pretrain_gpt.py's flags (in_flags)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TSPConfigError as e:
            in_flags(e)
            raise

    return wrapper


def tsp_options_from_args(args: argparse.Namespace) -> TSPOptions:
    return tsp_options_from(lambda key: getattr(args, TSP_OPTION_KEYS[key][0][2:].replace("-", "_"), None)
                            if TSP_OPTION_KEYS[key][0] else None)


@flag_errors
def apply_tsp_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate and map `--tsp-size` onto Megatron's arguments, in place. Raises TSPConfigError
    naming the flag."""
    D = getattr(args, "tsp_size", None)
    D = 1 if D is None else D  # --tsp-size 0 is an error, not "off"
    check_tsp_size(D)
    args.tsp = D > 1
    if D == 1:
        if tsp_options_from_args(args).mlp_chunk_tokens and getattr(args, "tsp_native_spec", "megatron") == "megatron":
            raise TSPConfigError("--tsp-mlp-chunk-tokens needs the plugin's model: --tsp-size > 1, or "
                                 "--tsp-native-spec sp_norm|sdpa for the baselines (Megatron's own spec is not tiled)")
        if tsp_options_from_args(args).tsp_attention_kv == "streamed":
            raise TSPConfigError("--tsp-attention-kv streamed needs --tsp-size > 1: with --tsp-size 1 the model is "
                                 "Megatron's own, whose attention is not TSP's")
        native_spec = getattr(args, "tsp_native_spec", "megatron")
        if native_spec == "sdpa":  # the baseline's SDPA reads document ids as TSP does
            apply_tsp_document_args(args, "--tsp-native-spec sdpa")
        elif native_spec == "sp_norm" and getattr(args, "reset_attention_mask", False) \
                and getattr(args, "masked_softmax_fusion", False):
            raise TSPConfigError("--reset-attention-mask with --tsp-native-spec sp_norm needs --no-masked-softmax-"
                                 "fusion: Megatron's fused causal softmax ignores the dataset's mask")
        return args
    get = lambda name, default=None: getattr(args, name, default)
    check_parallel_sizes(get("tensor_model_parallel_size", 1), get("context_parallel_size", 1))
    apply_tsp_moe_args(args, D)
    apply_tsp_document_args(args, "--tsp-size")
    if get("sft"):
        raise TSPConfigError("--sft (packed sequences, THD) cannot be combined with --tsp-size")
    if get("hybrid_context_parallel"):
        raise TSPConfigError("--hybrid-context-parallel cannot be combined with --tsp-size")
    if get("tp_comm_overlap"):
        raise TSPConfigError("--tp-comm-overlap cannot be combined with --tsp-size")
    # Options of Megatron-LM's model builder that the TSP model does not implement.
    for name, flag in REFUSED_BUILDER_FLAGS:
        if get(name) and name not in TSP_BUILDER_FLAGS:
            raise TSPConfigError(f"{flag} cannot be combined with --tsp-size: the TSP model has its own layer spec")
    heads = get("num_attention_heads")
    if heads is not None and heads % D:
        raise TSPConfigError(f"--num-attention-heads = {heads} must be divisible by --tsp-size = {D}")
    groups = get("num_query_groups") if get("group_query_attention") else None
    if groups is not None and groups % D:
        raise TSPConfigError(f"--num-query-groups = {groups} must be divisible by --tsp-size = {D}")
    if get("seq_length") is not None:
        check_seq_length(args.seq_length, D)
    if tsp_options_from_args(args).tsp_lm_head == "local" and get("defer_embedding_wgrad_compute"):
        raise TSPConfigError("--defer-embedding-wgrad-compute is not supported by the sequence-local LM head "
                             "(--tsp-lm-head local): use --tsp-lm-head megatron")
    args.tensor_model_parallel_size = D
    args.sequence_parallel = True
    return args


def apply_tsp_document_args(args: argparse.Namespace, what: str) -> None:
    """Packed sequences on the plugin's attention, `what` = "--tsp-size" (TSP) or
    "--tsp-native-spec sdpa" (the TP + SP baseline's SDPA; megatron_lm.build.with_eod_documents):
    with `--reset-attention-mask` the model reads the document ids from the batch's EOD tokens, an
    O(S) integer tensor; `--reset-position-ids` (RoPE reads them under TSP) and `--eod-mask-loss`
    are the dataset's and pass through. Megatron's [b, 1, S, S] mask is turned off
    (`create_attention_mask_in_dataloader = False`): this attention never reads it, and the dataset
    would build it for every sample and broadcast it over the TP (= TSP) group. Combinations the
    path cannot honour: one TSPConfigError naming the flag."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if get("dataloader_inter_document_masking"):
        raise TSPConfigError(f"--dataloader-inter-document-masking (THD, cu_seqlens) cannot be combined with {what}: "
                             "use --reset-attention-mask (the documents are read from the EOD tokens)")
    args.create_attention_mask_in_dataloader = False
    if not get("reset_attention_mask"):
        return
    pp = get("pipeline_model_parallel_size", 1) or 1
    if pp > 1:
        raise TSPConfigError(f"--reset-attention-mask cannot be combined with {what} and "
                             f"--pipeline-model-parallel-size = {pp}: the document ids come from the tokens, which "
                             "Megatron-LM's get_batch gives to the first and last stages only")
    backend = tsp_options_from_args(args).tsp_attention_backend
    if what == "--tsp-size" and backend in ("cudnn", "flash"):
        raise TSPConfigError(f"--reset-attention-mask cannot run on --tsp-attention-backend {backend} (no document "
                             "mask in that kernel): use auto, math, math_split or flex")
    if get("allow_ambiguous_pad_tokens"):
        raise TSPConfigError(f"--allow-ambiguous-pad-tokens cannot be combined with --reset-attention-mask under "
                             f"{what}: where the pad id is the EOD id the dataset turns the EOD tokens into 0, "
                             "and the document boundaries are read from the EOD tokens")


# Megatron-LM builder options the TSP model runs itself (the native specs still refuse them)
TSP_BUILDER_FLAGS = ("num_experts",)


class _MoEView:
    """Megatron-LM's MoE arguments under TransformerConfig's names, for megatron_tsp.config.check_moe_config."""

    def __init__(self, args):
        self._args = args
        self.num_moe_experts = args.num_experts

    def __getattr__(self, name):
        defaults = {"moe_router_topk": 2, "moe_router_load_balancing_type": "aux_loss", "moe_layer_freq": 1,
                    "moe_token_drop_policy": "probs", "add_bias_linear": True, "expert_tensor_parallel_size": 1,
                    "moe_token_dispatcher_type": "allgather"}
        return getattr(self._args, name, defaults.get(name))


def apply_tsp_moe_args(args: argparse.Namespace, D: int) -> None:
    """Mixture of experts under `--tsp-size D` (megatron_tsp.tsp.moe: Megatron's MoELayer on the
    tokens each TSP rank holds): EP = `--expert-model-parallel-size` must be D or D x k ranks
    within the world (the expert group is the TSP group, or spans k TSP groups of data-parallel
    ranks), expert TP 1 (set here: Megatron-LM would default it to the TP size, D), the alltoall
    dispatcher; every other MoE option as the TSP model checks it (check_moe_config). One
    TSPConfigError naming the flag, at parse time on every rank."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    E, ep = get("num_experts"), get("expert_model_parallel_size", 1) or 1
    if not E:
        if ep != 1:
            raise TSPConfigError(f"--expert-model-parallel-size = {ep} needs --num-experts")
        return
    dispatcher = get("moe_token_dispatcher_type", "allgather")
    if dispatcher == "allgather":
        raise TSPConfigError("--moe-token-dispatcher-type = 'allgather' (Megatron-LM's default) cannot be combined "
                             "with --tsp-size: it all-gathers every rank's hidden states over TP x EP, i.e. the whole "
                             "sequence; pass --moe-token-dispatcher-type alltoall")
    if dispatcher == "flex":
        raise TSPConfigError("--moe-token-dispatcher-type = 'flex' (DeepEP / HybridEP) cannot be combined with "
                             "--tsp-size in this version: use alltoall")
    etp = get("expert_tensor_parallel_size")
    if etp not in (None, 1):
        raise TSPConfigError(f"--expert-tensor-parallel-size = {etp} cannot be combined with --tsp-size: expert "
                             "tensor parallelism all-gathers each rank's tokens over its group; use 1")
    args.expert_tensor_parallel_size = 1
    if ep % D:
        raise TSPConfigError(f"--expert-model-parallel-size = {ep} must be --tsp-size = {D} or a multiple of it (the "
                             "expert group is the TSP group, or spans TSP groups of data-parallel ranks)")
    world = int(os.environ.get("WORLD_SIZE", get("world_size") or ep))
    check_expert_parallel(E, ep, world, D, get("pipeline_model_parallel_size", 1) or 1, 1)
    check_moe_config(_MoEView(args), D)


# -- Megatron-LM: recipes and parse-time mapping ---------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: str, where: str) -> str:
    def sub(match):
        name = match.group(1)
        if name not in os.environ:
            raise TSPConfigError(f"--tsp-recipe {where} uses ${{{name}}}, which is not set in the environment")
        return os.environ[name]
    return _ENV_REF.sub(sub, value)


def load_flag_recipe(path: str) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
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
    flags, env = load_flag_recipe(values[0])
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
