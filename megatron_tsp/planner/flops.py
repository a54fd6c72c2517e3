"""The one model-FLOP count (and so the one MFU) of the project: `megatron-tsp plan` and
`megatron-tsp bench` both report MFU = model_flops / (step time x GPUs x peak), with these FLOPs.

Model FLOPs of one training step of a GPT (forward + backward, nothing recomputed):

    dense     = 6 T N          N = matmul weights of the L layers (QKV, output projection, MLP);
                               forward 2 T N, backward 4 T N (input and weight gradients)
    lm_head   = 6 T h V
    attention = 3 x forward,   forward = L b x 2 q (QK^T) + 2 q (PV) per (query, key) pair,
                               S (S+1) / 2 pairs under the causal mask: 2 q L b S (S+1)

Packed sequences under document masks (data.reset_attention_mask): the pairs are those inside
each document, sum of n (n+1) / 2 over its documents instead of S (S+1) / 2 (`packed_pairs`:
documents of one length N, the last one cut), what a kernel that skips the masked blocks computes.

T = b S tokens, q = heads x head_dim. Backward is counted as 2 x forward for attention too: the
backward of QK^T and of PV is two matmuls each (dQ, dK; dP, dV), as for any matmul. Flash-style
kernels also recompute P = softmax(QK^T) in backward, a fifth matmul, so the kernels EXECUTE
2.5 x forward (the planner's time model counts that, planner.formulas.flops); it is recomputation,
like TSP's block recompute or the local LM head's second logits pass, and recomputation is not
model work. Counting it would make a kernel that recomputes more look more efficient.
Not counted: embedding lookup, norms, RoPE, softmax, activations, the loss.
"""

from __future__ import annotations

from typing import Dict, Optional


def layer_matmul_params(hidden: int, heads: int, ffn: int, groups: Optional[int] = None, gated: bool = True,
                        head_dim: Optional[int] = None) -> int:
    """Matmul weights of one transformer layer: Wqkv (h x (q + 2 kv)), Wo (q x h), the MLP
    (h x f, twice for the gate when gated, and f x h); no biases."""
    d = head_dim or hidden // heads
    q, kv = heads * d, (groups or heads) * d
    return hidden * (q + 2 * kv) + q * hidden + (3 if gated else 2) * hidden * ffn


def causal_pairs(seq: int) -> int:
    """(query, key) pairs of one sequence under the causal mask."""
    return seq * (seq + 1) // 2


def packed_pairs(seq: int, document_length: int = 0) -> int:
    """(query, key) pairs of one sequence of documents of `document_length` tokens packed back to
    back (the last one cut at the sequence's end), each attending only inside itself; 0 (or >= seq):
    one document, `causal_pairs(seq)`."""
    if not document_length or document_length >= seq:
        return causal_pairs(seq)
    full, rest = divmod(seq, document_length)
    return full * causal_pairs(document_length) + causal_pairs(rest)


def causal_area(q_len: int, start: int) -> int:
    """(query, key) pairs of a chunk of q_len queries at positions [start, start+q_len) against
    its causal prefix [0, start+q_len)."""
    return q_len * start + q_len * (q_len + 1) // 2


def model_flops(*, layers: int, matmul_params_per_layer: int, q_dim: int, hidden: int, vocab: int, seq: int,
                batch: int = 1, document_length: int = 0) -> Dict[str, int]:
    """Model FLOPs of one training step over `batch` sequences of `seq` tokens (the module
    docstring says what is counted and why); `document_length`: packed documents of that length
    under document masks (0: one document per sequence)."""
    tokens = batch * seq
    dense = 6 * tokens * layers * matmul_params_per_layer
    lm_head = 6 * tokens * hidden * vocab
    attention = 3 * layers * batch * 4 * q_dim * packed_pairs(seq, document_length)
    return {"dense": dense, "lm_head": lm_head, "attention": attention, "total": dense + lm_head + attention,
            "matmul_params": layers * matmul_params_per_layer}


def mfu(model_flops_per_step: float, step_seconds: float, gpus: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: model FLOPs per second over the GPUs' peak matmul rate."""
    return model_flops_per_step / (step_seconds * gpus * peak_tflops * 1e12)
