"""TSP prefill: a batch of prompts through a TSPGPTModel, forward only, as in training.

Each rank holds 1/D of the weights and the tokens of its two zigzag chunks; prompts of unequal
length are padded at the END to a common S (a multiple of 2D): causality already hides a padded
position from every real token, so nothing else masks them, and the padded rows are never read.

    x_p   = embedding of the local tokens (vocab shards broadcast in turn, as the local LM head
            does: no [S, b, h] partial-sum tensor as Megatron's sequence-parallel embedding makes)
    per layer: TSP attention + ring MLP (no autograd state: tsp_recompute='full' semantics, and
            `tsp_mlp_exchange='auto'` runs the ring, never the token all-gather); each shard j's
            K (before RoPE) and V of the local tokens are kept: [s_local, b, groups/D, 2, hn],
            so a rank keeps 1/D of the cache (its tokens, every KV group)
    last logits: each prompt's last real position lives on one rank; its final hidden state
            (b x h) is summed over the group and multiplied by this rank's vocab shard, the
            [b, V/D] pieces all-gathered: no full-sequence LM head.
    log-probs (`labels`): the sequence-local LM head (`lm_head.TSPLMHeadFunction`) forward only:
            per-token log-probabilities [b, S], never S x V/D logits.

The K before RoPE is what Megatron's static KV cache stores (RoPE is applied at attention time
to the cached keys), so after `cache.exchange` the cache is Megatron's, element for element.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..tsp import comm
from ..tsp.attention import AttentionShard
from ..tsp.exchange import broadcast_shards
from ..config import TSPConfigError
from ..tsp.lm_head import TSPLMHeadFunction, logit_scale
from ..tsp.zigzag import from_zigzag, local_position_index
from .prompts import check_prompts  # noqa: F401 (decode and the tests import it from here)


@dataclass
class CachingAttentionShard(AttentionShard):
    """An AttentionShard that appends, per `project`, the local tokens' K (before RoPE) and V
    of its KV groups to `sink`: [s_local, b, groups, 2, hn]."""

    sink: Optional[list] = None

    def project(self, x, w_qkv, b_qkv, rope):
        mixed = F.linear(x, w_qkv, b_qkv)
        s, b = mixed.shape[:2]
        pg = self.heads // self.groups
        self.sink.append(mixed.view(s, b, self.groups, pg + 2, self.head_dim)[..., pg:, :].clone())
        return self.split(mixed, rope)


def _model_parts(model):
    """(TSP group, vocab size, max sequence length, output weight) of a TSPGPTModel; refuses
    what prefill does not handle."""
    if not getattr(model, "pre_process", True) or not getattr(model, "post_process", True):
        raise TSPConfigError("TSP inference needs pipeline-model-parallel-size 1 (the whole model on every TSP rank)")
    if model.position_embedding_type not in ("rope", "learned_absolute", "none"):
        raise TSPConfigError(f"TSP inference supports position_embedding_type rope / learned_absolute / none, "
                             f"got {model.position_embedding_type!r}")
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight
    return model.tsp_group, model.vocab_size, model.max_sequence_length, weight


def padded_length(longest: int, D: int) -> int:
    """The prefill length: the longest prompt rounded up to a multiple of 2D."""
    return -(-longest // (2 * D)) * (2 * D)


@dataclass
class Prefill:
    """What a TSP prefill leaves on each rank.

    lengths: real tokens per prompt; seq_length: S (padded, a multiple of 2D).
    last_logits: [b, V] logits of each prompt's last real token (the full vocabulary, every rank).
    kv: per layer, [D, s_local, b, groups/D, 2, hn]: entry j holds this rank's tokens' K (before
      RoPE) and V of KV-group shard j (TP rank j's groups), tokens in local zigzag order; None
      unless `keep_cache`.
    logprobs: [b, S] log p(labels[:, i] | tokens[:, :i+1]) in natural order when `labels` were
      given (padded positions hold garbage)."""

    lengths: List[int]
    seq_length: int
    last_logits: torch.Tensor
    kv: Optional[List[torch.Tensor]] = None
    logprobs: Optional[torch.Tensor] = None


@contextlib.contextmanager
def _prefill_mode(model, sinks: Optional[list]):
    """For the call: no autograd saves (tsp_recompute='full' options: each shard's activations are
    dropped as soon as used), the ring MLP (`auto` would gather all S tokens below a threshold),
    and, with `sinks`, K/V-keeping attention shards. Restores the modules afterwards."""
    saved = []
    try:
        for module in model.modules():
            options = getattr(module, "tsp_options", None)
            if options is not None and module is not model:
                exchange = "ring" if options.tsp_mlp_exchange == "auto" else options.tsp_mlp_exchange
                saved.append((module, "tsp_options", options))
                module.tsp_options = dataclasses.replace(options, tsp_recompute="full", tsp_mlp_exchange=exchange)
        if sinks is not None:
            for layer in model.decoder.layers:
                attention = layer.self_attention
                sink = []
                sinks.append(sink)
                saved.append((attention, "shard_class", attention.shard_class))
                attention.shard_class = functools.partial(CachingAttentionShard, sink=sink)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def embed_local(model, tokens_local: torch.Tensor, positions_local: torch.Tensor) -> torch.Tensor:
    """Megatron's LanguageModelEmbedding for this rank's tokens [b, s] -> [s, b, h], with the
    vocab shards broadcast in turn (each token's row comes from the shard that holds it)."""
    embedding, group, config = model.embedding, model.tsp_group, model.config
    weight = embedding.word_embeddings.weight
    rows = weight.shape[0]
    out = weight.new_zeros(*tokens_local.shape, weight.shape[1])
    packer = comm.ShardPacker([weight])
    for j, buf in broadcast_shards(weight.detach().reshape(-1), packer, group):
        (w,) = packer.unpack(buf)
        col = tokens_local - j * rows
        hit = (col >= 0) & (col < rows)
        out[hit] = w[col[hit]]
        del buf, w
    if embedding.add_position_embedding:
        out = out + embedding.position_embeddings(positions_local)
    out = out.transpose(0, 1).contiguous()
    if getattr(config, "use_mup", False) and getattr(config, "mup_embedding_mult", 1.0) != 1.0:
        out = out * config.mup_embedding_mult
    if config.fp32_residual_connection:
        out = out.float()
    return out


def _gather_vocab(logits_shard: torch.Tensor, group) -> torch.Tensor:
    """[b, V/D] on each rank -> [b, V] (shard j = rows j*V/D.. of the output weight)."""
    if group.size() == 1:
        return logits_shard
    parts = [torch.empty_like(logits_shard) for _ in range(group.size())]
    dist.all_gather(parts, logits_shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def tsp_prefill(model, prompts: Sequence[Sequence[int]], *, keep_cache: bool = True,
                labels: Optional[Sequence[Sequence[int]]] = None, checked: bool = False) -> Prefill:
    """Prefill `prompts` (lists of token ids, the same on every rank) on the TSP group of
    `model` (a TSPGPTModel, pipeline size 1). `labels`: per prompt, the next-token ids (same
    lengths as the prompts) whose log-probabilities to return (`Prefill.logprobs`)."""
    group, vocab_size, max_length, out_weight = _model_parts(model)
    if not checked:
        prompts = check_prompts(prompts, vocab_size, max_length)
    if labels is not None:
        labels = check_prompts(labels, vocab_size, 1 << 62, what="label sequence")
        if [len(x) for x in labels] != [len(x) for x in prompts]:
            raise TSPConfigError("labels must have one id per prompt token")
    D, p = group.size(), group.rank()
    lengths = [len(x) for x in prompts]
    S, b = padded_length(max(lengths), D), len(prompts)
    device = out_weight.device
    tokens = torch.zeros(b, S, dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    local = local_position_index(S, D, p, device)  # true positions of this rank's rows
    positions = local.unsqueeze(0).expand(b, -1).clamp(max=max_length - 1)  # padded rows: any valid id

    was_training = model.training
    model.eval()
    sinks = [] if keep_cache else None
    try:
        with _prefill_mode(model, sinks):
            x = embed_local(model, tokens.index_select(1, local), positions)
            rope = model.rotary_pos_emb(S) if model.position_embedding_type == "rope" else None
            hidden = model.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)  # [s, b, h]
            del x
    finally:
        model.train(was_training)

    scale = logit_scale(model.config)
    # each prompt's last real token: on exactly one rank; the others add zeros (exact)
    last = torch.tensor([n - 1 for n in lengths], device=device)
    rows, cols = (local.unsqueeze(1) == last.unsqueeze(0)).nonzero(as_tuple=True)
    h_last = hidden.new_zeros(b, hidden.shape[-1])
    h_last[cols] = hidden[rows, cols]
    if D > 1:
        dist.all_reduce(h_last, group=group)
    logits = F.linear(h_last, out_weight)
    if scale != 1.0:
        logits = logits * scale
    last_logits = _gather_vocab(logits, group)

    logprobs = None
    if labels is not None:
        lab = torch.zeros(b, S, dtype=torch.long, device=device)
        for i, ids in enumerate(labels):
            lab[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss = TSPLMHeadFunction.apply(hidden, out_weight, lab.index_select(1, local).t().contiguous(), group,
                                       model.tsp_options.lm_head_chunk_tokens, scale)  # [s, b]
        if D > 1:
            loss = from_zigzag(comm.all_gather_sequence_raw(loss.contiguous(), group), D, dim=0)
        logprobs = loss.neg().t()
    del hidden
    kv = None
    if sinks is not None:
        kv = []
        for sink in sinks:
            if len(sink) != D:
                raise RuntimeError(f"expected {D} K/V shards per layer, the attention produced {len(sink)}")
            kv.append(torch.stack(sink))
            sink.clear()
    return Prefill(lengths=lengths, seq_length=S, last_logits=last_logits, kv=kv, logprobs=logprobs)
