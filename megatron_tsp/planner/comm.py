"""Communication of one training step, per GPU: every collective (and host copy) of each layout,
as `CommItem`s (docs/planner.md, "Communication").

`comm_items` lists them in the order the code runs its parts: the layout's own collectives (TSP's
attention and MLP exchanges; TP+SP's sequence gathers; TP's all-reduces; CP's K/V; FSDP's weight
gathers), the MoE all-to-alls, what Megatron's layer recompute runs again, the local LM head's
vocab shards, activation offload's host copies, and the data-parallel gradient sync of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .formulas import (FP32, cp_ring, in_layer_mode, layer_recompute, mlp_exchange, param_counts,
                       shared_expert_model, uses_local_head)
from .model import Cluster, Layout, ModelSpec, TrainSpec


@dataclass
class CommItem:
    name: str
    phase: str  # fwd, bwd, step
    collective: str  # all_gather, reduce_scatter, all_reduce, broadcast, reduce, send_recv, all_to_all, host_copy
    volume: float  # bytes each rank receives (per layer for fwd/bwd, per step for step)
    time_bytes: float  # bytes / bus bandwidth = seconds (NCCL bus-bandwidth convention)
    group: int
    link: str  # intra or inter (host: a host copy)
    overlapped: bool  # overlapped with compute as the code runs today
    per_layer: bool = True
    # matmul FLOPs (per layer, like volume) that run beside it: at most their time hides it;
    # None: any compute of the step may
    overlap_flops: Optional[float] = None
    per_micro: bool = False  # once per micro-batch (the LM head, activation offload), not per layer


class _Items(list):
    """One GPU's CommItems, in order."""

    def __init__(self, cluster: Cluster):
        super().__init__()
        self.cluster = cluster

    def add(self, name, phase, coll, volume, group, stride, overlapped, time_bytes=None, per_layer=True,
            overlap_flops=None, per_micro=False, frac=1.0, link=None):
        """A collective over `group` ranks `stride` apart (its link: inside a node or across), if it
        moves anything. frac: the share of the layers that run it (an MLP of dense layers only, the
        MoE layer's all-to-alls): per-layer items are per layer on average."""
        if group > 1 and volume > 0 and frac > 0:
            link = link or ("intra" if group * stride <= self.cluster.gpus_per_node else "inter")
            time_bytes = volume if time_bytes is None else time_bytes
            overlap_flops = None if overlap_flops is None else overlap_flops * frac
            self.append(CommItem(name, phase, coll, volume * frac, time_bytes * frac, group, link, overlapped,
                                 per_layer, overlap_flops, per_micro))


def comm_items(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster) -> List[CommItem]:
    """Per-layer (and per-step) traffic of one GPU. `volume`: bytes it receives; `time_bytes`:
    bytes over the collective's NCCL bus bandwidth gives its time."""
    items = _Items(cluster)
    if lay.record.uses_tsp:
        tsp_attention_items(items, m, train, lay)
        for mm, frac in layout_mlps(m):
            tsp_mlp_items(items, mm, frac, "shared expert" if mm is not m else "MLP", train, lay)
    if lay.sequence_parallel and not lay.record.uses_tsp:  # Megatron's TP + SP, T > 1
        tp_sp_items(items, m, train, lay)
    if lay.tp_without_sp and lay.tp > 1:
        tp_items(items, m, train, lay)
    if lay.cp > 1:
        cp_items(items, m, train, lay)
    if lay.mesh.fsdp:
        fsdp_items(items, m, lay)
    if m.is_moe and train.expert_size > 1:
        moe_items(items, m, train, lay)
    layer_recompute_items(items, m, train)  # after every forward item it runs again
    if uses_local_head(train, lay) and lay.tsp_size > 1:
        local_head_items(items, m, lay)
    offload_items(items, m, train, lay)
    dp_sync_items(items, m, train, lay)
    return list(items)


def layout_mlps(m: ModelSpec) -> list:
    """[(the model of an MLP, the share of the layers that run it)]: the layers whose MLP is a
    dense MLP of the layout (TSP's exchange, TP+SP's gathers): the dense layers, and the MoE
    layers' shared experts."""
    out = [(m, m.dense_layers / m.num_layers)] if m.dense_layers else []
    if m.is_moe and m.moe_shared_expert_intermediate_size:
        out.append((shared_expert_model(m), m.moe_layers / m.num_layers))
    return out


