"""Inference: TSP prefill of long prompts, one KV-cache exchange, decode as tensor parallelism
on Megatron's GPTModel sharing the same parameter tensors (docs/inference.md, issue 17)."""

from .cache import PromptRotary, decode_mask, exchange, exchange_all, static_context
from .decode import Generation, Sampler, Sampling, decode_model, decode_step, generate, logprobs
from .prefill import Prefill, check_prompts, embed_local, padded_length, tsp_prefill

__all__ = [
    "Generation", "Prefill", "PromptRotary", "Sampler", "Sampling", "check_prompts", "decode_mask", "decode_model", "decode_step",
    "embed_local", "exchange", "exchange_all", "generate", "logprobs", "padded_length", "static_context",
    "tsp_prefill",
]
