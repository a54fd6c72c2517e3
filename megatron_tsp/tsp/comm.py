"""Communication primitives of the TSP schedules, each with its backward stated beside it.

All take the TSP process group explicitly; ranks are *group* ranks. Every function works on
NCCL and gloo alike and allocates on the input's device.

| primitive              | forward                                 | backward                     |
|------------------------|-----------------------------------------|------------------------------|
| `broadcast_from`       | shard of rank j -> every rank           | `reduce_to` rank j (SUM)     |
| `ring_shift`           | send to rank p+1, receive from p-1      | the reverse shift            |
| `all_gather_sequence`  | [s, ...] -> [D*s, ...] in rank order    | reduce-scatter (SUM)         |
| `all_gather_replicated`| [s, ...] -> [D*s, ...], consumed alike  | this rank's slice            |
|                        | by every rank (the per-token loss)      |                              |
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the tensor collectives; the GPU machine runs 2.11.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _global(group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank)


class ComputeOnlyGroup:
    """Stands in for the TSP group in the compute-only benchmark: the same size and rank, and
    every primitive below skips its communication (a broadcast or ring buffer keeps this rank's
    shard, an all-gather repeats the local part, a reduction is a no-op). Results are wrong by
    design; shapes, kernels and memory are those of the real schedule."""

    def __init__(self, group):
        self.group = group

    def size(self) -> int:
        return self.group.size()

    def rank(self) -> int:
        return self.group.rank()


def _skip(group) -> bool:
    return isinstance(group, ComputeOnlyGroup)


def broadcast_from(buf: torch.Tensor, src: int, group, async_op: bool = False):
    """In place: every rank's `buf` becomes rank `src`'s. Backward: `reduce_to(src)`."""
    if _skip(group):
        return None
    return dist.broadcast(buf, src=_global(group, src), group=group, async_op=async_op)


def reduce_to(buf: torch.Tensor, dst: int, group, async_op: bool = False):
    """In place on rank `dst`: the SUM of every rank's `buf` (others' buffers are scratch)."""
    if _skip(group):
        return None
    return dist.reduce(buf, dst=_global(group, dst), op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def ring_shift(send: torch.Tensor, recv: torch.Tensor, group) -> List:
    """Post `send` -> rank p+1 and `recv` <- rank p-1; returns the requests to wait on."""
    D, p = group.size(), group.rank()
    if _skip(group):
        recv.copy_(send)
        return []
    ops = [
        dist.P2POp(dist.isend, send, _global(group, (p + 1) % D), group),
        dist.P2POp(dist.irecv, recv, _global(group, (p - 1) % D), group),
    ]
    return dist.batch_isend_irecv(ops)


def wait_all(requests: Optional[Sequence]) -> None:
    for r in requests or ():
        if r is not None:
            r.wait()


def all_gather_sequence_raw(local: torch.Tensor, group, async_op: bool = False):
    """[s, ...] -> [D*s, ...] in rank order; with `async_op`, returns (out, request)."""
    D = group.size()
    out = torch.empty((D * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    if _skip(group):
        out.view(D, *local.shape).copy_(local.unsqueeze(0).expand(D, *local.shape))
        request = None
    else:
        request = _all_gather_tensor(out, local.contiguous(), group=group, async_op=async_op)
    return (out, request) if async_op else out


def reduce_scatter_sequence_raw(full: torch.Tensor, group, async_op: bool = False):
    """[D*s, ...] summed over the group -> this rank's [s, ...]; with `async_op`, returns
    (out, request)."""
    D = group.size()
    out = torch.empty((full.shape[0] // D,) + tuple(full.shape[1:]), dtype=full.dtype, device=full.device)
    if _skip(group):
        out.copy_(full[group.rank() * out.shape[0] : (group.rank() + 1) * out.shape[0]])
        request = None
    else:
        request = _reduce_scatter_tensor(out, full.contiguous(), group=group, async_op=async_op)
    return (out, request) if async_op else out


class _AllGatherSequence(torch.autograd.Function):
    """[s, ...] -> [D*s, ...] in rank order. Backward: reduce-scatter to the token owners."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        return all_gather_sequence_raw(local, group)

    @staticmethod
    def backward(ctx, grad_full):
        return reduce_scatter_sequence_raw(grad_full, ctx.group), None


def all_gather_sequence(local: torch.Tensor, group) -> torch.Tensor:
    if group.size() == 1:
        return local
    return _AllGatherSequence.apply(local, group)


class _AllGatherReplicated(torch.autograd.Function):
    """[s, ...] -> [D*s, ...] in rank order, for a result that every rank consumes the same way
    (the per-token loss: every rank computes the same objective from it). The gradient arriving
    on each rank is then one and the same, so this rank's part is its slice; a reduce-scatter
    would count it D times."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.rank, ctx.rows = group.rank(), local.shape[0]
        return all_gather_sequence_raw(local, group)

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def all_gather_replicated(local: torch.Tensor, group) -> torch.Tensor:
    if group.size() == 1:
        return local
    return _AllGatherReplicated.apply(local, group)


class ShardPacker:
    """Packs one weight shard (several tensors, some maybe None) into one flat buffer, so a
    shard travels in one broadcast or one ring message."""

    def __init__(self, tensors: Sequence[Optional[torch.Tensor]]):
        present = [t for t in tensors if t is not None]
        dtypes = {t.dtype for t in present}
        if len(dtypes) != 1:
            raise ValueError(f"a TSP weight shard must have one dtype, got {sorted(map(str, dtypes))}")
        self.dtype = present[0].dtype
        self.device = present[0].device
        self.shapes = [None if t is None else tuple(t.shape) for t in tensors]
        self.numel = sum(t.numel() for t in present)

    def pack(self, tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors if t is not None])

    def empty(self) -> torch.Tensor:
        return torch.empty(self.numel, dtype=self.dtype, device=self.device)

    def unpack(self, flat: torch.Tensor) -> List[Optional[torch.Tensor]]:
        out, offset = [], 0
        for shape in self.shapes:
            if shape is None:
                out.append(None)
                continue
            n = 1
            for d in shape:
                n *= d
            out.append(flat[offset : offset + n].view(shape))
            offset += n
        return out
