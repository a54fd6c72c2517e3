"""TSP MLP (`TSPMLP`): every exchange of the MLP with its weight shards. The ring (below) is
the default at long sequences; broadcast and tokens are at the end.

Ring: weight shards travel around the ring, tokens never leave their rank.

Shard j = rows [gate_j; up_j] of fc1 (Megatron's stride-2 GLU layout on TP rank j) and the
matching columns of fc2. On TSP rank p, at ring step t it holds shard j = (p - t) mod D:

    out = 0
    for t in 0..D-1:
        post send(shard -> p+1), recv(next <- p-1)        # overlapped with the GEMMs below
        out += fc2_j(act(fc1_j(x_p)))                     # local accumulation, no all-reduce
        wait; shard = next

Backward runs the ring again. The gradient of shard j travels with it: every rank adds its
partial, and after D hops the sum arrives at the owner. Saves x_p, the owned shard and, unless
recompute='full', each shard's fc1 output (what Megatron's MLP saves, over the local tokens);
with 'full', each shard's fc1 runs again in backward.

Token tiling (`TSPOptions(mlp_chunk_tokens=N)`, N > 0): within each shard step the local tokens
run in chunks c of at most N, and nothing but x_p is saved (fc1 always runs again in backward):

    forward, shard step t:   for c: out[c] += fc2_j(act(fc1_j(x_p[c])))
    backward, shard step t:  for c: rebuild fc1_j(x_p[c]), act; dW_j += (chunk's partial);
                                    dx[c] += d fc1_j(x_p[c]) @ W_fc1_j
                             post the gradient's exchange after the last chunk's dW (its dx GEMM
                             overlaps the exchange)

so the shard step's working set is one chunk's [N, f/D] pieces, not [S/D, f/D]. The weight
shards move exactly as untiled: one ring pass (or D broadcasts) per direction, not per chunk.

`TSPOptions(tsp_mlp_exchange='broadcast')` runs the same math with attention's exchange instead:
shard j broadcast from its owner, its gradient reduced onto the owner (`TSPBroadcastMLPFunction`).
`'tokens'` keeps the weights and moves the tokens (Megatron's sequence-parallel MLP forward);
`'auto'` (the default) picks `tokens` below AUTO_TOKENS_BELOW local tokens, else the ring; tiled,
`tokens` runs Megatron's MLP on token chunks (`tiled_mlp.tiled_megatron_mlp_forward`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.transformer.mlp import MLP

from . import comm
from .. import compat
from .exchange import Reductions, broadcast_shards, ring_shards, run_holder_pre_hooks
from .tiled_mlp import tiled_megatron_mlp_forward
from ..config import TSPConfigError, TSPOptions, require_group, resolve_mlp_exchange, validate_transformer_config


class Activation:
    """Megatron MLP's unfused activation: act(x), or for GLU act(gate) * (up + offset),
    with the optional clamp. Fused kernels compute the same function."""

    def __init__(self, config):
        self.func = config.activation_func
        self.gated = config.gated_linear_unit
        self.clamp = getattr(config, "activation_func_clamp_value", None)
        self.offset = getattr(config, "glu_linear_offset", 0.0)

    def __call__(self, h):
        if not self.gated:
            return self.func(h)
        gate, up = torch.chunk(h, 2, dim=-1)
        if self.clamp is not None:
            gate = gate.clamp(min=None, max=self.clamp)
            up = up.clamp(min=-self.clamp, max=self.clamp)
        return self.func(gate) * (up + self.offset)


def fc1(x, w_fc1, b_fc1):
    return F.linear(x, w_fc1, b_fc1)


def token_chunks(tokens: int, chunk_tokens: int) -> list:
    """Row slices of the local tokens ([s*b, h] as 2-D) of at most `chunk_tokens` rows each;
    [None] (the whole 3-D tensor, untiled) when `chunk_tokens` is 0."""
    if not chunk_tokens:
        return [None]
    return [slice(i, min(i + chunk_tokens, tokens)) for i in range(0, tokens, chunk_tokens)]


def shard_backward(g2d, x2d, h1, w_fc2, activation, grad_views, accumulate: bool = False):
    """One shard's weight gradients from its fc1 output h1 [s, b, 2f/D or f/D] (or [rows, ...]
    of a token chunk, with g2d and x2d the chunk's rows), written into `grad_views` (views of one
    flat buffer; `accumulate`: added to them, for the chunks after the first); returns d(fc1
    output) [rows, out] for the caller's dx += dh1 @ W_fc1, which runs after the caller has posted
    the gradient's exchange, so the last exchange of a layer overlaps that GEMM."""
    gw1, gb1, gw2 = grad_views
    with torch.enable_grad():
        h1_ = h1.detach().requires_grad_()
        a = activation(h1_)
    a2d = a.detach().reshape(g2d.shape[0], -1)
    if accumulate:
        gw2.addmm_(g2d.t(), a2d)
    else:
        torch.mm(g2d.t(), a2d, out=gw2)
    del a2d
    (dh1,) = torch.autograd.grad(a, h1_, torch.mm(g2d, w_fc2).view(a.shape))
    del a, h1_
    dh1 = dh1.reshape(g2d.shape[0], -1)
    if accumulate:
        gw1.addmm_(dh1.t(), x2d)
        if gb1 is not None:
            gb1.add_(dh1.sum(dim=0))
    else:
        torch.mm(dh1.t(), x2d, out=gw1)
        if gb1 is not None:
            torch.sum(dh1, dim=0, out=gb1)
    return dh1


