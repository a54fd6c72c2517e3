"""One plan: a layout's memory, communication and step time for a model, training settings and
cluster (`plan_layout`), and every usable layout's (`plan_all`): the formulas (planner.formulas,
planner.comm) put together, what fits, and the notes a plan prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .. import layouts
from ..config import AUTO_TOKENS_BELOW
from . import hardware
from .comm import CommItem, comm_items
from .formulas import (ADAM_BYTES_PER_PARAM, GIB, HOST_ADAM_BYTES_PER_PARAM, HOST_ADAM_GB_S,
                       HOST_OPTIMIZER_COPY_BYTES_PER_PARAM, Memory, elementwise_bytes, flops, memory, mlp_exchange,
                       recompute_mode, stepped_params)
from .model import Cluster, Layout, ModelSpec, TrainSpec, check_layout, usable_layouts


@dataclass
class Plan:
    layout: Layout
    dp: int
    micro_batches: int
    memory: Memory
    comm: List[CommItem]
    flops: Dict[str, float]
    time: Dict[str, float]
    fits: bool = False
    fastest: bool = False
    notes: List[str] = field(default_factory=list)


# Which kernel rate each layout kind's attention runs at: its registry mesh's `attention`. TSP and
# the CP baselines run each local chunk against its causal prefix through megatron_tsp.tsp.kernels'
# cuDNN split (an unmasked prefix + a square causal block): cuDNN's square-causal rate (555-590
# TFLOP/s measured for the split from 64K, benchmarks/results/attention_kernels_h200.md; flash's
# lower-right kernel, `rect_lower_right`, ran at ~245 and is no longer used); TP / TP+SP the whole
# sequence, square causal.
ATTENTION_FAMILY = {kind: mesh.attention for kind, (_, mesh) in layouts.PLANNER_KINDS.items()}


def step_time(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster, hw: hardware.Hardware,
              items: Optional[List[CommItem]] = None) -> dict:
    """Seconds per optimizer step: compute (GEMM FLOPs over the matmul rate, attention FLOPs
    over the attention rate of the layout's kernel shape, memory-bound bytes over HBM x
    efficiency), communication (bytes over the bus bandwidth of its collective and link), the
    optimizer, and the per-step data-parallel gradient sync."""
    items = comm_items(m, train, lay, cluster) if items is None else items
    fl = flops(m, train, lay)
    ew = elementwise_bytes(m, train, lay)
    t_mm = fl["matmul"] / (hw.matmul_tflops * 1e12)
    t_attn = fl["attention"] / (hw.attention(ATTENTION_FAMILY[lay.kind]) * 1e12)
    t_ew = ew["total"] / (hw.hbm_tb_s * 1e12 * hw.elementwise_efficiency)
    compute = t_mm + t_attn + t_ew

    def seconds(i: CommItem) -> float:
        rate = hw.host_gb_s if i.collective == "host_copy" else hw.bus_gb_s(i.collective, i.link)
        return i.time_bytes / (rate * 1e9) * (m.num_layers if i.per_layer else 1)

    def hideable(i: CommItem) -> float:
        """Seconds of an overlapped item that compute can hide: all of it, or at most the time
        of the GEMMs beside it (`overlap_flops`)."""
        if not i.overlapped:
            return 0.0
        if i.overlap_flops is None:
            return seconds(i)
        beside = i.overlap_flops * (m.num_layers if i.per_layer else 1) / (hw.matmul_tflops * 1e12)
        return min(seconds(i), beside)

    micro_items = [i for i in items if i.per_layer or i.per_micro]
    comm_all = sum(seconds(i) for i in micro_items)
    comm_hidden = sum(hideable(i) for i in micro_items)
    comm_serial = comm_all - comm_hidden
    step_comm = sum(seconds(i) for i in items if not (i.per_layer or i.per_micro))
    dp = cluster.world // lay.size
    gb = train.global_batch_size or train.micro_batch_size * dp
    n_micro = gb // (train.micro_batch_size * dp)
    stepped = stepped_params(m, train, lay, cluster)
    on_host = train.host_optimizer_fraction
    t_opt = ADAM_BYTES_PER_PARAM * stepped * (1 - on_host) / (hw.hbm_tb_s * 1e12) if train.optimizer == "adam" else 0.0
    # the offloaded share: its gradients to the host and weights back (host copies), then the host
    # Adam; counted one after the other (megatron overlaps a parameter's copies with others' steps)
    t_host_opt = stepped * on_host * (HOST_OPTIMIZER_COPY_BYTES_PER_PARAM / (hw.host_gb_s * 1e9)
                                      + HOST_ADAM_BYTES_PER_PARAM / (HOST_ADAM_GB_S * 1e9))
    t_opt += t_host_opt
    micro = {
        "no_overlap": compute + comm_all,
        "as_implemented": compute + comm_serial + max(0.0, comm_hidden - compute),
        "full_overlap": compute + max(0.0, comm_all - compute),
    }
    out = {k: n_micro * v + t_opt + step_comm for k, v in micro.items()}
    out.update({"matmul_s": n_micro * t_mm, "attention_s": n_micro * t_attn, "elementwise_s": n_micro * t_ew,
                "comm_s": n_micro * comm_all, "comm_exposed_s": n_micro * (micro["as_implemented"] - compute),
                "optimizer_s": t_opt, "host_optimizer_s": t_host_opt, "dp_sync_s": step_comm, "micro_batches": n_micro,
                "model_flops": fl["model_flops"] * n_micro})
    tokens = gb * train.seq_length
    out["tokens_per_s_per_gpu"] = tokens / out["as_implemented"] / cluster.world
    peak = hw.raw.get("matmul", {}).get("peak_bf16_tflops", hw.matmul_tflops)
    out["mfu"] = out["model_flops"] / out["as_implemented"] / (peak * 1e12)
    return out


def fits(mem: Memory, cluster: Cluster, hw: hardware.Hardware) -> bool:
    """The peak within the GPU's memory and, with offload, what every GPU offloads (checkpointed
    inputs, optimizer state: `Memory.host`) within the node's host memory (when the cluster or the
    profile gives it)."""
    capacity = cluster.gpu_memory_gib if cluster.gpu_memory_gib is not None else hw.gpu_memory_gib
    host = cluster.host_memory_gib if cluster.host_memory_gib is not None else hw.host_memory_gib
    return mem.peak / GIB <= capacity and (host is None or host_need_per_node(mem, cluster) / GIB <= host)


def host_need_per_node(mem: Memory, cluster: Cluster) -> float:
    """Bytes of pinned host memory a node's processes need: each GPU's offloaded inputs and
    optimizer state, times the GPUs of a node."""
    return mem.host * cluster.gpus_per_node


def plan_layout(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster, hw: hardware.Hardware) -> Plan:
    check_layout(m, train, lay, cluster)
    mem = memory(m, train, lay, cluster)
    items = comm_items(m, train, lay, cluster)
    t = step_time(m, train, lay, cluster, hw, items)
    dp = cluster.world // lay.size
    p = Plan(layout=lay, dp=dp, micro_batches=t["micro_batches"], memory=mem, comm=items,
             flops=flops(m, train, lay), time=t)
    p.fits = fits(mem, cluster, hw)
    p.notes.append(f"recompute: {recompute_mode(lay, train)}")
    if lay.record.uses_tsp:
        p.notes.append(f"LM head: {train.tsp_lm_head}" + (f" ({train.lm_head_chunk_tokens} tokens per chunk)"
                                                      if train.tsp_lm_head == "local" else ""))
    if lay.record.uses_tsp and train.tsp_attention_kv == "streamed":
        p.notes.append("attention: K/V streamed around the ring (two ranks' K/V of a head shard at a time)")
    if lay.cp > 1 and train.cp_comm_type == "p2p":
        p.notes.append("attention: K/V around the CP ring (cp_comm_type p2p: two ranks' K/V at a time)")
    if train.mlp_chunk_tokens:
        p.notes.append(f"MLP: token-tiled, at most {train.mlp_chunk_tokens} local tokens per chunk")
    if mem.host_offload:
        p.notes.append(f"host memory for offloaded inputs: {mem.host_offload / GIB:.1f} GiB per GPU")
    if mem.host_optimizer:
        p.notes.append(f"optimizer state on the host: {mem.host_optimizer / GIB:.1f} GiB per GPU "
                       f"({train.host_optimizer_fraction:g} of it; host Adam + copies {t['host_optimizer_s']:.2f} s "
                       "per step, an estimate)")
    exchange = mlp_exchange(train, lay)
    if exchange is not None:
        why = (f" (auto: {train.micro_batch_size * train.seq_length // lay.tsp_size} tokens per rank, tokens below "
               f"{AUTO_TOKENS_BELOW})" if train.tsp_mlp_exchange == "auto" else "")
        p.notes.append(f"MLP exchange: {exchange}{why}")
    if m.is_moe:
        ep = train.expert_size
        p.notes.append(f"MoE: {m.moe_layers} of {m.num_layers} layers, {m.num_experts} experts "
                       f"top-{m.moe_router_topk}, EP {ep} ({m.num_experts // ep} experts per GPU, expert-DP "
                       f"{cluster.world // ep}), alltoall dispatcher, balanced routing assumed")
    if lay.cp > 1:
        p.notes.append("CP modelled as K/V all-gather (re-gathered in backward), zigzag, local q/k/v/o saved")
    return p


def plan_all(m: ModelSpec, train: TrainSpec, cluster: Cluster, hw: hardware.Hardware,
             layouts: Optional[Sequence[Layout]] = None):
    """Plans for every usable layout (or the given ones: an unusable given layout is an error)
    and the skipped candidates with their reasons. Marks what fits and the fastest that fits."""
    if layouts:
        for lay in layouts:
            check_layout(m, train, lay, cluster)
        usable, skipped = list(layouts), []
    else:
        usable, skipped = usable_layouts(m, train, cluster)
    plans = [plan_layout(m, train, lay, cluster, hw) for lay in usable]
    fitting = [p for p in plans if p.fits]
    if fitting:
        min(fitting, key=lambda p: p.time["as_implemented"]).fastest = True
    return plans, skipped

