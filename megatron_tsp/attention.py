"""TSP self-attention: the weights travel to the tokens, one head group at a time.

Per layer, on TSP rank p holding tokens x_p (its two zigzag chunks) and owning shard p:

    out = 0
    for j in 0..D-1:                        # shard j+1's broadcast is posted before j computes
        W_j   = broadcast(packed shard j, src=j)
        q,k,v = x_p @ Wqkv_j (+ b) ; RoPE at the true positions of x_p
        K,V   = all_gather(k,v) over the group, zigzag -> natural order
        o     = each local chunk against its causal prefix of K,V (lower-right mask)
        out  += o @ Wo_j                    # accumulates locally: no all-reduce

Backward, per shard j: re-broadcast W_j, recompute that shard's forward under autograd (the
K/V all-gather's backward is the reduce-scatter of dK,dV to the token owners), accumulate dx
locally and reduce the shard's weight gradient onto its owner j. Only x_p and the owned shard
are saved: never another rank's shard, never a gathered K/V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from . import comm
from .config import TSPConfigError, check_seq_length, validate_transformer_config
from .zigzag import from_zigzag, local_chunk_starts, local_position_index

try:  # moved between megatron-core releases; YaRN scaling only
    from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config
except ImportError:  # pragma: no cover
    def _yarn_get_concentration_factor_from_config(config):
        return 1.0


@dataclass
class AttentionShardStep:
    """One shard's forward on the local tokens; called in forward and recomputed in backward."""

    config: object
    group: object
    heads: int  # query heads per shard
    groups: int  # KV groups per shard
    head_dim: int
    softmax_scale: float
    chunk_starts: tuple  # true start positions of the two local chunks
    chunk_len: int

    def project(self, x, w_qkv, b_qkv, freqs):
        """[s, b, h] -> q [s, b, heads, hn], kv [s, b, groups, 2*hn] (Megatron's grouped layout)."""
        s, b, _ = x.shape
        hn, per_group = self.head_dim, self.heads // self.groups
        mixed = F.linear(x, w_qkv, b_qkv).view(s, b, self.groups, (per_group + 2) * hn)
        q, k, v = torch.split(mixed, [per_group * hn, hn, hn], dim=3)
        q = q.reshape(s, b, self.heads, hn)
        if freqs is not None:
            mscale = _yarn_get_concentration_factor_from_config(self.config)
            q = apply_rotary_pos_emb(q, freqs, config=self.config, mscale=mscale, cp_group=self.group)
            k = apply_rotary_pos_emb(k, freqs, config=self.config, mscale=mscale, cp_group=self.group)
        return q, torch.cat([k, v], dim=-1)

    def attend(self, q, kv_natural):
        """Each local chunk against its causal prefix [0, start + c) of the gathered K,V."""
        c, hn = self.chunk_len, self.head_dim
        outs = []
        for i, start in enumerate(self.chunk_starts):
            q_chunk = q[i * c : (i + 1) * c].permute(1, 2, 0, 3)  # [b, heads, c, hn]
            prefix = kv_natural[: start + c].permute(1, 2, 0, 3)  # [b, groups, L, 2hn]
            k, v = prefix[..., :hn], prefix[..., hn:]
            o = F.scaled_dot_product_attention(
                q_chunk, k, v,
                attn_mask=causal_lower_right(c, start + c),
                scale=self.softmax_scale,
                enable_gqa=self.heads != self.groups,
            )
            outs.append(o.permute(2, 0, 1, 3).reshape(c, o.shape[0], self.heads * hn))
        return torch.cat(outs, dim=0)

    def __call__(self, x, w_qkv, b_qkv, w_proj, freqs):
        q, kv_local = self.project(x, w_qkv, b_qkv, freqs)
        kv_gathered = comm.all_gather_sequence(kv_local, self.group)  # [S, b, groups, 2hn], rank order
        kv_natural = from_zigzag(kv_gathered, self.group.size(), dim=0)
        return F.linear(self.attend(q, kv_natural), w_proj)


def broadcast_shards(owned: torch.Tensor, packer: comm.ShardPacker, group):
    """Yields (j, shard j) for j = 0..D-1; shard j+1's broadcast is in flight while j is used."""
    D, p = group.size(), group.rank()

    def post(j):
        if D == 1:
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