def tsp_attention_items(items: _Items, m: ModelSpec, train: TrainSpec, lay: Layout) -> None:
    """TSP attention: the weight shards' broadcasts and gradient reduces, each head shard's K/V
    (all-gathered, or streamed around the ring) and their gradients."""
    b, B, S, D = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.tsp_size
    r = (D - 1) / D
    Pa, KV = m.attn_params * b, B * S * 2 * m.kv_dim * b
    # K/V: one shard of lag both ways (attention.py): shard j's all-gather is in flight while
    # j-1 attends, j's dK/dV reduce-scatter while j-1 finishes. Modelled simply: one shard's
    # transfer per layer and direction waits with nothing beside it (the forward's last
    # gather, the backward's first re-gather and last reduce-scatter), the other D-1 overlap.
    # With recompute the backward re-gathers synchronously (no prefetch).
    prefetched = in_layer_mode(lay, train) == "save"
    streamed = train.tsp_attention_kv == "streamed"
    for phase in ("fwd", "bwd"):
        # D broadcasts of Pa/D: each rank receives (D-1)/D Pa; NCCL time = D x (Pa/D) / busbw
        items.add("attention weight broadcast", phase, "broadcast", r * Pa, D, 1, True, time_bytes=Pa)
        if streamed:
            # per shard D-1 hops of [B S / D, 2 kv / D], each posted before the step it hides
            # behind; with recompute the backward runs the forward's ring again. The overlap is
            # not measured on the GPU yet: modelled as the gathered schedule's (one shard's
            # transfer exposed per direction), so the planner prefers streaming only to fit
            hops = 2 if phase == "bwd" and not prefetched else 1
            items.add("K/V ring (D-1 shards, overlapped)", phase, "send_recv", hops * r * KV * (D - 1) / D, D, 1, True)
            items.add("K/V ring (one shard, exposed)", phase, "send_recv", hops * r * KV / D, D, 1, False)
        elif phase == "fwd" or prefetched:
            items.add("K/V all-gather (D-1 shards, overlapped)", phase, "all_gather", r * KV * (D - 1) / D, D, 1,
                      True)
            items.add("K/V all-gather (one shard, exposed)", phase, "all_gather", r * KV / D, D, 1, False)
        else:
            items.add("K/V all-gather (synchronous with recompute)", phase, "all_gather", r * KV, D, 1, False)
    if streamed:
        # D hops per shard of the dK/dV partials (KV in all: the reduce-scatter's r KV and the
        # hop home); as the K/V, one shard's modelled exposed
        items.add("dK/dV ring (D-1 shards, overlapped)", "bwd", "send_recv", KV * (D - 1) / D, D, 1, True)
        items.add("dK/dV ring (one shard, exposed)", "bwd", "send_recv", KV / D, D, 1, False)
    else:
        items.add("dK/dV reduce-scatter (D-1 shards, overlapped)", "bwd", "reduce_scatter", r * KV * (D - 1) / D, D,
                  1, True)
        items.add("dK/dV reduce-scatter (last shard, exposed)", "bwd", "reduce_scatter", r * KV / D, D, 1, False)
    items.add("attention weight-grad reduce", "bwd", "reduce", r * Pa, D, 1, True, time_bytes=Pa)


