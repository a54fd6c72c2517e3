"""The megatron-core versions the plugin runs on, and the few places where they differ.

Supported: 0.16.1 <= megatron-core <= 0.19.2 (0.17 and later need Python >= 3.12). One code
path where the APIs agree; the adapters below where they do not, chosen by what the installed
megatron-core does (feature detection), not by its version number. A version outside the range
is allowed with one warning, at the first import of a module that builds on megatron-core.

- MLP spec style: up to 0.17 the local layer spec's `mlp` is a `ModuleSpec` that
  `TransformerLayer` builds with `config` only (the TSP group rides in its params); from 0.18 it
  is a callable (`functools.partial(MLP.as_mlp_submodule, submodules=...)`) that the layer calls
  with `config, pg_collection, is_mtp_layer, name` (`mlp_spec`, `mlp_submodules`).
- `MLP.__init__` takes `name` from 0.18 (`mlp_name_kwargs`).
- TransformerConfig's CUDA-graph scope defaults to the string "full", which every version in the
  range itself calls deprecated (a warning per config; the field is `cuda_graph_scope` up to
  0.17, `cuda_graph_modules` from 0.18): our configs pass the equivalent empty list
  (`transformer_config_defaults`).
- 0.19's `GPTModel.__init__` logs "GPTModel IS DEPRECATED" (use HybridModel); TSPGPTModel
  stays a GPTModel (docs/supported.md, 'Supported megatron-core versions', says why) and silences that one
  record while it constructs (`quiet_gpt_model_deprecation`).
- 0.16.1's MoE router gating (`moe_utils.RouterGatingLinearFunction`) tests
  `te_general_gemm is not None`, a name only bound when Transformer Engine imports: without TE
  every router call raises NameError. `bind_missing_te_general_gemm` binds it to None (the
  torch path; called when an MoE model is built, not at import); later versions bind it themselves.
- The optimizer CPU offload takes megatron-core's precision-aware optimizer path, whose
  `OptimizerConfig.__post_init__` asks `is_te_min_version("2.1.0")`: without Transformer Engine
  0.16.1's `get_te_version()` is None and the comparison raises TypeError (0.19.2 answers).
  `te_version_check_without_te` makes that check answer False there (TE absent: not >= 2.1),
  called when an offloading optimizer is built.
- The groups handed to Megatron's DDP, optimizer, `finalize_model_grads` and schedules (one
  `ProcessGroupCollection`, `ddp_group_kwargs`, `optimizer_group_kwargs`,
  `finalize_model_grads_func`, `schedule_group_kwargs`; `DDP_GROUPS`, `OPTIMIZER_GROUPS`,
  `FINALIZE_GROUPS`, `SCHEDULE_GROUPS` what each needs): each version falls back to the global
  getters when `pg_collection` is None, and the attributes it needs differ. 0.16.1's schedules
  assert tp, cp, embd, pos_embd, pp, dp_cp (0.19.2's: tp, cp); 0.19.2's `finalize_model_grads`
  also needs tp_dp_cp (expert bias); 0.19.2's DDP and optimizer test membership in
  `vars(pg_collection)` (0.16.1: `hasattr`). Both optimizers refuse Gloo groups with a
  collection (`use_gloo_process_groups=False`: the Gloo copies only serve the dp_zero checkpoint
  formats, which megatron-tsp does not write), and both pipelined schedules need a
  `P2PCommunicator` on the collection's pp group beside it. The callers check the union of what
  the versions need (`config.require_groups`), so a missing group is one TSPConfigError naming it
  on either version, not an assertion in one and a silently made stand-in group (DDP's expt_dp)
  in the other.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

from megatron.core import package_info
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from packaging.version import Version

from . import patches

OLDEST = Version("0.16.1")
NEWEST = Version("0.19.2")
SUPPORTED = f"{OLDEST} <= megatron-core <= {NEWEST}"


class MegatronCoreVersionWarning(UserWarning):
    """megatron-core is outside the range the plugin is tested on."""


_warned = False


def check_megatron_version(version: str | None = None) -> bool:
    """Whether `version` (the installed megatron-core when None) is in the supported range;
    warns once per process when it is not."""
    global _warned
    installed = Version(version or package_info.__version__)
    # A local label ("0.19.2+nv25.10", a container's or a source build's) is that release.
    if OLDEST <= Version(installed.public) <= NEWEST:
        return True
    if not _warned:
        _warned = True
        side = "newer" if installed > NEWEST else "older"
        warnings.warn(
            f"megatron-core {installed} is {side} than the versions megatron-tsp is tested on "
            f"({SUPPORTED}); pick one with `pip install megatron-core=={NEWEST}` "
            "(see docs/supported.md, 'Supported megatron-core versions')",
            MegatronCoreVersionWarning,
            stacklevel=2,
        )
    return False


def mlp_spec(local_mlp, module, submodules, **params):
    """The layer spec's `mlp` entry building `module(config, submodules, **params, ...)`, in the
    style of `local_mlp` (the local spec's own `mlp`): a `ModuleSpec`, or from 0.18 a callable
    over `module.as_mlp_submodule` (which then receives `pg_collection` from the layer)."""
    if isinstance(local_mlp, ModuleSpec):
        return ModuleSpec(module=module, params=params, submodules=submodules)
    return functools.partial(module.as_mlp_submodule, submodules=submodules, **params)


def mlp_submodules(local_mlp):
    """The `MLPSubmodules` (linear_fc1, linear_fc2) of a layer spec's `mlp` entry, either style."""
    if isinstance(local_mlp, ModuleSpec):
        return local_mlp.submodules
    return local_mlp.keywords["submodules"]


_MLP_TAKES_NAME = "name" in inspect.signature(MLP.__init__).parameters


def mlp_name_kwargs(name):
    """`{'name': name}` for `MLP.__init__` where it takes a module name (0.18+), else `{}`."""
    return {"name": name} if _MLP_TAKES_NAME else {}


def _whole_layer_cuda_graph_field():
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    for name in ("cuda_graph_modules", "cuda_graph_scope"):
        if defaults.get(name) == "full":
            return name
    return None


_CUDA_GRAPH_FIELD = _whole_layer_cuda_graph_field()


def transformer_config_defaults(**kwargs) -> dict:
    """`kwargs` for a TransformerConfig, plus the CUDA-graph scope as `[]` (the whole layer,
    what the deprecated default "full" means) unless the caller sets it: no deprecation warning
    per config. No effect without CUDA graphs (`cuda_graph_impl='none'`, the default)."""
    if _CUDA_GRAPH_FIELD is not None:
        kwargs.setdefault(_CUDA_GRAPH_FIELD, [])
    return kwargs


def quiet_gpt_model_deprecation():
    """Drops megatron-core's GPTModel deprecation record, only inside this block (a subclass's
    `super().__init__`); every other record of that logger, and plain GPTModels, are untouched
    (`patches.GPT_MODEL_DEPRECATION_NOTICE`)."""
    return patches.applied(patches.GPT_MODEL_DEPRECATION_NOTICE)


# -- process groups passed to Megatron's training parts -------------------------------------

# What each of Megatron's parts needs of the collection, the union over the supported versions
# (checked by the callers with `config.require_groups`: this layer imports no other).
DDP_GROUPS = ("dp", "dp_cp", "tp", "pp", "ep", "expt_dp")
OPTIMIZER_GROUPS = ("dp", "dp_cp", "tp", "expt_dp", "intra_dist_opt", "mp", "tp_ep_pp")
FINALIZE_GROUPS = ("tp", "pp", "embd", "pos_embd", "dp_cp", "tp_dp_cp")
SCHEDULE_GROUPS = ("tp", "cp", "embd", "pos_embd", "pp", "dp_cp")


def ddp_group_kwargs(pg_collection) -> dict:
    """Keyword arguments giving Megatron's `DistributedDataParallel` its groups."""
    return {"pg_collection": pg_collection}


def optimizer_group_kwargs(pg_collection) -> dict:
    """Keyword arguments giving `get_megatron_optimizer` its groups (no Gloo copies: refused with
    a collection by every version; only the dp_zero checkpoint formats use them)."""
    return {"pg_collection": pg_collection, "use_gloo_process_groups": False}


def finalize_model_grads_func(pg_collection):
    """Megatron's `finalize_model_grads` bound to `pg_collection` (for
    `config.finalize_model_grads_func`, which the schedules call as `f(model, num_tokens)`)."""
    from megatron.core.distributed import finalize_model_grads

    return functools.partial(finalize_model_grads, pg_collection=pg_collection)


def schedule_group_kwargs(pg_collection, config) -> dict:
    """Keyword arguments giving the forward-backward schedule its groups: the collection and,
    pipelined, a `P2PCommunicator` on its pp group (both versions take the two together or
    neither)."""
    if pg_collection.pp.size() == 1:
        return {"pg_collection": pg_collection}
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    return {"pg_collection": pg_collection, "p2p_communicator": P2PCommunicator(pp_group=pg_collection.pp, config=config)}


def _no_te_version(version, check_equality=True):
    return False  # Transformer Engine is not installed: no version of it is


def te_version_check_without_te() -> None:
    """`patches.TE_MIN_VERSION_WITHOUT_TE`, where Transformer Engine is absent."""
    from megatron.core import utils

    if utils.get_te_version() is None:
        patches.install(patches.TE_MIN_VERSION_WITHOUT_TE, _no_te_version)


def bind_missing_te_general_gemm() -> None:
    """`patches.TE_GENERAL_GEMM` (a no-op where megatron-core binds it itself)."""
    patches.install(patches.TE_GENERAL_GEMM, None)


check_megatron_version()
