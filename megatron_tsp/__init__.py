"""megatron-tsp: folded Tensor and Sequence Parallelism (TSP) for Megatron-core.

One device axis of size D (`--tsp-size D`, Megatron's TP slot) on which every rank holds 1/D
of each layer's weights and 1/D of the tokens (zigzag layout).
"""

import importlib
import warnings

from .config import TSPConfigError, TSPOptions, tsp_transformer_config, validate_transformer_config

# megatron.core and torch take seconds to import: the process-group API and the zigzag helpers
# load on first use, so light commands (`megatron-tsp plan`, `--help`) import neither.
_LAZY = {name: ".parallel_state" for name in (
    "destroy_model_parallel", "initialize_model_parallel", "initialize_native_model_parallel",
)}
_LAZY.update({name: ".tsp.zigzag" for name in ("from_zigzag", "local_positions", "to_zigzag", "zigzag_permutation")})
_LAZY.update({
    "TSPGPTModel": ".tsp.model", "get_tsp_block_spec": ".tsp.specs", "get_tsp_layer_spec": ".tsp.specs",
    "get_sp_block_spec": ".baselines.specs", "get_sp_layer_spec": ".baselines.specs",
    "TSPSelfAttention": ".tsp.attention",
    "TSPMLP": ".tsp.mlp", "TSPNorm": ".tsp.norm", "add_tsp_args": ".megatron_lm.arguments",
    "tsp_options_from_args": ".megatron_lm.arguments", "Recipe": ".training.recipe", "RecipeError": ".training.recipe",
    "load_recipe": ".training.recipe", "install_cpu_shims": ".training.cpu",
})


# old names, still importable with a DeprecationWarning (not in __all__)
_DEPRECATED = {"TSPRingMLP": ("TSPMLP", ".tsp.mlp")}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name in _DEPRECATED:
        new, module = _DEPRECATED[name]
        module = importlib.import_module(module, __name__)
        warnings.warn(module.DEPRECATED_NAMES[name], DeprecationWarning, stacklevel=2)
        return getattr(module, new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "TSPConfigError",
    "TSPOptions",
    "tsp_transformer_config",
    "validate_transformer_config",
    "initialize_model_parallel",
    "initialize_native_model_parallel",
    "destroy_model_parallel",
    "zigzag_permutation",
    "local_positions",
    "to_zigzag",
    "from_zigzag",
    "TSPGPTModel",
    "get_tsp_block_spec",
    "get_tsp_layer_spec",
    "get_sp_block_spec",
    "get_sp_layer_spec",
    "TSPSelfAttention",
    "TSPMLP",
    "TSPNorm",
    "add_tsp_args",
    "tsp_options_from_args",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "install_cpu_shims",
]