def tsp_mlp_items(items: _Items, mm: ModelSpec, frac: float, what: str, train: TrainSpec, lay: Layout) -> None:
    """TSP's MLP exchange (ring, broadcast or tokens) for an MLP `mm` (a dense layer's, or the
    shared expert's) run by `frac` of the layers."""
    b, B, S, D = mm.dtype_bytes, train.micro_batch_size, train.seq_length, lay.tsp_size
    r = (D - 1) / D
    Pm = mm.mlp_params * b
    s = B * S / D
    exchange = mlp_exchange(train, lay)
    if exchange == "ring":
        # each hop is posted a step ahead: it hides behind one shard's GEMMs (forward
        # 2 s Pm/D) when those take longer. Backward: the D-1 weight hops and the D hops of
        # the travelling gradient share the D shards' backward GEMMs (dgrad + wgrad, and fc1
        # again with recompute); the last gradient hop has only the last dx GEMM beside it,
        # so the share is spread evenly over the 2D - 1 hops.
        fc1 = (2 if mm.swiglu else 1) * mm.f * mm.hidden_size / D  # fc1 elements of one shard
        shard_fwd = 2 * s * mm.mlp_params / D
        saves = in_layer_mode(lay, train) == "save" and not train.mlp_chunk_tokens
        bwd = D * (2 * shard_fwd + (0 if saves else 2 * s * fc1))
        items.add(f"{what} weight ring", "fwd", "send_recv", (D - 1) * Pm / D, D, 1, True, frac=frac,
                  overlap_flops=(D - 1) * shard_fwd)
        items.add(f"{what} weight ring", "bwd", "send_recv", (D - 1) * Pm / D, D, 1, True, frac=frac,
                  overlap_flops=bwd * (D - 1) / (2 * D - 1))
        items.add(f"{what} grad ring (D hops)", "bwd", "send_recv", Pm, D, 1, True, frac=frac,
                  overlap_flops=bwd * D / (2 * D - 1))
    elif exchange == "broadcast":  # attention's exchange: prefetched broadcasts, asynchronous reduces
        for phase in ("fwd", "bwd"):
            items.add(f"{what} weight broadcast", phase, "broadcast", r * Pm, D, 1, True, time_bytes=Pm, frac=frac)
        items.add(f"{what} weight-grad reduce", "bwd", "reduce", r * Pm, D, 1, True, time_bytes=Pm, frac=frac)
    elif exchange == "tokens":
        # Megatron's sequence-parallel MLP on the TSP group, synchronous like TP+SP's:
        # forward gathers its input and reduce-scatters its output; backward re-gathers the
        # input (wgrad), gathers the output gradient and reduce-scatters the input gradient
        X = r * B * S * mm.hidden_size * b
        items.add(f"{what} input all-gather (tokens)", "fwd", "all_gather", X, D, 1, False, frac=frac)
        items.add(f"{what} output reduce-scatter (tokens)", "fwd", "reduce_scatter", X, D, 1, False, frac=frac)
        items.add(f"{what} all-gather (input for wgrad; output grad) (tokens)", "bwd", "all_gather", 2 * X, D, 1,
                  False, frac=frac)
        items.add(f"{what} input-grad reduce-scatter (tokens)", "bwd", "reduce_scatter", X, D, 1, False, frac=frac)


def tp_sp_items(items: _Items, m: ModelSpec, train: TrainSpec, lay: Layout) -> None:
    """TP + SP (also inside each CP rank of TP x CP): the sequence all-gathers and
    reduce-scatters around attention and the MLP."""
    T = lay.tp
    X = (T - 1) / T * train.micro_batch_size * train.seq_length / lay.cp * m.hidden_size * m.dtype_bytes
    # attention's gathers, and the MLP's where the layer has one (an MoE layer without a shared
    # expert gathers nothing around its MLP: ETP = 1, the router and dispatcher see local tokens)
    n = 1 + sum(frac for _, frac in layout_mlps(m))
    items.add("sequence all-gather (qkv, fc1 inputs)", "fwd", "all_gather", n * X, T, 1, False)
    items.add("sequence reduce-scatter (proj, fc2 outputs)", "fwd", "reduce_scatter", n * X, T, 1, False)
    items.add("all-gather (inputs for wgrad; output grads)", "bwd", "all_gather", 2 * n * X, T, 1, False)
    items.add("reduce-scatter (input grads)", "bwd", "reduce_scatter", n * X, T, 1, False)


def tp_items(items: _Items, m: ModelSpec, train: TrainSpec, lay: Layout) -> None:
    """TP without sequence parallelism: the activations' all-reduces."""
    T = lay.tp
    X = 2 * (T - 1) / T * train.micro_batch_size * train.seq_length * m.hidden_size * m.dtype_bytes
    items.add("all-reduce (proj, fc2 outputs)", "fwd", "all_reduce", 2 * X, T, 1, False)
    items.add("all-reduce (qkv, fc1 input grads)", "bwd", "all_reduce", 2 * X, T, 1, False)


