"""The shard exchanges: how a layer's weight shards reach every rank of the TSP group, and how
their gradients return to the owners. Built on the primitives of `comm` (each states its backward
there); these are the schedules the attention, the MLP and the LM head share.

    broadcast_shards   forward: shard j broadcast from its owner j, for j = 0..D-1, the next
                       broadcast posted while shard j computes (attention, the MLP's `broadcast`
                       exchange, the LM head).
                       backward: the shards are broadcast again; each rank's partial dW_j goes
                       back onto the owner by a reduce (`Reductions`, at most two in flight).
    ring_shards        forward: the shards pass around the ring p -> p+1, D - 1 hops, each hop
                       in flight while the held shard computes (the MLP's `ring` exchange).
                       backward: the ring runs again and the gradient of shard j travels with
                       it; every rank adds its partial and after D hops the sum is at the owner.
    run_holder_pre_hooks  the shards are read from Megatron linear layers without calling them,
                       so their forward pre-hooks (DDP's parameter all-gather wait) run here.
"""

from __future__ import annotations

import torch

from . import comm


def broadcast_shards(owned: torch.Tensor, packer: comm.ShardPacker, group):
    """Yields (j, shard j) for j = 0..D-1; shard j+1's broadcast is in flight while j is used."""
    D, p = group.size(), group.rank()

    def post(j):
        if D == 1 or isinstance(group, comm.ComputeOnlyGroup):
            return owned, None
        buf = owned if j == p else packer.empty()
        return buf, comm.broadcast_from(buf, j, group, async_op=True)

    pending = post(0)
    for j in range(D):
        buf, req = pending
        if req is not None:
            req.wait()
        if j + 1 < D:
            pending = post(j + 1)
        yield j, buf


class Reductions:
    """Weight-gradient reductions onto their owners, at most `depth` in flight (each holds a
    shard-sized buffer until it completes)."""

    def __init__(self, group, depth: int = 2):
        self.group, self.depth, self.pending = group, depth, []

    def post(self, buf: torch.Tensor, owner: int) -> None:
        if self.group.size() == 1:
            return
        self.pending.append(comm.reduce_to(buf, owner, self.group, async_op=True))
        while len(self.pending) > self.depth:
            comm.wait_all([self.pending.pop(0)])

    def wait(self) -> None:
        comm.wait_all(self.pending)
        self.pending = []


def run_holder_pre_hooks(*holders: torch.nn.Module) -> None:
    """TSP reads its linear layers' weights without calling them. Megatron's DDP waits for a
    parameter's all-gather (--overlap-param-gather) in a forward pre-hook of the module that
    owns it, so run those hooks here."""
    for module in holders:
        for hook in list(module._forward_pre_hooks.values()):
            hook(module, ())


def ring_shards(owned: torch.Tensor, packer: comm.ShardPacker, group):
    """Yields (t, the shard held at ring step t) for t = 0..D-1, starting with the owned one; the
    next hop (send to p+1, receive from p-1) is in flight while step t computes."""
    D, shard = group.size(), owned
    for t in range(D):
        if t + 1 < D:
            incoming = packer.empty()
            requests = comm.ring_shift(shard, incoming, group)
        yield t, shard
        if t + 1 < D:
            comm.wait_all(requests)
            shard = incoming
