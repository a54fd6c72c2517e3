"""Prefill per layout (issue 17): the working set (one layer's transient activations at the
peak of a forward-only prefill) and the prefill time, per GPU. Weights and KV cache:
planner.inference.

Working set, bytes per GPU, b = dtype bytes, s = tokens a GPU runs the layer over (TSP: B S/D;
TP: B S, or B C with chunked prefill of C tokens; CP: B S/C), counted at the last layer's MLP
(the KV cache is then complete) from megatron_tsp.inference.prefill and tsp/mlp.py:

    stream = 4 s h b      the embedding output (prefill keeps it until the decoder returns; TSP
                          only, 3 s h b for the baselines), the layer input, the residual after
                          attention, the pre-MLP norm output
    mlp    = gated: fc1 output s 2f/w + act(gate), up + offset, their product (3 s f/w), at the
             multiply; GELU: fc1 output + act (2 s f/w); w = weight shards (TSP D, TP T, CP 1)
             + s h b for the partial sum (TSP D > 1: the shard accumulator; TP: fc2's output
             before its all-reduce)
             + the MLP weight shards in flight (TSP ring: own packed copy, in use, next hop:
             min(D, 3) shards of Pm/D; D = 1 packs one copy)
    attn   = the QKV output s (q + 2kv)/w, q and k after RoPE s (q + kv)/w, the attention output
             s q/w, the projection s h, + the K/V the layout reads whole: TSP two gathered
             [S, 2kv/D] shards, CP the gathered [B S, 2kv], TP chunked the cache (already counted)
    working set = stream + max(mlp, attn)

Measured at D = 1 (one H200, docs/inference.md) the model is within a few percent
(tests/planner/test_planner_prefill.py reads benchmarks/results/inference_d1/).

Time: forward only, the training model's rates (planner.step_time): matmul FLOPs 2 T N / n,
attention 2 B S^2 q / n (causal half of QK^T and PV), the forward's memory-bound bytes, and
the forward's communication items of planner.comm.comm_items (TSP: the attention weight
broadcast, the K/V all-gather with one exposed shard, the MLP weight ring hidden behind its
GEMMs; TP: two all-reduces of the S x h activations per layer; CP: the K/V all-gather).
Chunked TP prefill runs the same FLOPs (the causal area summed over the chunks is S (S+1)/2)
and the same bytes, so its modelled time equals unchunked TP: the model has no per-chunk cost
(kernel efficiency on short chunks, launch overheads) - a known gap. Not counted: the
hand-over (TSP's cache all-to-all), the last-token LM head, sampling.
"""

from __future__ import annotations

from typing import Dict, Optional

from . import hardware
from .comm import comm_items
from .inference import inference_memory
from .model import Cluster, Layout, ModelSpec, PlanError, TrainSpec
from .plan import ATTENTION_FAMILY

GIB = 2**30


def _spec(prompt_tokens: int, batch: int) -> TrainSpec:
    # forward only: nothing saved, TSP's ring MLP (what tsp_prefill runs)
    return TrainSpec(seq_length=prompt_tokens, micro_batch_size=batch, optimizer="none", tsp_recompute="full",
                     tsp_mlp_exchange="ring", recompute="none")


