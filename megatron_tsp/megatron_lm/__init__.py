"""TSP in Megatron-LM's `pretrain_gpt.py`: the `--tsp-*` flags (`arguments`), the hooks the
patches in patches/ call (`hooks`), the model both Megatron-LM paths build (`build`), the model builder class of megatron-core >= 0.19 (`builder`) and the
runner `megatron-tsp run` (`run`).

The patched `pretrain_gpt.py` imports `tsp_extra_args_provider`, `tsp_gpt_builder` and
`tsp_gpt_model_config_cls` from this package; they load `hooks` (and megatron) on first use."""

import importlib

_LAZY = {name: ".hooks" for name in ("tsp_extra_args_provider", "tsp_gpt_builder", "tsp_gpt_model_config_cls",
                                       "tsp_gpt_config_from_args", "install", "check_built_model")}
_LAZY["build_gpt_model"] = ".build"


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