def shard_backward_chunks(g2d, x2d, dx, chunks, h1_of, w1, w_fc2, activation, grad_views):
    """shard_backward over the token chunks of one shard step: each chunk's fc1 output from
    `h1_of(rows)` (the saved one, or fc1 run again on the chunk), its partial weight gradients
    summed into `grad_views`, and dx[rows] += dh1 @ W_fc1 for every chunk but the last, whose
    (dh1, rows) come back for the caller to finish after posting the gradient's exchange."""
    dh1, last = None, None
    for i, rows in enumerate(chunks):
        if dh1 is not None:
            dx[last].addmm_(dh1, w1)
        r = slice(None) if rows is None else rows
        h1 = h1_of(rows)
        dh1 = shard_backward(g2d[r], x2d[r], h1, w_fc2, activation, grad_views, accumulate=i > 0)
        last = r
        del h1
    return dh1, last


def forward_over_shards(shards, packer, x, activation, recompute: str, chunks=(None,)):
    """out = sum over the shards of fc2_j(act(fc1_j(x))), each shard over the token `chunks`
    (token_chunks; [None]: untiled); untiled with recompute='none' also each shard's fc1 output,
    in shard order, for the backward."""
    out, saved = None, []
    x2d = x.reshape(-1, x.shape[-1])
    for _, shard in shards:
        w1, b1, w2 = packer.unpack(shard)
        for rows in chunks:
            h1 = fc1(x if rows is None else x2d[rows], w1, b1)
            y = F.linear(activation(h1), w2)
            if rows is None:
                out = y if out is None else out.add_(y)
                if recompute == "none":
                    saved.append(h1)
            else:
                if out is None:
                    out = torch.zeros_like(x2d)
                out[rows].add_(y)
            del y, h1
        del w1, b1, w2, shard
    return out.view_as(x), saved


