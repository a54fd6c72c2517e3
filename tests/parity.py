"""Parity harness: a TSP block against Megatron's native block holding the same full weights
(kind 'attention', 'mlp'; 'tiled_mlp': Megatron's MLP at TP + SP on D ranks run on token chunks).

Returns relative errors of the output, the input gradient and every weight gradient, so the
same harness serves the parity tests and the test-the-test (sensitivity) checks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP

from megatron_tsp import compat
from megatron_tsp.tsp.attention import TSPSelfAttention
from megatron_tsp.tsp.mlp import TSPMLP
from megatron_tsp.tsp.tiled_mlp import TiledMLP
from megatron_tsp.baselines.specs import get_sp_layer_spec
from megatron_tsp.tsp.zigzag import to_zigzag
from tests.utils import (device, gather_full, init_tsp, load_full_into, mock_batch, rel_err, singleton_pgs,
                         sum_sequence_parallel_grads, tiny_config)


def fresh_seed() -> int:
    """A new random seed per call, the same on every rank."""
    seed = torch.tensor([int.from_bytes(os.urandom(4), "little") % (2**31)], dtype=torch.long, device=device())
    dist.broadcast(seed, src=0)
    return int(seed.item())


def _local(t, D, r):
    s = t.shape[0] // D
    return to_zigzag(t, D, dim=0)[r * s : (r + 1) * s]


def block_parity(kind, D, *, groups=None, bias=False, rope=True, gated=True, S=16, b=2,
                 dtype=torch.float64, heads=4, hidden=32, ffn=64, options=None):
    init_tsp(D)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    group, r = pgs.tp, pgs.tp.rank()
    seed = fresh_seed()
    torch.manual_seed(seed)
    kw = dict(groups=groups, bias=bias, gated=gated, dtype=dtype, heads=heads, hidden=hidden, ffn=ffn)
    ref_cfg, tsp_cfg = tiny_config(1, **kw), tiny_config(D, **kw)
    spec = get_sp_layer_spec(ref_cfg).submodules
    dev = device()
    if kind == "attention":
        sub = spec.self_attention.submodules
        ref = SelfAttention(ref_cfg, sub, layer_number=1, attn_mask_type=AttnMaskType.causal,
                            pg_collection=singleton_pgs())
        tsp = TSPSelfAttention(tsp_cfg, sub, layer_number=1, pg_collection=pgs, tsp_options=options)
    else:
        sub = compat.mlp_submodules(spec.mlp)
        ref = MLP(ref_cfg, sub, ffn_hidden_size=ffn, tp_group=singleton_pgs().tp)
        if kind == "tiled_mlp":  # the baselines' MLP: Megatron's (TP + SP on D ranks) on token chunks
            tsp = TiledMLP(tsp_cfg, sub, ffn_hidden_size=ffn, tp_group=group,
                           mlp_chunk_tokens=(options.mlp_chunk_tokens if options is not None else 0))
        else:
            tsp = TSPMLP(tsp_cfg, sub, tp_group=group, tsp_options=options)
    ref, tsp = ref.to(dev, dtype), tsp.to(dev, dtype)
    load_full_into(tsp, dict(ref.named_parameters()), group)

    x = torch.randn(S, b, hidden, dtype=dtype, device=dev)
    g = torch.randn(S, b, hidden, dtype=dtype, device=dev)
    extra = {}
    if kind == "attention" and rope:
        extra["rotary_pos_emb"] = RotaryEmbedding(kv_channels=hidden // heads, rotary_percent=1.0)(S).to(dev)

    x_ref = x.clone().requires_grad_()
    out_ref, bias_ref = ref(x_ref, None, **extra) if kind == "attention" else ref(x_ref)
    ((out_ref if bias_ref is None else out_ref + bias_ref) * g).sum().backward()

    x_loc = _local(x, D, r).clone().requires_grad_()
    out, out_bias = tsp(x_loc, None, **extra) if kind == "attention" else tsp(x_loc)
    ((out if out_bias is None else out + out_bias) * _local(g, D, r)).sum().backward()
    sum_sequence_parallel_grads(tsp, group)

    errors = {"output": rel_err(out, _local(out_ref, D, r)), "input_grad": rel_err(x_loc.grad, _local(x_ref.grad, D, r))}
    ref_params = dict(ref.named_parameters())
    for name, p in tsp.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        errors[name] = rel_err(gather_full(p.grad, p, group), ref_params[name].grad)
    # Every rank must agree: gather the worst error of each entry.
    vals = torch.tensor(list(errors.values()), dtype=torch.float64, device=dev)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(errors, vals.tolist())), seed


def model_loss_and_grads(model, shape, seed):
    """The loss and every full parameter gradient of a built float64 model on the current TSP / TP
    group. The loss is a fixed random linear function of the logits, in float64: Megatron's
    vocab-parallel cross entropy casts the logits to float32, which would hide everything below 1e-7."""
    tokens, _, pos = mock_batch(0, 2, shape, seed=seed)
    logits = model(tokens, pos, None)  # [b, S, V/D]: every token, this rank's vocabulary shard
    group = mpu.get_tensor_model_parallel_group()
    weights = torch.randn(logits.shape[0], logits.shape[1], shape.vocab_size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed)).to(logits.device)
    v = logits.shape[-1]
    loss = (logits * weights[..., group.rank() * v:(group.rank() + 1) * v]).sum()
    loss.backward()
    loss = loss.detach().reshape(1)
    dist.all_reduce(loss, group=group)
    sum_sequence_parallel_grads(model, group)
    return loss, {n: gather_full(p.grad, p, group) for n, p in model.named_parameters()}


def worst_error(got, ref):
    """The largest relative error of the loss and the gradients, the same on every rank."""
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert grads.keys() == ref_grads.keys()
    errs = [rel_err(loss, ref_loss)] + [rel_err(grads[n], ref_grads[n]) for n in grads]
    worst = torch.tensor([max(errs)], dtype=torch.float64, device=loss.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def lengths_to_ids(lengths, device=None) -> torch.Tensor:
    """Document lengths of one sequence -> its document ids [S]."""
    return torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(lengths)]).to(device)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, S] document ids -> positions that restart at 0 per document (GPTDataset's reset_position_ids)."""
    S = doc_ids.shape[1]
    idx = torch.arange(S, device=doc_ids.device).expand_as(doc_ids)
    first = torch.searchsorted(doc_ids.contiguous(), doc_ids.contiguous(), right=False)
    return idx - first


