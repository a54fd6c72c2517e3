"""The zigzag token layout.

Each sequence of length S is cut into 2*D chunks of c = S/(2D) tokens; TSP rank r holds
chunks r and 2D-1-r, in that order, so every rank has the same causal-attention work.
The layout is a permutation of the full sequence: after `to_zigzag`, Megatron's contiguous
sequence scatter hands rank r exactly its two chunks.
"""

from __future__ import annotations

import functools

import torch

from ..config import check_seq_length


def local_chunk_ids(tsp_size: int, tsp_rank: int) -> tuple[int, int]:
    return tsp_rank, 2 * tsp_size - 1 - tsp_rank


@functools.lru_cache(maxsize=64)
def _permutation(seq_length: int, tsp_size: int) -> torch.Tensor:
    check_seq_length(seq_length, tsp_size)
    c = seq_length // (2 * tsp_size)
    chunks = torch.arange(seq_length).view(2 * tsp_size, c)
    order = [i for r in range(tsp_size) for i in local_chunk_ids(tsp_size, r)]
    return chunks[order].reshape(-1)


def zigzag_permutation(seq_length: int, tsp_size: int) -> torch.Tensor:
    """`perm` with `zigzag[i] = natural[perm[i]]`; rank r holds `perm[r*S/D:(r+1)*S/D]`."""
    return _permutation(seq_length, tsp_size).clone()


@functools.lru_cache(maxsize=256)
def _index_on(kind: str, seq_length: int, tsp_size: int, device: torch.device, tsp_rank: int = 0) -> torch.Tensor:
    """The permutation ('perm'), its inverse ('inv') or a rank's positions ('local'), built once
    per device: these are read in every layer's forward and backward."""
    perm = _permutation(seq_length, tsp_size)
    if kind == "inv":
        perm = inverse_permutation(perm)
    elif kind == "local":
        s_local = seq_length // tsp_size
        perm = perm[tsp_rank * s_local : (tsp_rank + 1) * s_local]
    return perm.to(device)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def local_positions(seq_length: int, tsp_size: int, tsp_rank: int) -> torch.Tensor:
    """True positions (for RoPE) of the tokens TSP rank `tsp_rank` holds, in local order."""
    s_local = seq_length // tsp_size
    return _permutation(seq_length, tsp_size)[tsp_rank * s_local : (tsp_rank + 1) * s_local].clone()


def local_position_index(seq_length: int, tsp_size: int, tsp_rank: int, device) -> torch.Tensor:
    """`local_positions` as a cached index tensor on `device` (read-only: do not modify)."""
    return _index_on("local", seq_length, tsp_size, torch.device(device), tsp_rank)


def to_zigzag(t: torch.Tensor, tsp_size: int, dim: int) -> torch.Tensor:
    """Natural order -> zigzag order along `dim` (the full sequence, on every rank)."""
    if tsp_size == 1:
        return t
    return t.index_select(dim, _index_on("perm", t.shape[dim], tsp_size, t.device))


def from_zigzag(t: torch.Tensor, tsp_size: int, dim: int) -> torch.Tensor:
    """Zigzag order -> natural order along `dim`; the inverse of `to_zigzag`."""
    if tsp_size == 1:
        return t
    return t.index_select(dim, _index_on("inv", t.shape[dim], tsp_size, t.device))


def local_chunk_starts(seq_length: int, tsp_size: int, tsp_rank: int) -> tuple[int, int]:
    """True start positions of the two local chunks (each c = S/(2D) tokens long)."""
    c = seq_length // (2 * tsp_size)
    return tuple(i * c for i in local_chunk_ids(tsp_size, tsp_rank))
