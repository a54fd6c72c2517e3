"""megatron-tsp: folded Tensor and Sequence Parallelism (TSP) for Megatron-core.

One device axis of size D (`--tsp-size D`, Megatron's TP slot) on which every rank holds 1/D
of each layer's weights and 1/D of the tokens (zigzag layout).
"""

import importlib

from .config import TSPConfigError, TSPOptions, tsp_transformer_config, validate_transformer_config

# megatron.core and torch take seconds to import: the process-group API and the zigzag helpers
# load on first use, so light commands (`megatron-tsp plan`, `--help`) import neither.
_LAZY = {name: ".parallel_state" for name in (
    "destroy_model_parallel", "get_tsp_group", "get_tsp_rank", "get_tsp_world_size",
    "initialize_model_parallel", "tsp_process_groups",
)}
_LAZY.update({name: ".zigzag" for name in ("from_zigzag", "local_positions", "to_zigzag", "zigzag_permutation")})


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "TSPConfigError",
    "TSPOptions",
    "tsp_transformer_config",
    "validate_transformer_config",
    "initialize_model_parallel",
    "destroy_model_parallel",
    "get_tsp_group",
    "get_tsp_rank",
    "get_tsp_world_size",
    "tsp_process_groups",
    "zigzag_permutation",
    "local_positions",
    "to_zigzag",
    "from_zigzag",
]