def cp_items(items: _Items, m: ModelSpec, train: TrainSpec, lay: Layout) -> None:
    """The CP baselines' K/V: all-gathered (and re-gathered, dK/dV reduce-scattered) or, with
    parallel.cp_comm_type = p2p, around the CP ring."""
    C, T, b, B, S = lay.cp, lay.weight_shards, m.dtype_bytes, train.micro_batch_size, train.seq_length
    if cp_ring(train, lay):
        # the ring (cp_comm_type p2p): C-1 K/V hops of [B S / C, 2 kv / T] per direction (the
        # all-gather's bytes) and C dK/dV hops (the reduce-scatter's and the hop home), each posted
        # before the step it could hide behind. That overlap is not measured on the GPU yet: every
        # hop is modelled exposed, as the all-gather's synchronous collectives, so the planner
        # picks p2p only to fit
        u = B * S / C * 2 * m.kv_dim / T * b
        items.add("CP K/V ring", "fwd", "send_recv", (C - 1) * u, C, T, False)
        items.add("CP K/V ring (again in backward)", "bwd", "send_recv", (C - 1) * u, C, T, False)
        items.add("CP dK/dV ring (C hops)", "bwd", "send_recv", C * u, C, T, False)
    else:
        KV = (C - 1) / C * B * S * 2 * m.kv_dim / T * b
        items.add("CP K/V all-gather", "fwd", "all_gather", KV, C, T, False)
        items.add("CP K/V re-gather", "bwd", "all_gather", KV, C, T, False)
        items.add("CP dK/dV reduce-scatter", "bwd", "reduce_scatter", KV, C, T, False)


def fsdp_items(items: _Items, m: ModelSpec, lay: Layout) -> None:
    """FSDP over CP: each layer's weights gathered (again in backward), its fp32 gradients
    reduce-scattered, overlapped with compute."""
    C = lay.cp
    W = (C - 1) / C * m.layer_matmul_params
    items.add("FSDP weight all-gather", "fwd", "all_gather", W * m.dtype_bytes, C, 1, True)
    items.add("FSDP weight re-gather", "bwd", "all_gather", W * m.dtype_bytes, C, 1, True)
    items.add("FSDP grad reduce-scatter (fp32)", "bwd", "reduce_scatter", W * FP32, C, 1, True)


def moe_items(items: _Items, m: ModelSpec, train: TrainSpec, lay: Layout) -> None:
    """The alltoall dispatcher: each GPU sends the k copies of its s tokens to the experts' GPUs
    (forward dispatch and combine, backward their adjoints), synchronous. Balanced routing: 1/EP
    of the copies stay, the rest go to each other GPU of the EP group alike; the EP group is EP
    consecutive ranks (TSP, TP and CP fastest), so min(EP, G) - 1 of its peers share this GPU's
    node and the other EP - min(EP, G) are reached over the inter-node link. The routing
    probabilities travel with the tokens (forward) and their gradients back."""
    EP, G, b, k = train.expert_size, items.cluster.gpus_per_node, m.dtype_bytes, m.moe_router_topk
    s_moe = train.micro_batch_size * train.seq_length / lay.token_shards
    tokens, probs = s_moe * k * m.hidden_size * b, s_moe * k * b
    moe_frac = m.moe_layers / m.num_layers
    for link, peers in (("intra", min(EP, G) - 1), ("inter", EP - min(EP, G))):
        if peers:
            for phase, what in (("fwd", "dispatch"), ("fwd", "combine"), ("bwd", "combine gradient"),
                                ("bwd", "dispatch gradient")):
                items.add(f"MoE all-to-all {what} ({link}-node peers)", phase, "all_to_all", tokens * peers / EP, EP,
                          1, False, frac=moe_frac, link=link)
            for phase in ("fwd", "bwd"):
                items.add(f"MoE all-to-all routing probabilities ({link}-node peers)", phase, "all_to_all",
                          probs * peers / EP, EP, 1, False, frac=moe_frac, link=link)