def working_set(m: ModelSpec, lay: Layout, prompt_tokens: int, batch: int = 1,
                chunk_tokens: Optional[int] = None) -> Dict[str, float]:
    """Bytes per GPU of one layer's transient activations at the peak (module docstring)."""
    if lay.kind not in ("tsp", "tp", "cp"):
        raise PlanError(f"prefill is modelled for tsp, tp and cp layouts, not {lay.kind!r}")
    if chunk_tokens is not None and (not lay.tp_without_sp or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise PlanError(f"chunk tokens: a positive integer, for a tp layout only; got {chunk_tokens!r} with {lay.kind}")
    b, h, B, S = m.dtype_bytes, m.hidden_size, batch, prompt_tokens
    if lay.record.uses_tsp:
        D = lay.tsp_size
        S = -(-S // (2 * D)) * (2 * D)
        s, w = B * S / D, D
    elif lay.tp_without_sp:
        s, w = B * min(S, chunk_tokens or S), lay.tp
    else:
        s, w = B * S / lay.cp, 1
    stream = (4 if lay.record.uses_tsp else 3) * s * h * b
    inter = (5 if m.swiglu else 2) * s * m.f / w * b
    partial = s * h * b if (lay.record.uses_tsp and lay.tsp_size > 1) or (lay.tp_without_sp and lay.tp > 1) else 0.0
    shards = min(lay.tsp_size, 3) * m.mlp_params / lay.tsp_size * b if lay.record.uses_tsp else 0.0
    mlp = inter + partial + shards
    attn = s * b * ((m.q_dim + 2 * m.kv_dim) / w + (m.q_dim + m.kv_dim) / w + m.q_dim / w + h)
    if lay.record.uses_tsp and lay.tsp_size > 1:
        attn += 2 * B * S * 2 * m.kv_dim / lay.tsp_size * b
    elif lay.mesh.context and lay.cp > 1:  # CP all-gathers K/V
        attn += B * S * 2 * m.kv_dim * b
    return {"stream": stream, "mlp": mlp, "attention": attn, "total": stream + max(mlp, attn)}


def prefill_time(m: ModelSpec, lay: Layout, prompt_tokens: int, hw: hardware.Hardware, cluster: Cluster,
                 batch: int = 1) -> Dict[str, float]:
    """Seconds of a forward-only prefill (module docstring); comm as implemented (overlapped
    items hidden up to the compute beside them)."""
    train = _spec(prompt_tokens, batch)
    B, S, L, b, h = batch, prompt_tokens, m.num_layers, m.dtype_bytes, m.hidden_size
    n = lay.size
    t_mm = 2 * B * S * m.layer_matmul_params * L / n / (hw.matmul_tflops * 1e12)
    t_attn = 2 * B * S * S * m.q_dim * L / n / (hw.attention(ATTENTION_FAMILY[lay.kind]) * 1e12)
    # the forward's memory-bound bytes per token and layer, as formulas.elementwise_bytes counts
    # them for a recomputed forward: two norms, the residual adds, RoPE, the activation
    norm = {"torch": 108 * h, "lean": 126 * h, "fused": 6 * h * b}[train.norm]
    rope = 28 * (m.q_dim + m.kv_dim) * b / 2
    act = (16 if m.swiglu else 4) * m.f * b / 2
    s = B * S / n
    per_layer = (2 * norm / 3 + 24 * h * b / 4 + rope + act) * s
    t_ew = per_layer * L / (hw.hbm_tb_s * 1e12 * hw.elementwise_efficiency)
    compute = t_mm + t_attn + t_ew
    items = [i for i in comm_items(m, train, lay, cluster) if i.phase == "fwd" and i.per_layer]
    exposed = 0.0
    for i in items:
        sec = i.time_bytes / (hw.bus_gb_s(i.collective, i.link) * 1e9) * L
        hide = 0.0
        if i.overlapped:
            hide = sec if i.overlap_flops is None else min(sec, i.overlap_flops * L / (hw.matmul_tflops * 1e12))
        exposed += sec - hide
    comm = sum(i.time_bytes / (hw.bus_gb_s(i.collective, i.link) * 1e9) * L for i in items)
    return {"matmul_s": t_mm, "attention_s": t_attn, "elementwise_s": t_ew, "comm_s": comm,
            "comm_exposed_s": exposed, "total_s": compute + exposed}


def prefill_plan(m: ModelSpec, lay: Layout, prompt_tokens: int, hw: hardware.Hardware, cluster: Cluster,
                 batch: int = 1, new_tokens: int = 0, chunk_tokens: Optional[int] = None) -> Dict[str, float]:
    """Per GPU: weights, KV cache after prefill, working set, prefill peak (weights + the cache
    + the working set) and the hand-over / decode peaks, in GiB; prefill seconds."""
    mem = inference_memory(m, lay, prompt_tokens, batch, new_tokens)
    ws = working_set(m, lay, prompt_tokens, batch, chunk_tokens)
    t = prefill_time(m, lay, prompt_tokens, hw, cluster, batch)
    prefill_peak = mem["weights"] + mem["kv_prefill"] + ws["total"]
    return {"layout": lay.label + (f" chunk {chunk_tokens}" if chunk_tokens else ""),
            "weights_gib": mem["weights"] / GIB, "kv_cache_gib": mem["kv_prefill"] / GIB,
            "working_set_gib": ws["total"] / GIB, "prefill_peak_gib": prefill_peak / GIB,
            "peak_gib": max(prefill_peak, mem["weights"] + mem["handover"]) / GIB,
            "prefill_s": t["total_s"], "prefill_comm_exposed_s": t["comm_exposed_s"]}
