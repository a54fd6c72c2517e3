"""The prompt checks, torch-free: `generate --nproc-per-node N` runs them before any worker
starts and every process before its checkpoint loads; prefill and decode run them again on
what they are given (a tensor's rows included)."""

from __future__ import annotations

from typing import List, Sequence

from ..config import TSPConfigError


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_length: int, extra_tokens: int = 0,
                  what: str = "prompt") -> List[List[int]]:
    """Every bad prompt -> one TSPConfigError naming it (every rank holds the same prompts, so
    every rank raises, before any collective)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TSPConfigError(f"no {what}s given (an empty batch)")
    out = []
    for i, prompt in enumerate(prompts):
        prompt = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # a torch tensor's row
        if isinstance(prompt, (str, bytes)) or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise TSPConfigError(f"{what} {i} holds something other than integer token ids")
        ids = list(prompt)
        if not ids:
            raise TSPConfigError(f"{what} {i} is empty: a prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise TSPConfigError(f"{what} {i} has token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")
        if len(ids) + extra_tokens > max_length:
            more = f" + {extra_tokens} new tokens (--max-new-tokens)" if extra_tokens else ""
            raise TSPConfigError(f"{what} {i} has {len(ids)} tokens{more}, more than the model's limit of "
                                 f"{max_length} (max_sequence_length / model.seq_length)")
        out.append(ids)
    return out
