"""Megatron-LM's `pretrain_gpt.py` with `--tsp-size`: the hooks it needs.

- `tsp_extra_args_provider(inner)`: Megatron's `extra_args_provider` that adds the TSP flags
  (`--tsp-size`, `--tsp-recompute`, `--tsp-attention-backend`, `--tsp-recipe`,
  `--tsp-native-spec`) and makes the parser expand the recipe
  and map `--tsp-size D` onto the TP slot (tensor_model_parallel_size = D, sequence_parallel)
  at parse time, before `validate_args`; conflicts end every rank with one error line.
- The model: `build_gpt_model` builds `TSPGPTModel` for `--tsp-size > 1` (TSP attention, ring
  MLP, sequence-parallel norms; Megatron's embedding, LM head and vocab-parallel loss) or, for
  `--tsp-native-spec sp_norm|sdpa`, Megatron's native GPTModel on the local spec with
  sequence-parallel-capable norms (and SDPA core attention); otherwise Megatron's own model.
  Two ways in, one per Megatron-LM model path: `tsp_gpt_builder(gpt_builder)`, the builder
  behind the model provider (core_v0.16.1 ... core_v0.18.2), and `tsp_gpt_config_from_args`,
  whose model config names the TSP model builder (core_v0.19.0: `pretrain` builds the model
  from the config, `megatron_lm_builder.py`).
- `check_built_model(args, model)`: the built model must be the one the flags ask for; the
  runner calls it after Megatron's `setup_model_and_optimizer`, before any training step.

`install()` puts these into an imported Megatron-LM (`megatron_tsp.megatron_lm.run` does this before it
runs the unmodified script); `patches/<tag>/` does the same in `pretrain_gpt.py`'s `__main__`.
Supported: the Megatron-LM tags in SUPPORTED_TAGS (scripts/apply_patches.sh checks them).
"""

from __future__ import annotations

import hashlib
import importlib
import os

from .. import patches
from .arguments import add_tsp_args, install_tsp_parsing
from ..config import TSPConfigError
from .build import _check_builder_args, _model_kwargs, build_gpt_model, uses_tsp_builder

# Megatron-LM tags the runner and patches/ are made for, and their commits.
SUPPORTED_TAGS = {
    "core_v0.16.1": "55ac7082517c3878ae653c07c09c534b8aed49f6",
    "core_v0.17.1": "266f1c97dca477ca8b92c16087506da2000b0b84",
    "core_v0.18.2": "571370c829ca768fe37244f4e2e7f28d8accc4ab",
    "core_v0.19.0": "5be9626709af2722333bf54797c954c09edeada3",
}


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