class TSPAttentionFunction(torch.autograd.Function):
    """out = sum_j attention(x_p; shard j). Saves x_p and the owned shard only."""

    @staticmethod
    def forward(ctx, x, w_qkv, b_qkv, w_proj, freqs, step: AttentionShardStep):
        packer = comm.ShardPacker([w_qkv, b_qkv, w_proj])
        out = None
        for _, shard in broadcast_shards(packer.pack([w_qkv, b_qkv, w_proj]), packer, step.group):
            y = step(x, *packer.unpack(shard), freqs)
            out = y if out is None else out.add_(y)
            del y, shard
        ctx.step, ctx.packer = step, packer
        ctx.save_for_backward(x, w_qkv, b_qkv, w_proj, freqs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w_qkv, b_qkv, w_proj, freqs = ctx.saved_tensors
        step, packer, group = ctx.step, ctx.packer, ctx.step.group
        p = group.rank()
        dx, owned_grad, reductions = torch.zeros_like(x), None, []
        for j, shard in broadcast_shards(packer.pack([w_qkv, b_qkv, w_proj]), packer, group):
            with torch.enable_grad():
                x_ = x.detach().requires_grad_()
                weights = [None if w is None else w.detach().requires_grad_() for w in packer.unpack(shard)]
                y = step(x_, *weights, freqs)
                leaves = [x_] + [w for w in weights if w is not None]
                grads = torch.autograd.grad(y, leaves, grad_out)
            del y, shard, weights
            dx.add_(grads[0])
            shard_grad = torch.cat([g.reshape(-1) for g in grads[1:]])
            del grads
            if group.size() > 1:
                reductions.append(comm.reduce_to(shard_grad, j, group, async_op=True))
            if j == p:
                owned_grad = shard_grad
            del shard_grad
        comm.wait_all(reductions)
        dw_qkv, db_qkv, dw_proj = packer.unpack(owned_grad)
        return dx, dw_qkv, db_qkv, dw_proj, None, None


def run_holder_pre_hooks(*holders: torch.nn.Module) -> None:
    """TSP reads its linear layers' weights without calling them. Megatron's DDP waits for a
    parameter's all-gather (--overlap-param-gather) in a forward pre-hook of the module that
    owns it, so run those hooks here."""
    for module in holders:
        for hook in list(module._forward_pre_hooks.values()):
            hook(module, ())


class TSPSelfAttention(SelfAttention):
    """Megatron's SelfAttention whose `linear_qkv` / `linear_proj` hold this rank's weight shard
    (native TP layout, init and checkpoints), with the TSP schedule as forward.
    The TSP group is `pg_collection.tp`. Input and output: this rank's tokens, [S/D, b, h]."""

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal, **kwargs):
        tp = kwargs.get("pg_collection").tp if kwargs.get("pg_collection") is not None else None
        if tp is None:
            from megatron.core import parallel_state

            tp = parallel_state.get_tensor_model_parallel_group()
        validate_transformer_config(config, tp.size())
        if attn_mask_type != AttnMaskType.causal:
            raise TSPConfigError(f"TSP attention supports causal masks only, got attn_mask_type={attn_mask_type}")
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        self.tsp_group = self.pg_collection.tp
        hn = self.hidden_size_per_attention_head
        self.softmax_scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(hn)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        # attention_mask is ignored: TSP attention is causal (as Megatron's flash/TE paths).
        if inference_context is not None or inference_params is not None:
            raise TSPConfigError("inference (KV cache) is not supported with --tsp-size in this version")
        if packed_seq_params is not None:
            raise TSPConfigError("packed sequences (packed_seq_params / THD) are not supported with --tsp-size")
        if attention_bias is not None or key_value_states is not None:
            raise TSPConfigError("attention_bias / cross-attention are not supported by TSP attention")
        if rotary_pos_cos is not None or rotary_pos_sin is not None or rotary_pos_cos_sin is not None:
            raise TSPConfigError("precomputed RoPE cos/sin (inference) are not supported by TSP attention")

        group = self.tsp_group
        D, p = group.size(), group.rank()
        s_local = hidden_states.shape[0]
        S = s_local * D
        check_seq_length(S, D, what="sequence length (S/D local tokens x --tsp-size)")
        freqs = None
        if rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple):
                q_emb, k_emb = rotary_pos_emb
                if k_emb is not q_emb and not torch.equal(q_emb, k_emb):
                    raise TSPConfigError("TSP attention needs the same RoPE table for queries and keys")
                rotary_pos_emb = q_emb
            if rotary_pos_emb.shape[0] < S:
                raise TSPConfigError(
                    f"RoPE table has {rotary_pos_emb.shape[0]} positions but the sequence has {S}: "
                    "pass the full-sequence table (Megatron does when sequence_parallel=True)"
                )
            freqs = rotary_pos_emb.index_select(0, local_position_index(S, D, p, rotary_pos_emb.device))

        run_holder_pre_hooks(self.linear_qkv, self.linear_proj)
        step = AttentionShardStep(
            config=self.config,
            group=group,
            heads=self.num_attention_heads_per_partition,
            groups=self.num_query_groups_per_partition,
            head_dim=self.hidden_size_per_attention_head,
            softmax_scale=self.softmax_scale,
            chunk_starts=local_chunk_starts(S, D, p),
            chunk_len=S // (2 * D),
        )
        out = TSPAttentionFunction.apply(
            hidden_states, self.linear_qkv.weight, self.linear_qkv.bias, self.linear_proj.weight, freqs, step
        )
        return out, self.linear_proj.bias