def document_block_parity(D, layouts, *, groups=None, heads=4, hidden=32, options=None, rope=True,
                          dtype=torch.float64):
    """TSP attention on packed sequences (one list of document lengths per sample; the document
    ids as attention_mask, RoPE positions restarting per document) against Megatron's native
    SelfAttention run on each document alone with the same weights: output, input gradient and
    every weight gradient (the loss is a sum over documents, so the weight gradients add up)."""
    from megatron_tsp.tsp.model import rope_at_positions

    init_tsp(D)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    group, r = pgs.tp, pgs.tp.rank()
    seed = fresh_seed()
    torch.manual_seed(seed)
    b, S = len(layouts), sum(layouts[0])
    assert all(sum(lengths) == S for lengths in layouts)
    kw = dict(groups=groups, dtype=dtype, heads=heads, hidden=hidden)
    ref_cfg, tsp_cfg = tiny_config(1, **kw), tiny_config(D, **kw)
    sub = get_sp_layer_spec(ref_cfg).submodules.self_attention.submodules
    dev = device()
    ref = SelfAttention(ref_cfg, sub, layer_number=1, attn_mask_type=AttnMaskType.causal,
                        pg_collection=singleton_pgs()).to(dev, dtype)
    tsp = TSPSelfAttention(tsp_cfg, sub, layer_number=1, pg_collection=pgs, tsp_options=options).to(dev, dtype)
    load_full_into(tsp, dict(ref.named_parameters()), group)
    x = torch.randn(S, b, hidden, dtype=dtype, device=dev)
    g = torch.randn(S, b, hidden, dtype=dtype, device=dev)
    table = RotaryEmbedding(kv_channels=hidden // heads, rotary_percent=1.0)(S).to(dev) if rope else None

    x_ref = x.clone().requires_grad_()
    out_ref = torch.zeros_like(x)
    total = 0
    for i, lengths in enumerate(layouts):
        a = 0
        for n in lengths:
            extra = {"rotary_pos_emb": table[:n]} if rope else {}
            o, o_bias = ref(x_ref[a : a + n, i : i + 1], None, **extra)
            o = o if o_bias is None else o + o_bias
            total = total + (o * g[a : a + n, i : i + 1]).sum()
            out_ref[a : a + n, i : i + 1] = o.detach()
            a += n
    total.backward()

    doc_ids = torch.stack([lengths_to_ids(lengths, dev) for lengths in layouts])
    extra = {"rotary_pos_emb": rope_at_positions(table, document_positions(doc_ids))} if rope else {}
    x_loc = _local(x, D, r).clone().requires_grad_()
    out, out_bias = tsp(x_loc, doc_ids, **extra)
    ((out if out_bias is None else out + out_bias) * _local(g, D, r)).sum().backward()
    sum_sequence_parallel_grads(tsp, group)

    errors = {"output": rel_err(out, _local(out_ref, D, r)),
              "input_grad": rel_err(x_loc.grad, _local(x_ref.grad, D, r))}
    ref_params = dict(ref.named_parameters())
    for name, p in tsp.named_parameters():
        errors[name] = rel_err(gather_full(p.grad, p, group), ref_params[name].grad)
    vals = torch.tensor(list(errors.values()), dtype=torch.float64, device=dev)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(errors, vals.tolist())), seed
