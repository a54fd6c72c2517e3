"""Document masks of packed sequences: which tokens may attend to which.

A packed sequence holds several documents, each ended by an EOD token. Megatron's GPTDataset
(`_get_ltor_masks_and_position_ids`, `reset_attention_mask`) stops a token from seeing any
token up to and including an earlier EOD; the EOD belongs to the document it ends. The same
rule as document ids:

    doc[b, i] = number of EOD tokens in tokens[b, :i]          (non-decreasing in i)
    query i sees key j  <=>  j <= i  and  doc[b, i] == doc[b, j]

The attention modules (TSP's, the SDPA and CP baselines') take the document ids in place of
Megatron's boolean `attention_mask`: an integer tensor [b, S], the whole sequence in natural
order, on every rank (O(S) memory, never the S x S mask). A boolean mask keeps its old meaning
(ignored by causal attention, as in Megatron's flash / Transformer Engine paths).

Because ids never decrease, the keys a query chunk [start, start + c) can see begin at the
first token of the document of `start`: everything before is skipped (`key_start`), and only
the rest is masked elementwise. The streamed K/V schedule meets keys a chunk at a time: for it,
`chunk_links` tells which (query chunk, key chunk) pairs are hidden (skipped), wholly visible
(no document mask) or partly visible (masked elementwise).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..config import TSPConfigError

WHAT = "attention_mask (document ids)"


def is_document_ids(mask) -> bool:
    """Whether an `attention_mask` argument carries document ids (an integer tensor)."""
    return isinstance(mask, torch.Tensor) and not mask.dtype.is_floating_point and mask.dtype != torch.bool


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, S] tokens -> [b, S] int64 document ids (the EOD token closes its document)."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def check_document_ids(doc_ids: torch.Tensor, batch: Optional[int], seq_length: int, what: str = WHAT) -> None:
    """One clear error for ids that are not [b, S] integers, non-decreasing along the sequence.
    Every rank holds the same ids (the whole sequence), so every rank raises the same error
    before any collective. Reads the data (one device sync)."""
    if not is_document_ids(doc_ids):
        got = getattr(doc_ids, "dtype", type(doc_ids).__name__)
        raise TSPConfigError(f"{what} must be an integer tensor [batch, sequence], got {got}")
    if doc_ids.dim() != 2 or doc_ids.shape[1] != seq_length or (batch is not None and doc_ids.shape[0] != batch):
        raise TSPConfigError(f"{what} must have shape [batch={batch if batch is not None else 'b'}, "
                             f"sequence={seq_length}], got {list(doc_ids.shape)}")
    if seq_length > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise TSPConfigError(f"{what} must be non-decreasing along the sequence (documents are contiguous; "
                             "Megatron's EOD boundaries give such ids)")


def key_starts(doc_ids: torch.Tensor, starts: Sequence[int]) -> Tuple[int, ...]:
    """For each query chunk start: the first key any sample's chunk can see (the start of the
    document holding that query, the smallest over the batch). One device sync for all."""
    first = doc_ids[:, list(starts)]  # [b, n]
    lo = torch.searchsorted(doc_ids.contiguous(), first.contiguous(), right=False)  # first index of that id
    return tuple(int(v) for v in lo.min(dim=0).values.tolist())


# chunk_links' values: no query of chunk i sees a key of chunk k (in any sample); the document
# mask decides; every query sees every key that causality allows (one document throughout)
HIDDEN, PARTIAL, VISIBLE = 0, 1, 2


def chunk_links(doc_ids: torch.Tensor, c: int) -> Tuple[Tuple[int, ...], ...]:
    """For the S/c chunks of c tokens: links[i][k] (HIDDEN, PARTIAL or VISIBLE) of query chunk i
    and key chunk k <= i over the whole batch (k > i: HIDDEN, causality hides it). Ids never
    decrease, so chunk i sees chunk k < i iff k's last id equals i's first (in some sample), and
    sees it all iff k's first id equals i's last (in every sample). One device sync for all."""
    ends = torch.stack([doc_ids[:, 0::c], doc_ids[:, c - 1 :: c]]).tolist()  # [2, b, n]
    first, last = ends
    n = len(first[0])
    links = []
    for i in range(n):
        row = []
        for k in range(n):
            if k > i:
                row.append(HIDDEN)
            elif all(f[k] == l[i] for f, l in zip(first, last)):
                row.append(VISIBLE)
            elif k < i and all(l[k] != f[i] for f, l in zip(first, last)):
                row.append(HIDDEN)
            else:
                row.append(PARTIAL)
        links.append(tuple(row))
    return tuple(links)


def chunk_mask(doc_ids: torch.Tensor, q_start: int, c: int, k_start: int, k_end: int) -> torch.Tensor:
    """The document part of a chunk's mask: [b, 1, c, k_end - k_start], True = masked out
    (the causal part is the kernel's lower-right mask)."""
    dq = doc_ids[:, q_start : q_start + c]
    dk = doc_ids[:, k_start:k_end]
    return (dq.unsqueeze(-1) != dk.unsqueeze(-2)).unsqueeze(1)


def full_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The whole S x S mask [b, 1, S, S] (True = masked out): causal and same document. For
    attention over the full sequence (the TP + SP baseline's SDPA, as Megatron's
    `create_attention_mask` builds it)."""
    S = doc_ids.shape[1]
    i = torch.arange(S, device=doc_ids.device)
    causal = i.unsqueeze(0) > i.unsqueeze(1)
    return (causal | (doc_ids.unsqueeze(-1) != doc_ids.unsqueeze(-2))).unsqueeze(1)


def masked_pairs(doc_ids: torch.Tensor) -> int:
    """The (query, key) pairs causal document attention computes, summed over the batch:
    the sum over documents of n (n + 1) / 2."""
    total = 0
    for row in doc_ids:
        n = torch.unique_consecutive(row, return_counts=True)[1]
        total += int((n * (n + 1) // 2).sum())
    return total
