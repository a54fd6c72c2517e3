"""Inference memory per GPU: the weights and the KV cache, for each layout (issue 17).

Exact counts of the tensors megatron_tsp.inference holds (tested against them,
tests/planner/test_planner_inference.py): with P prompt tokens per sequence (TSP pads to S, the next
multiple of 2D), B sequences, N new tokens, per GPU of a layout of `size` GPUs

    weights     = param_counts(model, layout) x bytes         (TSP and TP: 1/D of each matmul)
    kv_prefill  = 2 L B S kv b / size                         (TSP: its S/D tokens x every KV group;
                                                               TP: every token x kv/T; CP: S/C x kv)
    kv_decode   = 2 L B (P + N) kv b / size                   (Megatron's static cache, head-sharded)
    handover    = kv_decode + kv_prefill / L                  (TSP: the static cache is filled layer by
                                                               layer from the exchanged one)

The prefill's working set (one layer's transient activations) and prefill time: planner.prefill.
"""

from __future__ import annotations

from typing import Dict

from .formulas import param_counts
from .model import Layout, ModelSpec, PlanError


def inference_memory(m: ModelSpec, lay: Layout, prompt_tokens: int, batch: int = 1,
                     new_tokens: int = 0) -> Dict[str, float]:
    """Bytes per GPU (see the module docstring); `prompt_tokens`: the longest prompt."""
    for flag, v in (("prompt tokens", prompt_tokens), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"{flag} must be a positive integer, got {v!r}")
    if not isinstance(new_tokens, int) or new_tokens < 0:
        raise PlanError(f"new tokens must be an integer >= 0, got {new_tokens!r}")
    b, D = m.dtype_bytes, lay.size
    S = -(-prompt_tokens // (2 * lay.tsp_size)) * (2 * lay.tsp_size) if lay.record.uses_tsp else prompt_tokens
    per_token = 2 * m.num_layers * batch * m.kv_dim * b / D
    kv_prefill = per_token * S
    kv_decode = per_token * (prompt_tokens + new_tokens)
    weights = param_counts(m, lay)["total"] * b
    handover = kv_decode + kv_prefill / m.num_layers if lay.record.uses_tsp else kv_decode
    return {"weights": weights, "kv_prefill": kv_prefill, "kv_decode": kv_decode, "handover": handover,
            "decode_total": weights + kv_decode}