def layer_recompute_items(items: _Items, m: ModelSpec, train: TrainSpec) -> None:
    """Megatron's layer recompute runs the forward of each recomputed layer again in backward,
    with its communication (TSP's K/V gathers and weight exchange; TP+SP's gathers; CP's K/V):
    the forward's per-layer items again, for the recomputed share of the layers."""
    rc = layer_recompute(m, train)
    if rc.recomputed:
        frac = rc.recomputed / m.num_layers  # per-layer items are per layer on average
        for i in [i for i in items if i.per_layer and i.phase == "fwd"]:
            items.append(CommItem(i.name + " (forward re-run by layer recompute)", "bwd", i.collective,
                                  i.volume * frac, i.time_bytes * frac, i.group, i.link, i.overlapped, True,
                                  None if i.overlap_flops is None else i.overlap_flops * frac))


def local_head_items(items: _Items, m: ModelSpec, lay: Layout) -> None:
    """The local head's vocab shards travel like attention's weight shards: D broadcasts in
    forward, again in backward, the gradients reduced onto their owners."""
    D, Pv = lay.tsp_size, m.vocab_size * m.hidden_size * m.dtype_bytes
    for phase in ("fwd", "bwd"):
        items.add("LM-head vocab shard broadcast", phase, "broadcast", (D - 1) / D * Pv, D, 1, True, time_bytes=Pv,
                  per_layer=False, per_micro=True)
    items.add("LM-head vocab-grad reduce", "bwd", "reduce", (D - 1) / D * Pv, D, 1, True, time_bytes=Pv,
              per_layer=False, per_micro=True)


def offload_items(items: _Items, m: ModelSpec, train: TrainSpec, lay: Layout) -> None:
    """parallel.offload_activations: every checkpointed input goes to host in forward and comes
    back in backward, on copy engines beside the compute (hidden by it where the compute is longer)."""
    inputs = layer_recompute(m, train).inputs
    if train.offload_activations and inputs:
        x = inputs * m.dtype_bytes * m.hidden_size * train.micro_batch_size * train.seq_length / lay.token_shards
        for phase, what in (("fwd", "device to host"), ("bwd", "host to device")):
            items.append(CommItem(f"activation offload ({what})", phase, "host_copy", x, x, 1, "host", True,
                                  per_layer=False, per_micro=True))


def dp_sync_items(items: _Items, m: ModelSpec, train: TrainSpec, lay: Layout) -> None:
    """The data-parallel gradient sync, once per step, over DP x CP (not FSDP: its gradients are
    reduced per layer), and the experts' over expert-DP (GPUs / EP ranks, stride EP)."""
    b, world = m.dtype_bytes, items.cluster.world
    dp = world // lay.size
    n = dp * (lay.cp if not lay.mesh.fsdp else 1)
    counts = param_counts(m, lay, train.expert_size)
    P = counts["total"] - counts["experts"]
    g = FP32 if train.grad_reduce_in_fp32 else b
    stride = lay.weight_shards if not lay.mesh.fsdp else lay.cp
    if lay.mesh.fsdp:
        stride, n = lay.size, dp
    _sync(items, "DP", P, n, stride, g, b, train.distributed_optimizer)
    if counts["experts"]:
        _sync(items, "expert-DP", counts["experts"], world // train.expert_size, train.expert_size, g, b,
              train.distributed_optimizer)


def _sync(items: _Items, name: str, params: float, n: int, stride: int, grad_bytes: float, param_bytes: float,
          distributed_optimizer: bool) -> None:
    """One step's sync of `params` over `n` ranks: the distributed optimizer's gradient
    reduce-scatter and parameter all-gather, else a gradient all-reduce."""
    share = (n - 1) / n * params
    if distributed_optimizer:
        items.add(f"{name} grad reduce-scatter", "step", "reduce_scatter", share * grad_bytes, n, stride, False,
                  per_layer=False)
        items.add(f"{name} param all-gather", "step", "all_gather", share * param_bytes, n, stride, False,
                  per_layer=False)
    else:
        items.add(f"{name} grad all-reduce", "step", "all_reduce", 2 * (n - 1) / n * params * grad_bytes, n, stride,
                  False, per_layer=False)


def volume_per_layer(items: List[CommItem], phase: str) -> float:
    return sum(i.volume for i in items if i.per_layer and i.phase == phase)
