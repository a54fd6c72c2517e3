"""Token-tiled MLP for Megatron's own MLP (the baselines' TP, TP+SP, CP and FSDP-over-CP layers,
and TSP's `tokens` exchange): ALST's TiledMLP (DeepSpeed) on Megatron's modules.

    forward (no graph):  for each chunk c of the local tokens:  out[c] = mlp(x[c])   # saves x only
    backward:            for each chunk c:  rebuild mlp(x[c]) with autograd,
                                             dx[c] = d/dx[c];  dW += d/dW              # summed here
                         hand dW to autograd once

The MLP is token-wise, so the chunks are independent: the working set of the forward and of the
backward is one chunk's (its fc1 output, activation, their gradients) instead of the rank's tokens'.
With sequence parallelism each chunk is all-gathered in and reduce-scattered out by Megatron's
linear layers; every rank of the group holds the same number of tokens, so every rank cuts the
same chunks and the collectives pair up.

The weight gradients of all chunks are summed inside the Function's backward and returned as the
gradients of the parameters, which the Function takes as inputs: autograd accumulates each
parameter's gradient exactly once per backward, so Megatron DDP's grad-accumulator hooks
(main_grad, --overlap-grad-reduce's "grad ready") and FSDP2's post-backward see one gradient, as
from the untiled MLP. The chunks' own backward runs through `torch.autograd.grad` (inputs given:
no `.grad` is written and no accumulator hook fires).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.transformer.mlp import MLP

from .. import compat
from ..config import TSPConfigError, check_mlp_chunk_tokens, require_group


def sequence_chunks(positions: int, batch: int, chunk_tokens: int) -> List[slice]:
    """Slices of dim 0 of an [s, b, ...] activation holding at most `chunk_tokens` tokens each
    (at least one position of every sequence: max(1, chunk_tokens // b) positions); one slice of
    everything when `chunk_tokens` is 0."""
    if not chunk_tokens:
        return [slice(0, positions)]
    step = max(1, chunk_tokens // max(1, batch))
    return [slice(i, min(i + step, positions)) for i in range(0, positions, step)]


class TokenTiledFunction(torch.autograd.Function):
    """out = run(x), run chunk by chunk along dim 0 (`chunks`: slices); `params`: the parameters
    `run` uses (their gradients are summed over the chunks and returned once)."""

    @staticmethod
    def forward(ctx, run: Callable, chunks: Sequence[slice], x, *params):
        ctx.run, ctx.chunks, ctx.params = run, chunks, params
        ctx.save_for_backward(x)
        out = None
        for rows in chunks:  # grad mode is off inside forward: no chunk keeps anything
            y = run(x[rows])
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out[rows] = y
            del y
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        wanted = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[3 + i]]
        params = [ctx.params[i] for i in wanted]
        dx = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        sums: Optional[List[torch.Tensor]] = None
        for rows in ctx.chunks:
            with torch.enable_grad():
                xc = x[rows].detach().requires_grad_(dx is not None)
                y = ctx.run(xc)
            grads = torch.autograd.grad(y, ([xc] if dx is not None else []) + params, grad_out[rows])
            del y, xc
            if dx is not None:
                dx[rows] = grads[0]
                grads = grads[1:]
            sums = list(grads) if sums is None else [s.add_(g) for s, g in zip(sums, grads)]
            del grads
        param_grads = [None] * len(ctx.params)
        for i, g in zip(wanted, sums or []):
            param_grads[i] = g
        return (None, None, dx, *param_grads)


def mlp_params(mlp: MLP) -> List[torch.Tensor]:
    """The parameters Megatron's MLP forward uses for its output: everything but linear_fc2's
    bias, which Megatron's MLP returns beside the output (skip_bias_add) for the layer's
    bias-dropout-add."""
    skip = getattr(mlp.linear_fc2, "bias", None) if getattr(mlp.linear_fc2, "skip_bias_add", True) else None
    return [p for p in mlp.parameters() if p is not skip]


def tiled_megatron_mlp_forward(mlp: MLP, hidden_states, chunk_tokens: int):
    """Megatron's `MLP.forward` of `mlp` on token chunks of `hidden_states` [s, b, h] (its tokens,
    sequence-parallel or not): (output, output bias), as the untiled MLP returns them."""
    if mlp.config.gradient_accumulation_fusion:
        raise TSPConfigError("the token-tiled MLP (parallel.mlp_chunk_tokens > 0) needs --no-gradient-accumulation-"
                             "fusion: the fused kernel writes each chunk's weight gradient into main_grad itself",
                             option="parallel.mlp_chunk_tokens")
    chunks = sequence_chunks(hidden_states.shape[0], hidden_states.shape[1], chunk_tokens)

    def run(x):
        return MLP.forward(mlp, x)[0]

    out = TokenTiledFunction.apply(run, chunks, hidden_states, *mlp_params(mlp))
    bias = mlp.linear_fc2.bias if getattr(mlp.linear_fc2, "skip_bias_add", True) else None
    return out, bias


class TiledMLP(MLP):
    """Megatron's MLP (the local spec's, on `tp_group`), run on chunks of at most
    `mlp_chunk_tokens` local tokens (`tiled_megatron_mlp_forward`); 0: Megatron's forward as is.
    The baselines' layer spec puts it in place of MLP when parallel.mlp_chunk_tokens > 0
    (`megatron_tsp.baselines.specs.get_sp_layer_spec`). Parameters, layout and checkpoints are MLP's."""

    def __init__(self, config, submodules, is_expert=False, input_size=None, ffn_hidden_size=None, tp_group=None,
                 mlp_chunk_tokens: int = 0, name=None):
        if is_expert:
            raise TSPConfigError("the token-tiled MLP runs dense MLPs, not MoE experts")
        require_group(tp_group, "TiledMLP", "tp_group")
        check_mlp_chunk_tokens(mlp_chunk_tokens)
        super().__init__(config, submodules, input_size=input_size, ffn_hidden_size=ffn_hidden_size,
                         tp_group=tp_group, **compat.mlp_name_kwargs(name))
        self.mlp_chunk_tokens = mlp_chunk_tokens

    @classmethod
    def as_mlp_submodule(cls, submodules, config, pg_collection, is_mtp_layer, tp_group=None, mlp_chunk_tokens=0,
                         is_expert=False, input_size=None, ffn_hidden_size=None, name=None):
        """The layer's MLP builder from megatron-core 0.18 (the group: `pg_collection.tp`)."""
        group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        if group is None:
            group = tp_group
        elif tp_group is not None and dist.get_process_group_ranks(tp_group) != dist.get_process_group_ranks(group):
            raise TSPConfigError("the tiled MLP's spec names another group than the layer's pg_collection.tp")
        return cls(config, submodules, is_expert=is_expert, input_size=input_size, ffn_hidden_size=ffn_hidden_size,
                   tp_group=group, mlp_chunk_tokens=mlp_chunk_tokens, name=name)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise TSPConfigError("per_token_scale (MoE experts) is not supported by the token-tiled MLP")
        if not self.mlp_chunk_tokens:
            return super().forward(hidden_states)
        return tiled_megatron_mlp_forward(self, hidden_states, self.mlp_chunk_tokens)
