"""Sequence-local LM head and cross entropy (`TSPOptions(tsp_lm_head='local')`, docs/design.md §10).

Rank p holds its tokens' final hidden states x_p [S/D, b, h] (zigzag, as the decoder leaves
them) and vocabulary shard p, W_p [V/D, h] (Megatron's vocab-parallel output weight, or the
tied embedding weight). The vocabulary travels to the tokens, as attention's weights do:

    m, s, t = -inf, 0, 0                      # per local token: running max, sum-exp, target logit
    for j in 0..D-1:                          # shard j+1's broadcast in flight while j computes
        W_j = broadcast(shard j, src=j)
        for each chunk c of at most T = lm_head_chunk_tokens local tokens:
            l = x_c W_j^T                     # [T, V/D]; fp32 math (float64 for float64 models)
            t_c += l[label]  where the label falls in shard j
            m_c, s_c <- online log-sum-exp update with l; l freed
    loss = m + log s - t

Backward, per shard j (broadcast again) and chunk c: recompute l, dl = (softmax - onehot) * g,
dx_c += dl W_j, dW_j += dl^T x_c; dW_j is reduced onto shard j's owner (`Reductions`, as
attention's weight gradients) and returned as the weight's gradient, so Megatron's DDP hooks
move it into .main_grad as they do attention's. Saves x_p, the labels and one log-sum-exp per
token. At most T x V/D logits exist at a time; nothing of size S x V/D.

The loss of the local tokens, [b, S/D], is all-gathered over the TSP group
(`comm.all_gather_replicated`: every rank consumes the same full loss, so the backward takes
this rank's slice) and returned as Megatron's is: [b, S] (zigzag here; TSPGPTModel un-permutes).

Same results as Megatron's output layer + `vocab_parallel_cross_entropy`, as GPTModel runs them
in megatron-core 0.16.1 and 0.19.2: no output bias, label smoothing or logit soft-capping there;
MuP's logit multiplier (0.19, `use_mup`) is applied. `cross_entropy_loss_fusion` only picks
Megatron's kernel for the same math, and GPTModel stores `fp16_lm_cross_entropy` without using
it: this head computes in fp32 (float64 for float64 models), as Megatron's does. Refused
(TSPConfigError naming the flag): `defer_embedding_wgrad_compute` and multi-token prediction at
construction; an output layer with a bias and 0.19's `output_processor` at the call.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import comm
from .exchange import Reductions, broadcast_shards, run_holder_pre_hooks
from ..config import TSPConfigError, TSPOptions


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 models (as Megatron's cross entropy), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def token_chunks(n: int, chunk: int):
    """Row slices of at most `chunk` of `n` local tokens; the last may be shorter."""
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _chunk_logits(x_c, w, dtype, scale: float):
    """[T, h] x [V/D, h] -> [T, V/D] logits in `dtype` (the GEMM in the model's dtype)."""
    logits = torch.mm(x_c, w.t()).to(dtype)
    return logits.mul_(scale) if scale != 1.0 else logits


def _shard_targets(labels_c, j: int, shard_size: int):
    """Column of each token's label in shard j (clamped) and whether the label is in shard j."""
    col = labels_c - j * shard_size
    hit = (col >= 0) & (col < shard_size)
    return col.clamp(0, shard_size - 1), hit


class TSPLMHeadFunction(torch.autograd.Function):
    """loss[i] = logsumexp_v(scale * x_i . W[v]) - scale * x_i . W[label_i] over the whole
    vocabulary, for this rank's tokens x [s, b, h] -> loss [s, b] (math dtype). `weight` is the
    owned vocab shard [V/D, h] (shard p holds rows p*V/D .. (p+1)*V/D, Megatron's layout);
    `labels` [s, b] are global vocabulary ids."""

    @staticmethod
    def forward(ctx, x, weight, labels, group, chunk_tokens: int, scale: float):
        h, shard_size = x.shape[-1], weight.shape[0]
        x2d, lab = x.reshape(-1, h), labels.reshape(-1)
        n, dtype = x2d.shape[0], math_dtype(x.dtype)
        run_max = torch.full((n,), float("-inf"), dtype=dtype, device=x.device)
        sum_exp = torch.zeros(n, dtype=dtype, device=x.device)
        target = torch.zeros(n, dtype=dtype, device=x.device)
        packer = comm.ShardPacker([weight])
        for j, buf in broadcast_shards(weight.detach().reshape(-1), packer, group):
            (w,) = packer.unpack(buf)
            for rows in token_chunks(n, chunk_tokens):
                logits = _chunk_logits(x2d[rows], w, dtype, scale)
                col, hit = _shard_targets(lab[rows], j, shard_size)
                target[rows] += torch.where(hit, logits.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)
                m, s = run_max[rows], sum_exp[rows]
                new_max = torch.maximum(m, logits.amax(dim=1))
                s.mul_(torch.exp(m - new_max)).add_(logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
                m.copy_(new_max)
                del logits
            del buf, w
        lse = sum_exp.log_().add_(run_max)
        del run_max
        ctx.group, ctx.chunk_tokens, ctx.scale, ctx.packer = group, chunk_tokens, scale, packer
        ctx.save_for_backward(x, weight, lab, lse)
        return (lse - target).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, lab, lse = ctx.saved_tensors
        group, chunk_tokens, scale, packer = ctx.group, ctx.chunk_tokens, ctx.scale, ctx.packer
        h, shard_size = x.shape[-1], weight.shape[0]
        x2d, dtype = x.reshape(-1, h), lse.dtype
        n = x2d.shape[0]
        g = grad_loss.reshape(-1).to(dtype) * scale  # d loss / d (x W^T) carries the logit scale
        # dW_j sums over the chunks: in fp32 for low-precision models (as Megatron's one GEMM
        # accumulates), then cast to the weight's dtype for the reduction.
        acc_dtype = math_dtype(weight.dtype)
        dx = torch.zeros_like(x2d)
        reductions, owned_grad = Reductions(group), None
        for j, buf in broadcast_shards(weight.detach().reshape(-1), packer, group):
            (w,) = packer.unpack(buf)
            acc = torch.zeros(shard_size, h, dtype=acc_dtype, device=x.device)
            for rows in token_chunks(n, chunk_tokens):
                dl = _chunk_logits(x2d[rows], w, dtype, scale).sub_(lse[rows].unsqueeze(1)).exp_()  # softmax
                col, hit = _shard_targets(lab[rows], j, shard_size)
                dl.scatter_add_(1, col.unsqueeze(1), hit.to(dtype).neg_().unsqueeze(1))  # - onehot
                dl = dl.mul_(g[rows].unsqueeze(1)).to(x.dtype)
                dx[rows].addmm_(dl, w)
                if acc.dtype == dl.dtype:
                    acc.addmm_(dl.t(), x2d[rows])
                else:
                    acc.add_(torch.mm(dl.t(), x2d[rows]))
                del dl
            grad = acc.to(weight.dtype)
            del acc, buf, w
            reductions.post(grad, j)
            if j == group.rank():
                owned_grad = grad
            del grad
        reductions.wait()
        return dx.view_as(x), owned_grad, None, None, None, None


class SequenceLocalLMHead:
    """The local head on one TSP group: hidden states of this rank's tokens [s, b, h], the owned
    vocab shard [V/D, h] and this rank's labels [b, s] -> the per-token loss of the whole
    sequence [b, D*s] in zigzag order, the same on every rank."""

    def __init__(self, group, chunk_tokens: int = 4096, scale: float = 1.0):
        self.group, self.chunk_tokens, self.scale = group, chunk_tokens, scale

    def __call__(self, hidden_states, weight, labels_local):
        loss = TSPLMHeadFunction.apply(hidden_states, weight, labels_local.t(), self.group, self.chunk_tokens,
                                       self.scale)  # [s, b]
        return comm.all_gather_replicated(loss, self.group).t()  # [D*s, b] -> [b, D*s]


def check_lm_head(config, options: TSPOptions, vocab_size: Optional[int], tsp_size: int) -> None:
    """What TSPGPTModel checks before it builds anything (every rank, before any collective)."""
    if vocab_size is not None and vocab_size % tsp_size:
        raise TSPConfigError(f"vocabulary size {vocab_size} must be divisible by parallel.size = {tsp_size} (each "
                             "rank holds V/D rows of the embedding and LM head): pad it, e.g. with Megatron's "
                             "--make-vocab-size-divisible-by", option="parallel.size")
    if options.tsp_lm_head == "megatron":  # null (a recipe's parallel section): local
        return
    for field, flag in (("defer_embedding_wgrad_compute", "--defer-embedding-wgrad-compute"),
                        ("mtp_num_layers", "--mtp-num-layers")):
        if getattr(config, field, None):
            raise TSPConfigError(f"{flag} is not supported by the sequence-local LM head (parallel.tsp_lm_head = "
                                 "local): use parallel.tsp_lm_head = megatron", option="parallel.tsp_lm_head")


def logit_scale(config) -> float:
    """Megatron's multiplier of the logits: MuP's `mup_output_mult` (megatron-core >= 0.19,
    `LanguageModule._scale_logits`), else 1."""
    if getattr(config, "use_mup", False):
        return float(getattr(config, "mup_output_mult", 1.0))
    return 1.0


def postprocess(model, megatron_postprocess, *args, **kwargs):
    """GPTModel._postprocess with the local head when `model.tsp_options.tsp_lm_head == 'local'`,
    labels are given and this is the last stage; Megatron's otherwise (logits, or `megatron`).
    The one place that knows the arguments of `_postprocess` (0.16.1: hidden_states, labels, ...;
    0.19.2 adds padding_mask and output_processor); they are bound by name."""
    bound = inspect.signature(megatron_postprocess).bind(*args, **kwargs).arguments
    labels = bound.get("labels")
    if model.tsp_options.tsp_lm_head == "megatron" or labels is None or not model.post_process:
        return megatron_postprocess(*args, **kwargs)
    if bound.get("output_processor") is not None:
        raise TSPConfigError("output_processor is not supported by the sequence-local LM head "
                             "(parallel.tsp_lm_head = local): use parallel.tsp_lm_head = megatron",
                             option="parallel.tsp_lm_head")
    hidden_states = bound["hidden_states"]  # [S/D, b, h], this rank's tokens
    group = model.tsp_group
    if model.tsp_options.tsp_compute_only:
        group = comm.ComputeOnlyGroup(group)
    D, p, s = group.size(), group.rank(), hidden_states.shape[0]
    if labels.shape[1] != D * s:
        raise TSPConfigError(f"labels cover {labels.shape[1]} tokens but the decoder's output covers {D} x {s}")
    if getattr(model.output_layer, "bias", None) is not None:
        raise TSPConfigError("an output layer with a bias is not supported by the sequence-local LM head "
                             "(parallel.tsp_lm_head = local): use parallel.tsp_lm_head = megatron",
                             option="parallel.tsp_lm_head")
    if model.share_embeddings_and_output_weights:
        weight = model.shared_embedding_or_output_weight()
    else:
        weight = model.output_layer.weight
    if weight is model.output_layer.weight:  # the embedding's own forward ran its hooks already
        run_holder_pre_hooks(model.output_layer)
    head = SequenceLocalLMHead(group, model.tsp_options.lm_head_chunk_tokens, logit_scale(model.config))
    return head(hidden_states, weight, labels[:, p * s : (p + 1) * s])