def tsp_gpt_builder(gpt_builder):
    """Wrap Megatron-LM's `gpt_builder(args, pre_process, post_process, vp_stage, config,
    pg_collection)` (the model provider's builder, core_v0.16-0.18): the plugin's model when
    asked for (`build_gpt_model`), `gpt_builder` itself otherwise."""

    def builder(args, pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        if not uses_tsp_builder(args):
            return gpt_builder(args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)
        _check_builder_args(args, "--tsp-size" if args.tsp else f"--tsp-native-spec {args.tsp_native_spec}",
                            tsp=bool(args.tsp))
        if config is None:
            from megatron.training.arguments import core_transformer_config_from_args

            config = core_transformer_config_from_args(args)
        return build_gpt_model(args, config, _model_kwargs(args, pre_process, post_process, vp_stage, pg_collection))

    builder.megatron_gpt_builder = gpt_builder
    return builder


def tsp_gpt_model_config_cls(args, model_config_cls=None):
    """The model config class for `argument_utils.gpt_config_from_args` (core_v0.19+ builds the
    model with the builder its config names): `TSPGPTModelConfig` when the model is the
    plugin's, else `model_config_cls` (Megatron's `GPTModelConfig` when None)."""
    from megatron.training.models.gpt import GPTModelConfig

    model_config_cls = model_config_cls or GPTModelConfig
    if not uses_tsp_builder(args):
        return model_config_cls
    from .builder import TSPGPTModelConfig

    if model_config_cls not in (GPTModelConfig, TSPGPTModelConfig):
        raise TSPConfigError(f"{model_config_cls.__name__} (e.g. ModelOpt's) cannot be combined with "
                             f"{'--tsp-size' if args.tsp else '--tsp-native-spec'}: the model builder is the TSP one")
    return TSPGPTModelConfig


def tsp_gpt_config_from_args(gpt_config_from_args):
    """Wrap Megatron-LM's `argument_utils.gpt_config_from_args(args, config, model_config_cls)`
    (core_v0.19+): its config names the TSP model builder when the model is the plugin's."""

    def config_from_args(args, config=None, model_config_cls=None):
        return gpt_config_from_args(args, config, model_config_cls=tsp_gpt_model_config_cls(args, model_config_cls))

    config_from_args.megatron_gpt_config_from_args = gpt_config_from_args
    return config_from_args


def check_built_model(args, model) -> None:
    """Refuse a run whose built model is not the one its flags ask for, so that `--tsp-size`
    can never train Megatron's own model (a pretrain_gpt.py whose model path bypasses the
    builders above). `model`: the model chunks as `setup_model_and_optimizer` returns them."""
    if not uses_tsp_builder(args):
        return
    from megatron.core.utils import get_attr_wrapped_model

    from ..tsp.attention import TSPSelfAttention
    from ..tsp.model import TSPGPTModel
    from ..baselines.sdpa_attention import SDPACoreAttention

    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        inner = get_attr_wrapped_model(chunk, "decoder", return_model_obj=True)
        layers = list(getattr(getattr(inner, "decoder", None), "layers", None) or [])
        if args.tsp:
            ok = isinstance(inner, TSPGPTModel) and all(isinstance(l.self_attention, TSPSelfAttention) for l in layers)
            want = f"--tsp-size {args.tsp_size} asks for megatron_tsp's TSPGPTModel with TSP attention"
        elif args.tsp_native_spec == "sdpa":
            ok = all(isinstance(l.self_attention.core_attention, SDPACoreAttention) for l in layers)
            want = "--tsp-native-spec sdpa asks for SDPA core attention"
        else:
            ok = True  # sp_norm: Megatron's layers; a norm without sequence parallelism fails on its own
            want = ""
        if not ok:
            raise TSPConfigError(
                f"{want}, but this pretrain_gpt.py built {type(inner).__name__} "
                f"(attention {type(layers[0].self_attention).__name__ if layers else '?'}): its model "
                f"path bypasses megatron_tsp's builder (Megatron-LM {', '.join(SUPPORTED_TAGS)} are supported)")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _installed_dataset_helpers(datasets_dir: str):
    """The compiled dataset helpers (helpers_cpp) of the installed megatron-core distribution,
    when they were compiled from the same helpers.cpp as the one in `datasets_dir`; else None."""
    import importlib.machinery
    from importlib import metadata

    try:
        installed = os.path.realpath(str(metadata.distribution("megatron-core").locate_file("megatron/core/datasets")))
    except metadata.PackageNotFoundError:
        return None
    if installed == os.path.realpath(datasets_dir):
        return None
    source = os.path.join(datasets_dir, "helpers.cpp")
    installed_source = os.path.join(installed, "helpers.cpp")
    if not (os.path.isfile(source) and os.path.isfile(installed_source)) or _sha256(source) != _sha256(installed_source):
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(installed, "helpers_cpp" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _use_packaged_dataset_helpers() -> bool:
    """Megatron-LM compiles its dataset helpers at start-up with `make` in megatron/core/datasets
    (which needs pybind11). Skip that when compiled helpers of the same source are at hand:
    - the megatron-core wheel in place of the tree's megatron/core ships them compiled, without
      the Makefile (so that `make` would fail and Megatron exit);
    - a full Megatron-LM tree (its own megatron/core first on sys.path) next to an installed
      megatron-core whose helpers.cpp is the same file: the installed compiled module is used.
    Returns whether it skipped the `make`."""
    import sys

    from megatron.core.datasets import utils

    datasets_dir = os.path.dirname(utils.__file__)
    if patches.MLM_COMPILE_HELPERS.installed():
        return True
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
        compiled = True
    except ImportError:
        compiled = False
    if os.path.exists(os.path.join(datasets_dir, "Makefile")):
        if compiled:
            return False  # Megatron's make finds it up to date
        path = _installed_dataset_helpers(datasets_dir)
        if path is None:
            return False
        import importlib.util

        spec = importlib.util.spec_from_file_location("megatron.core.datasets.helpers_cpp", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module  # as an import would (the package's attribute: the patch)
        patches.install(patches.MLM_DATASET_HELPERS, module)
        where = f"compiled in the installed megatron-core ({path}; same helpers.cpp)"
    elif compiled:
        where = "compiled in the megatron-core package"
    else:
        return False

    def compile_helpers():
        print(f"> megatron-tsp: using the dataset helpers {where}", flush=True)

    patches.install(patches.MLM_COMPILE_HELPERS, compile_helpers)
    return True


def install() -> None:
    """Put the TSP hooks into the imported Megatron-LM: `--tsp-size` and friends in its parser
    (`megatron.training.arguments.add_megatron_arguments`), the TSP model builder behind both
    model paths (`gpt_builders.gpt_builder`; `argument_utils.gpt_config_from_args` where it
    exists) and the check of the built model (`training.setup_model_and_optimizer`). The
    Megatron-LM tree must be on sys.path."""
    try:  # the modules the records patch
        for module in ("gpt_builders", "megatron.training.arguments", "megatron.training.training"):
            importlib.import_module(module)
    except ImportError as e:
        raise TSPConfigError(
            f"Megatron-LM (gpt_builders.py, megatron/training) cannot be imported ({e}): run "
            f"megatron_tsp.megatron_lm.run with the path to pretrain_gpt.py of Megatron-LM {', '.join(SUPPORTED_TAGS)}"
        ) from None
    if patches.MLM_ADD_ARGUMENTS.installed():
        return

    def with_tsp_arguments(add_megatron_arguments):
        def add_megatron_arguments_with_tsp(parser):
            return add_tsp_megatron_args(add_megatron_arguments(parser))

        return add_megatron_arguments_with_tsp

    def checked(setup_model_and_optimizer):
        def setup_model_and_optimizer_checked(*args, **kwargs):
            from megatron.training import get_args

            result = setup_model_and_optimizer(*args, **kwargs)
            check_built_model(get_args(), result[0])
            return result

        setup_model_and_optimizer_checked.megatron_setup_model_and_optimizer = setup_model_and_optimizer
        return setup_model_and_optimizer_checked

    patches.install(patches.MLM_ADD_ARGUMENTS, wrap=with_tsp_arguments)
    patches.install(patches.MLM_GPT_BUILDER, wrap=tsp_gpt_builder)
    patches.install(patches.MLM_GPT_CONFIG_FROM_ARGS, wrap=tsp_gpt_config_from_args)  # core_v0.19+ only
    patches.install(patches.MLM_SETUP_MODEL_AND_OPTIMIZER, wrap=checked)
