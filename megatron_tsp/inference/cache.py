"""The one exchange between TSP prefill and tensor-parallel decode, and Megatron's static KV
cache built from its result.

After prefill, rank p holds, per layer, kv[j] = its own tokens' K/V of KV-group shard j, for every
j (sequence-sharded). One all-to-all sends kv[j] to rank j: rank j then holds its KV groups for
every token (head-sharded, what TP rank j's attention reads), (D-1)/D of the cache moving once.
The D received pieces are the D ranks' tokens in rank order, i.e. zigzag order: one
permutation puts them in natural order.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from ..tsp.zigzag import from_zigzag


def exchange(kv_local: torch.Tensor, group) -> torch.Tensor:
    """[D, s_local, b, groups/D, 2, hn] (entry j: this rank's tokens, KV-group shard j) ->
    [S, b, groups/D, 2, hn]: this rank's KV groups for every token, natural order."""
    D = group.size()
    if kv_local.shape[0] != D:
        raise ValueError(f"sequence-sharded cache has {kv_local.shape[0]} KV-group shards, the group has {D} ranks")
    if D == 1:
        return kv_local[0]
    received = torch.empty_like(kv_local)
    dist.all_to_all_single(received, kv_local.contiguous(), group=group)  # received[p]: rank p's tokens
    return from_zigzag(received.flatten(0, 1), D, dim=0)


def exchange_all(kv_layers: List[torch.Tensor], group) -> List[torch.Tensor]:
    """`exchange` layer by layer, dropping each sequence-sharded layer once sent (the peak is the
    cache plus one layer)."""
    out = []
    for i in range(len(kv_layers)):
        out.append(exchange(kv_layers[i], group))
        kv_layers[i] = None
    return out


def static_context(kv_natural: List[torch.Tensor], lengths: Sequence[int], max_new_tokens: int,
                   layer_numbers: Sequence[int]):
    """Megatron's StaticInferenceContext holding the prefilled cache, ready to decode. Consumes
    `kv_natural` (each layer's entry is dropped once copied: the peak is the cache plus a layer).

    Megatron's static cache is [max_seq, batch, groups/TP, hn] for K (before RoPE) and for V, one
    write offset for the whole batch. Prompts of unequal length are right-aligned: prompt i's L_i
    tokens fill slots [P - L_i, P), P = the longest; decode writes slot P + t for every prompt.
    Slots [0, P - L_i) are masked (`decode_mask`). Megatron's RoPE reads the slot index as the
    position; `PromptRotary` gives each prompt its true positions instead (slot - (P - L_i)), so
    the angles are the unsharded model's exactly; learned absolute positions come from the true
    position ids the decode step passes."""
    from megatron.core.inference.contexts import StaticInferenceContext

    P, b = max(lengths), len(lengths)
    context = StaticInferenceContext(b, P + max_new_tokens)
    if len(layer_numbers) != len(kv_natural):
        raise ValueError(f"{len(kv_natural)} cached layers for a model of {len(layer_numbers)}")
    for index, layer_number in enumerate(layer_numbers):
        nat, kv_natural[index] = kv_natural[index], None
        _, _, g, _, hn = nat.shape
        key = nat.new_zeros(P + max_new_tokens, b, g, hn)
        value = torch.zeros_like(key)
        for i, n in enumerate(lengths):
            key[P - n : P, i] = nat[:n, i, :, 0]
            value[P - n : P, i] = nat[:n, i, :, 1]
        context.key_value_memory_dict[layer_number] = (key, value)
        del nat
    context.sequence_len_offset = P
    if hasattr(context, "enable_decode_mode"):
        context.enable_decode_mode()
    return context


def decode_mask(lengths: Sequence[int], step: int, device) -> torch.Tensor:
    """Megatron's boolean attention mask (True = not attended) for decode step `step`:
    [b, 1, 1, P + step + 1], hiding each right-aligned prompt's leading empty slots."""
    P = max(lengths)
    slots = torch.arange(P + step + 1, device=device)
    start = torch.tensor([P - n for n in lengths], device=device)
    return (slots.unsqueeze(0) < start.unsqueeze(1)).view(len(lengths), 1, 1, -1)


class PromptRotary(torch.nn.Module):
    """Megatron's RotaryEmbedding, its table indexed by each prompt's true positions on the
    right-aligned cache: [n, b, 1, dim] where Megatron's is [n, 1, 1, dim] (Megatron's RoPE
    broadcasts over the batch dimension, so the per-prompt table goes through unchanged)."""

    def __init__(self, base: torch.nn.Module, lengths: Sequence[int]):
        super().__init__()
        self.base = base
        self.shifts = [max(lengths) - n for n in lengths]

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.base.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len, *args, **kwargs):
        table = self.base(max_seq_len, *args, **kwargs)  # [n, 1, 1, dim]
        n = table.shape[0]
        shifts = torch.tensor(self.shifts, device=table.device)
        positions = (torch.arange(n, device=table.device).unsqueeze(1) - shifts.unsqueeze(0)).clamp_min(0)
        return table[:, 0][positions]  # [n, b, 1, dim]
