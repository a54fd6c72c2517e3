"""Memory, communication and time of one training step, per GPU, for each layout.

Symbols (docs/planner.md): L layers, h hidden, a heads, g KV groups, d = h/a head dim,
q = a*d, kv = g*d, f MLP width, V vocab, b bytes per parameter/activation element (bf16: 2),
B micro-batch, S sequence length, D the TSP size, T the TP size, C the CP size.

Every activation term below is a tensor the code keeps for backward, found by listing the
saved tensors of one layer (torch.autograd.graph.saved_tensors_hooks on the real modules,
`benchmarks/saved_tensors.py`), not from a textbook formula. Adjust the lists here when the
code changes (e.g. TSP's "save activations" mode: `TSP_SAVED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..config import resolve_mlp_exchange
from .model import Cluster, Layout, ModelSpec, TrainSpec

GIB = 2.0**30
FP32 = 4

# -- what is saved for backward, bytes per token of one layer ----------------------------------

def norm_saved(m: ModelSpec, impl: str = "torch") -> float:
    """torch.nn.RMSNorm/LayerNorm without Transformer Engine is torch's composite op: it keeps
    two float32 copies of its input width (the upcast input and the normalized value) and a
    float32 rstd per token. A fused kernel (TE / apex) keeps its input and rstd. The norm's
    output is saved by the next op (counted there)."""
    if impl == "fused":
        return m.dtype_bytes * m.hidden + FP32
    return 2 * FP32 * m.hidden + FP32


def rope_saved(m: ModelSpec) -> float:
    """TSP indexes the RoPE table per layer (float32 [s, d]); Megatron's RoPE keeps cos/sin
    in the activation dtype for q and k (4 x [s, d])."""
    return FP32 * m.head_dim


def mlp_exchange(train: TrainSpec, lay: Layout) -> Optional[str]:
    """The MLP exchange a TSP layout runs (None for the other layouts): `auto` resolves as
    megatron_tsp.mlp.TSPRingMLP.exchange does, by the tokens a rank holds (B S / D)."""
    if lay.kind != "tsp":
        return None
    return resolve_mlp_exchange(train.mlp_exchange, train.micro_batch * train.seq_len // lay.tsp, lay.tsp)


def mlp_intermediates(m: ModelSpec) -> int:
    """Elements per token Megatron's MLP (local spec, bias_activation_fusion=False as
    megatron_tsp.training builds it) saves past its input: gated: the fc1 output 2f (the
    activation keeps a view of it), act(gate) f, up + offset f, their product f (fc2's input);
    GELU: the fc1 output and the activation output."""
    return (5 if m.gated else 2) * m.f


def tsp_saved_per_token(m: ModelSpec, save_activations: bool, norm: str = "torch",
                        exchange: str = "ring") -> Dict[str, float]:
    """TSP, per local token of one layer. Block recompute: the two norms, the inputs of the
    attention and MLP functions (x_p) and the RoPE slice; nothing per shard. "Save activations"
    mode adds, summed over the D shards: q, the local k/v, the attention output and its
    log-sum-exp, and the MLP fc1 output. With the `tokens` exchange the MLP is Megatron's
    sequence-parallel MLP, which saves its intermediates over all S tokens at width f/D in
    either mode (it does not follow TSP's recompute): D x that over S/D local tokens."""
    b = m.dtype_bytes
    items = {
        "norms": 2 * norm_saved(m, norm),
        "block inputs x_p (attention, MLP)": 2 * b * m.hidden,
        "RoPE table slice": rope_saved(m),
    }
    if save_activations:
        items.update({
            "q (all shards)": b * m.q_dim,
            "local k, v (all shards)": b * 2 * m.kv_dim,
            "attention output o (all shards)": b * m.q_dim,
            "softmax log-sum-exp": FP32 * m.heads,
        })
        if exchange != "tokens":
            items["MLP fc1 output (all shards)"] = b * (2 if m.gated else 1) * m.f
    if exchange == "tokens":
        items["MLP intermediates (tokens exchange, S tokens x f/D)"] = b * mlp_intermediates(m)
    return items


def native_saved(m: ModelSpec, lay: Layout, norm: str = "torch") -> Dict[str, tuple]:
    """Megatron's local-spec layer (SDPA core attention), per token: {item: (bytes, region)}
    with region 'norm' (tokens of the norm/residual region) or 'core' (tokens of the attention
    / MLP region, widths already divided by T)."""
    b, T = m.dtype_bytes, lay.weight_shards
    mlp = mlp_intermediates(m)
    return {
        "norms": (2 * norm_saved(m, norm), "norm"),
        "inputs of linear_qkv and linear_fc1": (2 * b * m.hidden, "norm"),
        "mixed qkv (v is a view of it)": (b * (m.q_dim + 2 * m.kv_dim) / T, "core"),
        "q, k after RoPE": (b * (m.q_dim + m.kv_dim) / T, "core"),
        "attention output (linear_proj input)": (b * m.q_dim / T, "core"),
        "softmax log-sum-exp": (FP32 * m.heads / T, "core"),
        "RoPE cos/sin of q and k": (4 * b * m.head_dim, "core"),
        "MLP intermediates": (b * mlp / T, "core"),
    }


# -- results ----------------------------------------------------------------------------------

@dataclass
class Memory:
    params: float
    grads: float
    optimizer: float
    activations: float
    comm_buffers: float
    logits: float
    other_transient: float
    optimizer_step_transient: float
    peak: float
    peak_point: str
    detail: Dict[str, float] = field(default_factory=dict)

    def as_gib(self) -> dict:
        out = {k: getattr(self, k) / GIB for k in ("params", "grads", "optimizer", "activations", "comm_buffers",
                                                    "logits", "other_transient", "optimizer_step_transient", "peak")}
        out["peak_point"] = self.peak_point
        return out


@dataclass
class CommItem:
    name: str
    phase: str  # fwd, bwd, step
    collective: str  # all_gather, reduce_scatter, all_reduce, broadcast, reduce, send_recv
    volume: float  # bytes each rank receives (per layer for fwd/bwd, per step for step)
    time_bytes: float  # bytes / bus bandwidth = seconds (NCCL bus-bandwidth convention)
    group: int
    link: str  # intra or inter
    overlapped: bool  # overlapped with compute as the code runs today
    per_layer: bool = True
    # matmul FLOPs (per layer, like volume) that run beside it: at most their time hides it;
    # None: any compute of the step may
    overlap_flops: Optional[float] = None


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


# -- memory -------------------------------------------------------------------------------------

def param_counts(m: ModelSpec, lay: Layout) -> Dict[str, float]:
    """Parameters held per GPU (elements): matmul weights split by the weight shards (TSP or
    TP; FSDP-over-CP: C), norms replicated, embeddings vocab-parallel over the weight shards."""
    w = lay.weight_shards
    shard = lay.cp if lay.kind == "fsdp_cp" else 1
    heads = 1 if m.tied_embeddings else 2
    layers = m.layers * (m.layer_matmul_params / w + m.layer_norm_params)
    embed = heads * m.embedding_params / w + m.hidden
    return {"layers": layers / shard, "embeddings": embed / shard, "total": (layers + embed) / shard}


def recompute_mode(lay: Layout, train: TrainSpec) -> str:
    """'block' (TSP today: each block recomputed from its input), 'save' (TSP saves per-shard
    activations), 'none' (Megatron, no recompute), 'full' (Megatron full-layer recompute)."""
    if lay.kind == "tsp":
        return "save" if train.recompute == "none" else "block"
    return "full" if train.recompute == "full" else "none"


def memory(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster) -> Memory:
    b, B, S, L = m.dtype_bytes, train.micro_batch, train.seq_len, m.layers
    w, C = lay.weight_shards, lay.cp
    dp = cluster.world // lay.size
    P = param_counts(m, lay)["total"]
    params = P * b
    grads = P * (FP32 if train.grad_reduce_in_fp32 else b)
    master = FP32 if b < FP32 else 0  # fp32 main params of a bf16 model
    opt_shard = (dp * C) if train.distributed_optimizer and lay.kind != "fsdp_cp" else 1
    optimizer = P * (master + 2 * FP32) / opt_shard
    # torch Adam (foreach) allocates sqrt(exp_avg_sq) for every parameter it steps
    opt_step_transient = P * FP32 / opt_shard

    mode = recompute_mode(lay, train)
    exchange = mlp_exchange(train, lay)
    detail: Dict[str, float] = {}
    tokens_norm = B * S / lay.token_shards  # norm / residual region, per GPU
    tokens_core = B * S / C  # attention / MLP region of the TP family (widths / T)
    if lay.kind == "tsp":
        per_tok = tsp_saved_per_token(m, save_activations=(mode == "save"), norm=train.norm, exchange=exchange)
        for k, v in per_tok.items():
            detail[k] = v * tokens_norm * L
        layer_act = sum(per_tok.values()) * tokens_norm
    else:
        items = native_saved(m, lay, train.norm)
        layer_act = 0.0
        for k, (v, region) in items.items():
            n = tokens_norm if region == "norm" else tokens_core
            detail[k] = v * n * L
            layer_act += v * n
        if mode == "full":  # Megatron full recompute keeps each layer's input only
            detail = {"layer inputs (full recompute)": b * m.hidden * tokens_norm * L,
                      "one layer recomputed in backward": layer_act}
    activations = sum(detail.values())
    # final norm + the output layer's (local) input
    final = (norm_saved(m, train.norm) + b * m.hidden) * tokens_norm
    detail["final norm and LM-head input"] = final
    activations += final

    # logits: the LM head all-gathers the sequence of its TP/TSP group (sequence parallel), so
    # every GPU of the group holds [B*S/C, V/w]; the cross entropy keeps the float32 softmax
    # (saved) and the activation-dtype logits exist while it runs (transient).
    logit_tokens = B * S / C
    logits_fp32 = FP32 * logit_tokens * m.vocab / w
    logits_low = b * logit_tokens * m.vocab / w
    # Megatron's persistent all-gather buffer (sequence-parallel linears, the LM head)
    mpu_buffer = b * logit_tokens * m.hidden if lay.sequence_parallel else 0.0

    # what is in flight while one layer runs its backward
    s = tokens_norm
    point = "layer backward"
    if lay.kind == "tsp":
        # the attention and the MLP backward run one after the other: the larger of the two
        (comm, scratch), point = max((tsp_attention_in_flight(m, train, lay), "layer backward (attention)"),
                                     (tsp_mlp_in_flight(m, train, lay), "layer backward (MLP)"),
                                     key=lambda x: sum(x[0]))
    elif lay.kind == "fsdp_cp":
        comm = 2 * m.layer_matmul_params * b + m.layer_matmul_params * FP32  # 2 gathered layers + grads
        scratch = 2 * tokens_core * 2 * m.f / w * b + 2 * s * m.hidden * b
    else:
        comm = 2 * B * S / C * 2 * m.kv_dim / w * b if C > 1 else 0.0  # gathered K/V + grad
        scratch = 2 * tokens_core * 2 * m.f / w * b + 2 * s * m.hidden * b
        if mode == "full":
            scratch += layer_act
    comm += mpu_buffer
    loss_point = logits_fp32 + logits_low + mpu_buffer
    layer_point = comm + scratch
    static = params + grads + optimizer
    fwd_bwd_peak = static + activations + max(loss_point, layer_point)
    step_peak = static + opt_step_transient + mpu_buffer
    if fwd_bwd_peak >= step_peak:
        peak, point = fwd_bwd_peak, ("loss (start of backward)" if loss_point >= layer_point else point)
    else:
        peak, point = step_peak, "optimizer step"
    return Memory(
        params=params, grads=grads, optimizer=optimizer, activations=activations,
        comm_buffers=comm, logits=logits_fp32 + logits_low, other_transient=scratch,
        optimizer_step_transient=opt_step_transient, peak=peak, peak_point=point, detail=detail,
    )


def tsp_attention_in_flight(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple:
    """(buffers, scratch) in bytes while TSPAttentionFunction.backward runs shard j, with one
    shard of lag: shard j-1's finish (the adjoint of its projection, its weight gradient) waits
    for its dK/dV reduce-scatter, which stays in flight until shard j's is posted. The forward
    holds fewer (no gradients; two gathered K/V at a time) and is not modelled."""
    b, B, S, D = m.dtype_bytes, train.micro_batch, train.seq_len, lay.tsp
    s = B * S / D
    save = recompute_mode(lay, train) == "save"
    shard = m.attn_params / D * b
    kv = B * S * 2 * m.kv_dim / D * b  # one head group's K and V over the whole sequence
    # weight shards: j-1 (finish pending), j (in use), j+1 (broadcast posted), and from D = 4 on
    # a rank whose own packed shard is none of the three; gradients: j's, j-1's (not yet
    # reduced), two reductions in flight, and from D = 5 on the owner's finished one
    shards = min(D, 3) + (1 if D > 3 else 0)
    grads = min(D, 4) + (1 if D > 4 else 0)
    # K/V: j's gathered K/V (natural order) and its dK/dV, j-1's dK/dV in its reduce-scatter,
    # and j+1's gather prefetched (save mode; with recompute the gather is synchronous)
    kv_buffers = 4 if save else 3
    comm = (shards + grads) * shard + kv_buffers * kv
    # dx, the incoming gradient, do and two shards' dq, d(mixed qkv); recompute adds j's q, k/v, o
    scratch = s * b * (2 * m.hidden + 3 * m.q_dim / D + (m.q_dim + 2 * m.kv_dim) / D)
    if not save:
        scratch += s * b * (2 * m.q_dim + 2 * m.kv_dim) / D
    return comm, scratch


def tsp_mlp_in_flight(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple:
    """(buffers, scratch) in bytes while TSP's MLP backward runs one shard, for the exchange it
    runs (megatron_tsp/mlp.py)."""
    b, B, S, D = m.dtype_bytes, train.micro_batch, train.seq_len, lay.tsp
    s = B * S / D
    exchange = mlp_exchange(train, lay)
    if exchange == "tokens":
        # Megatron's MLP: no weight buffers (the input re-gather uses the persistent mpu
        # buffer, counted by the caller); the gradients of its intermediates, as TP+SP's
        return 0.0, 2 * B * S * 2 * m.f / D * b + 2 * s * m.hidden * b
    shard = m.mlp_params / D * b
    if exchange == "ring":
        # the packed own shard, the one in use, the next hop's; the shard's gradient, the
        # previous one's in its hop and the receive buffer of that hop
        comm = (min(D, 3) + (3 if D > 1 else 1)) * shard
    else:  # broadcast: own, in use, next; the gradient, up to two reductions (+ the owner's)
        comm = (min(D, 2) + (1 if D > 2 else 0) + min(D, 3) + (1 if D > 3 else 0)) * shard
    # the activation's intermediates rebuilt for its backward, dx and the incoming gradient;
    # recompute adds the shard's fc1 output
    scratch = s * b * ((3 if m.gated else 1) * m.f / D + 2 * m.hidden)
    if recompute_mode(lay, train) != "save":
        scratch += s * b * (2 if m.gated else 1) * m.f / D
    return comm, scratch


# -- communication ---------------------------------------------------------------------------

def _link(group: int, stride: int, cluster: Cluster) -> str:
    return "intra" if group * stride <= cluster.gpus_per_node else "inter"


def comm_items(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster) -> List[CommItem]:
    """Per-layer (and per-step) traffic of one GPU. `volume`: bytes it receives; `time_bytes`:
    bytes over the collective's NCCL bus bandwidth gives its time."""
    b, B, S = m.dtype_bytes, train.micro_batch, train.seq_len
    mode = recompute_mode(lay, train)
    out: List[CommItem] = []

    def add(name, phase, coll, volume, group, stride, overlapped, time_bytes=None, per_layer=True,
            overlap_flops=None):
        if group > 1 and volume > 0:
            out.append(CommItem(name, phase, coll, volume, volume if time_bytes is None else time_bytes,
                                group, _link(group, stride, cluster), overlapped, per_layer, overlap_flops))

    if lay.kind == "tsp":
        D = lay.tsp
        r = (D - 1) / D
        Pa, Pm, KV = m.attn_params * b, m.mlp_params * b, B * S * 2 * m.kv_dim * b
        exchange = mlp_exchange(train, lay)
        # K/V: one shard of lag both ways (attention.py): shard j's all-gather is in flight while
        # j-1 attends, j's dK/dV reduce-scatter while j-1 finishes. Modelled simply: one shard's
        # transfer per layer and direction waits with nothing beside it (the forward's last
        # gather, the backward's first re-gather and last reduce-scatter), the other D-1 overlap.
        # With recompute the backward re-gathers synchronously (no prefetch).
        prefetched = mode == "save"
        for phase in ("fwd", "bwd"):
            # D broadcasts of Pa/D: each rank receives (D-1)/D Pa; NCCL time = D x (Pa/D) / busbw
            add("attention weight broadcast", phase, "broadcast", r * Pa, D, 1, True, time_bytes=Pa)
            if phase == "fwd" or prefetched:
                add("K/V all-gather (D-1 shards, overlapped)", phase, "all_gather", r * KV * (D - 1) / D, D, 1, True)
                add("K/V all-gather (one shard, exposed)", phase, "all_gather", r * KV / D, D, 1, False)
            else:
                add("K/V all-gather (synchronous with recompute)", phase, "all_gather", r * KV, D, 1, False)
        add("dK/dV reduce-scatter (D-1 shards, overlapped)", "bwd", "reduce_scatter", r * KV * (D - 1) / D, D, 1, True)
        add("dK/dV reduce-scatter (last shard, exposed)", "bwd", "reduce_scatter", r * KV / D, D, 1, False)
        add("attention weight-grad reduce", "bwd", "reduce", r * Pa, D, 1, True, time_bytes=Pa)
        s = B * S / D
        fc1 = (2 if m.gated else 1) * m.f * m.hidden / D  # fc1 elements of one shard
        if exchange == "ring":
            # each hop is posted a step ahead: it hides behind one shard's GEMMs (forward
            # 2 s Pm/D) when those take longer. Backward: the D-1 weight hops and the D hops of
            # the travelling gradient share the D shards' backward GEMMs (dgrad + wgrad, and fc1
            # again with recompute); the last gradient hop has only the last dx GEMM beside it,
            # so the share is spread evenly over the 2D - 1 hops.
            shard_fwd = 2 * s * m.mlp_params / D
            bwd = D * (2 * shard_fwd + (0 if mode == "save" else 2 * s * fc1))
            add("MLP weight ring", "fwd", "send_recv", (D - 1) * Pm / D, D, 1, True,
                overlap_flops=(D - 1) * shard_fwd)
            add("MLP weight ring", "bwd", "send_recv", (D - 1) * Pm / D, D, 1, True,
                overlap_flops=bwd * (D - 1) / (2 * D - 1))
            add("MLP grad ring (D hops)", "bwd", "send_recv", Pm, D, 1, True, overlap_flops=bwd * D / (2 * D - 1))
        elif exchange == "broadcast":  # attention's exchange: prefetched broadcasts, asynchronous reduces
            for phase in ("fwd", "bwd"):
                add("MLP weight broadcast", phase, "broadcast", r * Pm, D, 1, True, time_bytes=Pm)
            add("MLP weight-grad reduce", "bwd", "reduce", r * Pm, D, 1, True, time_bytes=Pm)
        elif exchange == "tokens":
            # Megatron's sequence-parallel MLP on the TSP group, synchronous like TP+SP's:
            # forward gathers its input and reduce-scatters its output; backward re-gathers the
            # input (wgrad), gathers the output gradient and reduce-scatters the input gradient
            X = r * B * S * m.hidden * b
            add("MLP input all-gather (tokens)", "fwd", "all_gather", X, D, 1, False)
            add("MLP output reduce-scatter (tokens)", "fwd", "reduce_scatter", X, D, 1, False)
            add("MLP all-gather (input for wgrad; output grad) (tokens)", "bwd", "all_gather", 2 * X, D, 1, False)
            add("MLP input-grad reduce-scatter (tokens)", "bwd", "reduce_scatter", X, D, 1, False)
    if lay.kind in ("tp_sp", "tp_cp") and lay.tp > 1:
        T = lay.tp
        X = (T - 1) / T * B * S / lay.cp * m.hidden * b
        n_fwd = 4 * (2 if mode == "full" else 1)
        add("sequence all-gather (qkv, fc1 inputs)", "fwd", "all_gather", n_fwd / 2 * X, T, 1, False)
        add("sequence reduce-scatter (proj, fc2 outputs)", "fwd", "reduce_scatter", n_fwd / 2 * X, T, 1, False)
        add("all-gather (inputs for wgrad; output grads)", "bwd", "all_gather", 4 * X, T, 1, False)
        add("reduce-scatter (input grads)", "bwd", "reduce_scatter", 2 * X, T, 1, False)
    if lay.kind == "tp" and lay.tp > 1:
        T = lay.tp
        X = 2 * (T - 1) / T * B * S * m.hidden * b
        add("all-reduce (proj, fc2 outputs)", "fwd", "all_reduce", 2 * X * (2 if mode == "full" else 1), T, 1, False)
        add("all-reduce (qkv, fc1 input grads)", "bwd", "all_reduce", 2 * X, T, 1, False)
    if lay.cp > 1:
        C, T = lay.cp, lay.weight_shards
        KV = (C - 1) / C * B * S * 2 * m.kv_dim / T * b
        add("CP K/V all-gather", "fwd", "all_gather", KV * (2 if mode == "full" else 1), C, T, False)
        add("CP K/V re-gather", "bwd", "all_gather", KV, C, T, False)
        add("CP dK/dV reduce-scatter", "bwd", "reduce_scatter", KV, C, T, False)
    if lay.kind == "fsdp_cp":
        C = lay.cp
        W = (C - 1) / C * m.layer_matmul_params
        add("FSDP weight all-gather", "fwd", "all_gather", W * b, C, 1, True)
        add("FSDP weight re-gather", "bwd", "all_gather", W * b, C, 1, True)
        add("FSDP grad reduce-scatter (fp32)", "bwd", "reduce_scatter", W * FP32, C, 1, True)
    # data-parallel gradient sync, once per step, over DP x CP (not FSDP: its grads are reduced above)
    dp = cluster.world // lay.size
    n = dp * (lay.cp if lay.kind != "fsdp_cp" else 1)
    P = param_counts(m, lay)["total"]
    g = FP32 if train.grad_reduce_in_fp32 else b
    stride = lay.weight_shards if lay.kind != "fsdp_cp" else lay.cp
    if lay.kind == "fsdp_cp":
        stride, n = lay.size, dp
    if train.distributed_optimizer:
        add("DP grad reduce-scatter", "step", "reduce_scatter", (n - 1) / n * P * g, n, stride, False, per_layer=False)
        add("DP param all-gather", "step", "all_gather", (n - 1) / n * P * b, n, stride, False, per_layer=False)
    else:
        add("DP grad all-reduce", "step", "all_reduce", 2 * (n - 1) / n * P * g, n, stride, False, per_layer=False)
    return out


def volume_per_layer(items: List[CommItem], phase: str) -> float:
    return sum(i.volume for i in items if i.per_layer and i.phase == phase)


# -- compute -----------------------------------------------------------------------------------

def flops(m: ModelSpec, train: TrainSpec, lay: Layout) -> Dict[str, float]:
    """FLOPs per GPU per micro-batch. Causal attention counts the unmasked half:
    forward 2 x B S^2 q (QK^T and PV), backward 2.5 x forward (flash: 5 GEMMs vs 2)."""
    B, S, L = train.micro_batch, train.seq_len, m.layers
    mode = recompute_mode(lay, train)
    n = lay.size  # every layout divides the work evenly over its GPUs
    fwd_mm = 2 * B * S * m.layer_matmul_params * L / n
    fwd_attn = 2 * B * S * S * m.q_dim * L / n
    extra = 1.0 if mode in ("block", "full") else 0.0
    # the tokens MLP is Megatron's: TSP's recompute does not rerun it
    extra_mm = extra * (m.attn_params / m.layer_matmul_params if mlp_exchange(train, lay) == "tokens" else 1.0)
    head = 2 * B * S * m.hidden * m.vocab / n * 3
    return {
        "matmul": fwd_mm * (3 + extra_mm) + head,
        "attention": fwd_attn * (1 + extra) + 2.5 * fwd_attn,
        "model_flops": 3 * fwd_mm + 3.5 * fwd_attn + head,  # without recompute (for MFU)
    }


def elementwise_bytes(m: ModelSpec, train: TrainSpec, lay: Layout) -> Dict[str, float]:
    """HBM traffic of the memory-bound kernels per GPU per micro-batch (bytes), counted per op
    of the code path (docs/planner.md, "time"); the profile's `elementwise_efficiency` turns
    it into seconds."""
    b, B, S, L, h = m.dtype_bytes, train.micro_batch, train.seq_len, m.layers, m.hidden
    mode = recompute_mode(lay, train)
    s = B * S / lay.token_shards
    w = lay.weight_shards
    s_core_width = B * S / lay.cp / w  # tokens x (1/T) of the TP family's core region
    if lay.kind == "tsp":
        s_core_width = s  # each rank runs all D shards on its s tokens
    refwd = 1 if mode in ("block", "full") else 0
    tokens_mlp = mlp_exchange(train, lay) == "tokens"  # Megatron's MLP: no TSP recompute, no per-shard adds
    norm = 108 * h if train.norm == "torch" else 6 * h * b  # composite fp32: fwd 36h + bwd 72h bytes
    rope = 28 * (m.q_dim + m.kv_dim) * b / 2  # per token, one direction
    act = (16 if m.gated else 4) * m.f * b / 2  # fwd
    act_bwd = (26 if m.gated else 6) * m.f * b / 2
    resid = 24 * h * b / 2
    per_layer = 2 * norm * s + resid * s
    per_layer += s_core_width * (rope * (2 + refwd) + act * (1 + (0 if tokens_mlp else refwd)) + act_bwd)
    P_layer = m.layer_matmul_params / w
    per_layer += P_layer * (b + 2 * FP32)  # add the weight grads into the fp32 main grads
    if lay.kind == "tsp":
        D = lay.tsp
        blocks = 1 if tokens_mlp else 2
        per_layer += (2 * D - 1) * blocks * 6 * h * b / 2 * s  # out.add_ / dx.add_ per shard
        per_layer += (2 + refwd) * (2 * 2 * m.kv_dim * b * D + 2 * m.q_dim * b) * s  # zigzag K/V copy, cat
        packed = m.attn_params if tokens_mlp else m.layer_matmul_params
        per_layer += packed / D * b * (2 * 2 + 2)  # pack (fwd, bwd), cat of grads
        if mlp_exchange(train, lay) == "ring":
            per_layer += (D - 1) * 3 * m.mlp_params / D * b  # ring gradient adds
    if mode == "full" and lay.kind != "tsp":
        per_layer += s * 2 * norm / 3  # norms rerun forward
    logits = 60 * B * S / lay.cp * m.vocab / w
    return {"layers": per_layer * L, "logits": logits, "total": per_layer * L + logits}


ADAM_BYTES_PER_PARAM = 80  # foreach AdamW + grad-norm + clip + copy to bf16 (docs/planner.md)