def _forward(ctx, shard_iterator, x, w_fc1, b_fc1, w_fc2, activation, group, recompute: str, chunk_tokens: int):
    """Both MLP Functions' forward; they differ in how the shards arrive (`ring_shards` or
    `broadcast_shards`)."""
    packer = comm.ShardPacker([w_fc1, b_fc1, w_fc2])
    shards = shard_iterator(packer.pack([w_fc1, b_fc1, w_fc2]), packer, group)
    chunks = token_chunks(x.numel() // x.shape[-1], chunk_tokens)
    out, saved = forward_over_shards(shards, packer, x, activation, recompute, chunks)
    ctx.activation, ctx.group, ctx.packer, ctx.chunks = activation, group, packer, chunks
    ctx.save_for_backward(x, w_fc1, b_fc1, w_fc2, *saved)
    return out


def _backward_inputs(ctx, grad_out):
    """x, the weights, the saved fc1 outputs, x and grad_out as 2-D, and a zero dx."""
    x, w_fc1, b_fc1, w_fc2, *saved = ctx.saved_tensors
    h = x.shape[-1]
    x2d = x.reshape(-1, h)
    return x, w_fc1, b_fc1, w_fc2, saved, x2d, grad_out.reshape(-1, h), torch.zeros_like(x2d)


def _fc1_rebuild(saved_h1, x, x2d, w1, b1):
    """rows -> the shard's fc1 output over those token rows: the saved one (untiled, recompute
    'none'), or fc1 run again (on all of x untiled, on the chunk's rows tiled)."""
    def h1_of(rows):
        if saved_h1 is not None:
            return saved_h1
        return fc1(x if rows is None else x2d[rows], w1, b1)
    return h1_of


class TSPBroadcastMLPFunction(torch.autograd.Function):
    """The MLP with attention's exchange: shard j is broadcast from its owner (shard j+1's
    broadcast in flight while j computes) and its gradient reduced onto the owner."""

    @staticmethod
    def forward(ctx, x, w_fc1, b_fc1, w_fc2, activation, group, recompute: str, chunk_tokens: int = 0):
        return _forward(ctx, broadcast_shards, x, w_fc1, b_fc1, w_fc2, activation, group, recompute, chunk_tokens)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_fc1, b_fc1, w_fc2, saved, x2d, g2d, dx = _backward_inputs(ctx, grad_out)
        activation, group, packer = ctx.activation, ctx.group, ctx.packer
        reductions, owned_grad = Reductions(group), None
        for j, shard in broadcast_shards(packer.pack([w_fc1, b_fc1, w_fc2]), packer, group):
            w1, b1, w2 = packer.unpack(shard)
            h1_of = _fc1_rebuild(saved[j] if saved else None, x, x2d, w1, b1)
            grad_buf = packer.empty()
            dh1, rows = shard_backward_chunks(g2d, x2d, dx, ctx.chunks, h1_of, w1, w2, activation,
                                              packer.unpack(grad_buf))
            reductions.post(grad_buf, j)
            dx[rows].addmm_(dh1, w1)
            del h1_of, dh1, w1, b1, w2, shard
            if j == group.rank():
                owned_grad = grad_buf
            del grad_buf
        reductions.wait()
        dw_fc1, db_fc1, dw_fc2 = packer.unpack(owned_grad)
        return dx.view_as(x), dw_fc1, db_fc1, dw_fc2, None, None, None, None


class TSPRingMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc1, b_fc1, w_fc2, activation, group, recompute: str, chunk_tokens: int = 0):
        return _forward(ctx, ring_shards, x, w_fc1, b_fc1, w_fc2, activation, group, recompute, chunk_tokens)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_fc1, b_fc1, w_fc2, saved, x2d, g2d, dx = _backward_inputs(ctx, grad_out)
        activation, group, packer = ctx.activation, ctx.group, ctx.packer
        D = group.size()
        grad_in, grad_requests = None, None  # the accumulated gradient arriving from p-1
        for t, shard in ring_shards(packer.pack([w_fc1, b_fc1, w_fc2]), packer, group):
            w1, b1, w2 = packer.unpack(shard)
            h1_of = _fc1_rebuild(saved[t] if saved else None, x, x2d, w1, b1)
            grad_acc = packer.empty()
            dh1, rows = shard_backward_chunks(g2d, x2d, dx, ctx.chunks, h1_of, w1, w2, activation,
                                              packer.unpack(grad_acc))
            if t > 0:  # add the partials of the ranks this shard visited before
                comm.wait_all(grad_requests)
                grad_acc.add_(grad_in)
            if D > 1:  # after the D-th hop the gradient of shard p+1 reaches its owner
                grad_in = packer.empty()
                grad_requests = comm.ring_shift(grad_acc, grad_in, group)
            else:
                grad_in = grad_acc
            dx[rows].addmm_(dh1, w1)  # while the hop is in flight
            del h1_of, dh1, w1, b1, w2, shard
        comm.wait_all(grad_requests)
        dw_fc1, db_fc1, dw_fc2 = packer.unpack(grad_in)
        return dx.view_as(x), dw_fc1, db_fc1, dw_fc2, None, None, None, None


