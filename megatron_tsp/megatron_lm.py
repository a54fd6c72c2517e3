"""Megatron-LM's `pretrain_gpt.py` with `--tsp-size`: the two hooks it needs.

- `tsp_extra_args_provider(inner)`: Megatron's `extra_args_provider` that adds the TSP flags
  (`--tsp-size`, `--tsp-recompute`, `--tsp-attention-backend`, `--tsp-recipe`,
  `--tsp-native-spec`) and makes the parser expand the recipe
  and map `--tsp-size D` onto the TP slot (tensor_model_parallel_size = D, sequence_parallel)
  at parse time, before `validate_args`; conflicts end every rank with one error line.
- `tsp_gpt_builder(gpt_builder)`: the model builder behind Megatron's `model_provider`. With
  `--tsp-size > 1` it builds `TSPGPTModel` (TSP attention, ring MLP, sequence-parallel norms;
  Megatron's embedding, LM head and vocab-parallel loss); `--tsp-native-spec sp_norm|sdpa`
  builds Megatron's native GPTModel on the local spec with sequence-parallel-capable norms
  (and SDPA core attention); otherwise it calls `gpt_builder` unchanged.

`install()` puts both into an imported Megatron-LM (`megatron_tsp.run` does this before it
runs the unmodified script); `patches/` does the same in `pretrain_gpt.py`'s `__main__`.
Pinned: Megatron-LM `core_v0.16.1` (commit 55ac7082517c3878ae653c07c09c534b8aed49f6).
"""

from __future__ import annotations

import os

from .arguments import add_tsp_args, install_tsp_parsing, tsp_options_from_args
from .config import TSPConfigError

PINNED_TAG = "core_v0.16.1"
PINNED_COMMIT = "55ac7082517c3878ae653c07c09c534b8aed49f6"
PINNED_CORE_VERSION = "0.16.1"


def add_tsp_megatron_args(parser):
    """Add the TSP flags to Megatron-LM's parser and make it map them at parse time (once: the
    runner on a patched pretrain_gpt.py adds them only one time)."""
    if any("--tsp-size" in action.option_strings for action in parser._actions):
        return parser
    add_tsp_args(parser, megatron_lm=True)
    _use_packaged_dataset_helpers()
    return install_tsp_parsing(parser)


def tsp_extra_args_provider(inner=None):
    """An `extra_args_provider` for `pretrain(...)`: the TSP flags, then `inner`'s (or none)."""

    def provider(parser):
        parser = add_tsp_megatron_args(parser)
        return inner(parser) if inner is not None else parser

    return provider


def _model_kwargs(args, pre_process, post_process, vp_stage, pg_collection) -> dict:
    """GPTModel's keyword arguments as Megatron-LM's gpt_builder (gpt_builders.py) passes them."""
    return dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def _check_builder_args(args, what: str) -> None:
    """Options Megatron's gpt_builder handles with specs of its own: refused with our specs."""
    for name, flag in (("use_legacy_models", "--use-legacy-models"), ("spec", "--spec"),
                       ("num_experts", "--num-experts"), ("mtp_num_layers", "--mtp-num-layers"),
                       ("experimental_attention_variant", "--experimental-attention-variant"),
                       ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path")):
        if getattr(args, name, None):
            raise TSPConfigError(f"{flag} cannot be combined with {what}")


def tsp_gpt_builder(gpt_builder):
    """Wrap Megatron-LM's `gpt_builder(args, pre_process, post_process, vp_stage, config,
    pg_collection)`: TSP (or a native spec with sequence-parallel norms) when asked for,
    `gpt_builder` itself otherwise."""

    def builder(args, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        native_spec = getattr(args, "tsp_native_spec", "megatron")
        tsp = bool(getattr(args, "tsp", False))
        if not tsp and native_spec == "megatron":
            return gpt_builder(args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)

        _check_builder_args(args, "--tsp-size" if tsp else f"--tsp-native-spec {native_spec}")
        from megatron.core import parallel_state as mpu
        from megatron.core.models.gpt import GPTModel
        from megatron.training import print_rank_0
        from megatron.training.arguments import core_transformer_config_from_args

        from .model import TSPGPTModel
        from .sdpa_attention import SDPACoreAttention
        from .specs import get_sp_block_spec

        if config is None:
            config = core_transformer_config_from_args(args)
        kwargs = _model_kwargs(args, pre_process, post_process, vp_stage, pg_collection)
        if tsp:
            print_rank_0(f"building TSP GPT model (--tsp-size {args.tsp_size}) ...")
            return TSPGPTModel(config, None, tsp_options=tsp_options_from_args(args), **kwargs)
        print_rank_0(f"building GPT model with --tsp-native-spec {native_spec} ...")
        pp_rank = pg_collection.pp.rank() if pg_collection is not None else mpu.get_pipeline_model_parallel_rank()
        core_attention = SDPACoreAttention if native_spec == "sdpa" else None
        spec = get_sp_block_spec(config, vp_stage, pp_rank, core_attention=core_attention)
        return GPTModel(config, spec, **kwargs)

    builder.megatron_gpt_builder = gpt_builder
    return builder


def _use_packaged_dataset_helpers() -> bool:
    """Megatron-LM compiles its dataset helpers at start-up with `make` in megatron/core/datasets.
    The megatron-core wheel ships them compiled but without the Makefile, so that `make` fails
    and Megatron exits; skip it when the compiled helpers import. Returns whether it did."""
    from megatron.core.datasets import utils

    if os.path.exists(os.path.join(os.path.dirname(utils.__file__), "Makefile")):
        return False
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False

    if getattr(utils.compile_helpers, "tsp_skipped", False):
        return True

    def compile_helpers():
        print("> megatron-tsp: using the dataset helpers compiled in the megatron-core package", flush=True)

    compile_helpers.tsp_skipped = True
    utils.compile_helpers = compile_helpers
    return True


def install() -> None:
    """Put the TSP hooks into the imported Megatron-LM: `--tsp-size` and friends in its parser
    (`megatron.training.arguments.add_megatron_arguments`) and the TSP model builder in
    `gpt_builders.gpt_builder`. The Megatron-LM tree must be on sys.path."""
    import megatron.core

    try:
        import gpt_builders
        from megatron.training import arguments as megatron_arguments
    except ImportError as e:
        raise TSPConfigError(
            f"Megatron-LM {PINNED_TAG} (gpt_builders.py, megatron/training) cannot be imported ({e}): "
            f"run megatron_tsp.run with the path to Megatron-LM's pretrain_gpt.py"
        ) from None
    version = getattr(megatron.core, "__version__", None)
    if version != PINNED_CORE_VERSION:
        print(f"WARNING: megatron-tsp is pinned to Megatron-LM {PINNED_TAG} (megatron-core "
              f"{PINNED_CORE_VERSION}); megatron.core here is {version}", flush=True)
    if getattr(megatron_arguments.add_megatron_arguments, "tsp_installed", False):
        return
    add_megatron_arguments = megatron_arguments.add_megatron_arguments

    def add_megatron_arguments_with_tsp(parser):
        return add_tsp_megatron_args(add_megatron_arguments(parser))

    add_megatron_arguments_with_tsp.tsp_installed = True
    megatron_arguments.add_megatron_arguments = add_megatron_arguments_with_tsp
    gpt_builders.gpt_builder = tsp_gpt_builder(gpt_builders.gpt_builder)
