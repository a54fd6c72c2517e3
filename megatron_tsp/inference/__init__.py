"""Inference: TSP prefill of long prompts, one KV-cache exchange, decode as tensor parallelism
on Megatron's GPTModel sharing the same parameter tensors (docs/inference.md, issue 17).

The names below load their module (and torch, megatron) on first use, so `megatron-tsp generate
--help` (megatron_tsp.inference.cli) imports neither."""

import importlib

_LAZY = {name: ".cache" for name in ("PromptRotary", "decode_mask", "exchange", "exchange_all", "static_context")}
_LAZY.update({name: ".decode" for name in ("Generation", "Sampler", "Sampling", "decode_model", "decode_step",
                                           "generate", "logprobs")})
_LAZY.update({name: ".prefill" for name in ("Prefill", "check_prompts", "embed_local", "padded_length", "tsp_prefill")})


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Generation", "Prefill", "PromptRotary", "Sampler", "Sampling", "check_prompts", "decode_mask", "decode_model", "decode_step",
    "embed_local", "exchange", "exchange_all", "generate", "logprobs", "padded_length", "static_context",
    "tsp_prefill",
]