class TSPMLP(MLP):
    """Megatron's MLP whose `linear_fc1` / `linear_fc2` hold this rank's shard (native TP
    layout), with TSP's exchange as forward: the ring, the broadcast or the tokens
    (`TSPOptions.tsp_mlp_exchange`). Input and output: this rank's tokens, [S/D, b, h].
    The TSP group comes in as `tp_group`: from the spec's params (megatron-core <= 0.17), or
    from the layer's `pg_collection.tp` through `as_mlp_submodule` (0.18+); required."""

    def __init__(self, config, submodules, is_expert=False, input_size=None, ffn_hidden_size=None, tp_group=None,
                 tsp_options: Optional[TSPOptions] = None, name=None):
        if is_expert:
            raise TSPConfigError("MoE experts are not supported by the TSP MLP in this version")
        require_group(tp_group, "TSPMLP", "tp_group")
        validate_transformer_config(config, tp_group.size())
        super().__init__(
            config, submodules, input_size=input_size,
            ffn_hidden_size=config.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size,
            tp_group=tp_group, **compat.mlp_name_kwargs(name),
        )
        self.tsp_options = tsp_options or TSPOptions()
        self.tsp_group = self.tp_group
        if self.tsp_options.tsp_compute_only:
            self.tsp_group = comm.ComputeOnlyGroup(self.tsp_group)
        self.activation = Activation(config)

    @classmethod
    def as_mlp_submodule(cls, submodules, config, pg_collection, is_mtp_layer, tp_group=None,
                         tsp_options: Optional[TSPOptions] = None, is_expert=False, input_size=None,
                         ffn_hidden_size=None, name=None):
        """The layer's MLP builder from megatron-core 0.18 (`TransformerLayer` calls
        `submodules.mlp(config=, pg_collection=, is_mtp_layer=, name=)`): the TSP group is
        `pg_collection.tp`, the group attention runs on. `tp_group` (the spec's group, if it
        names one) must be that group."""
        group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        if group is None:
            group = tp_group
        elif tp_group is not None and dist.get_process_group_ranks(tp_group) != dist.get_process_group_ranks(group):
            raise TSPConfigError(
                f"the TSP layer spec names group ranks {dist.get_process_group_ranks(tp_group)} but the layer's "
                f"pg_collection.tp is ranks {dist.get_process_group_ranks(group)}: attention and MLP must share one group"
            )
        return cls(config, submodules, is_expert=is_expert, input_size=input_size, ffn_hidden_size=ffn_hidden_size,
                   tp_group=group, tsp_options=tsp_options, name=name)

    def exchange(self, hidden_states) -> str:
        """The exchange this call runs: `auto` resolves by the local token count (compute-only
        runs keep to TSP's own exchanges, which it can skip)."""
        return resolve_mlp_exchange(self.tsp_options.tsp_mlp_exchange, hidden_states.shape[0] * hidden_states.shape[1],
                                    self.tsp_group.size(), self.tsp_options.tsp_compute_only)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise TSPConfigError("per_token_scale (MoE) is not supported by the TSP MLP")
        exchange = self.exchange(hidden_states)
        chunk_tokens = self.tsp_options.mlp_chunk_tokens
        if exchange == "tokens":  # Megatron's sequence-parallel MLP: all-gather in, reduce-scatter out
            if chunk_tokens:
                return tiled_megatron_mlp_forward(self, hidden_states, chunk_tokens)
            return super().forward(hidden_states)
        run_holder_pre_hooks(self.linear_fc1, self.linear_fc2)
        function = TSPBroadcastMLPFunction if exchange == "broadcast" else TSPRingMLPFunction
        out = function.apply(
            hidden_states, self.linear_fc1.weight, self.linear_fc1.bias, self.linear_fc2.weight,
            self.activation, self.tsp_group, self.tsp_options.tsp_recompute, chunk_tokens,
        )
        return out, self.linear_fc2.bias


# TSPMLP's name until issue 29 (it runs every exchange, not only the ring): docs/python_api.md
# listed it as public, so it still imports (here and from megatron_tsp), with a DeprecationWarning.
DEPRECATED_NAMES = {"TSPRingMLP": "TSPRingMLP is deprecated: it is TSPMLP (the same class; it runs every MLP "
                                  "exchange, not only the ring)"}


def __getattr__(name):
    if name in DEPRECATED_NAMES:
        warnings.warn(DEPRECATED_NAMES[name], DeprecationWarning, stacklevel=2)
        return TSPMLP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
