"""Memory and compute of one training step, per GPU, for each layout (communication:
planner.comm; the step time and the plan: planner.plan).

Symbols (docs/planner.md): L layers, h hidden, a heads, g KV groups, d = h/a head dim,
q = a*d, kv = g*d, f MLP width, V vocab, b bytes per parameter/activation element (bf16: 2),
B micro-batch, S sequence length, D the TSP size, T the TP size, C the CP size; MoE: E experts,
k experts per token, fe expert width, fs shared-expert width, EP expert-parallel size.

Every activation term below is a tensor the code keeps for backward, found by listing the
saved tensors of one layer (torch.autograd.graph.saved_tensors_hooks on the real modules,
`benchmarks/saved_tensors.py`), not from a textbook formula. Adjust the lists here when the
code changes (e.g. TSP's "save activations" mode: `TSP_SAVED`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..config import resolve_mlp_exchange
from .flops import causal_pairs, model_flops, packed_pairs
from .model import Cluster, Layout, ModelSpec, TrainSpec

GIB = 2.0**30
FP32 = 4

# -- what is saved for backward, bytes per token of one layer ----------------------------------

def norm_saved(m: ModelSpec, impl: str = "lean") -> float:
    """`lean` (TSPNorm, issue 14) and `fused` (TE's kernel): the norm keeps its input in the
    model dtype and one fp32 statistic per token (RMSNorm: rstd; LayerNorm: mean and rstd).
    `torch`: torch's composite RMSNorm/LayerNorm (TSPNorm before lean norms) keeps two float32
    copies of its input width (the upcast input and the normalized value) and an fp32 rstd.
    The norm's output is saved by the next op (counted there)."""
    if impl == "torch":
        return 2 * FP32 * m.hidden_size + FP32
    return m.dtype_bytes * m.hidden_size + FP32 * m.norm_stats


def rope_saved(m: ModelSpec) -> float:
    """TSP indexes the RoPE table per layer (float32 [s, d]); Megatron's RoPE keeps cos/sin
    in the activation dtype for q and k (4 x [s, d])."""
    return FP32 * m.head_dim


def mlp_exchange(train: TrainSpec, lay: Layout) -> Optional[str]:
    """The MLP exchange a TSP layout runs (None for the other layouts): `auto` resolves as
    megatron_tsp.tsp.mlp.TSPMLP.exchange does, by the tokens a rank holds (B S / D)."""
    if not lay.record.uses_tsp:
        return None
    local_tokens = train.micro_batch_size * train.seq_length // lay.tsp_size
    return resolve_mlp_exchange(train.tsp_mlp_exchange, local_tokens, lay.tsp_size)


def mlp_intermediates(m: ModelSpec, f: Optional[int] = None) -> int:
    """Elements per token Megatron's MLP (local spec, bias_activation_fusion=False as
    megatron_tsp.training.build builds it) of width f (default the model's) saves past its input:
    gated: the fc1 output 2f (the activation keeps a view of it), act(gate) f, up + offset f,
    their product f (fc2's input); GELU: the fc1 output and the activation output."""
    return (5 if m.swiglu else 2) * (m.f if f is None else f)


def mlp_chunk(train: TrainSpec, tokens: float, batch: int = 1) -> float:
    """Tokens of one chunk of the token-tiled MLP (parallel.mlp_chunk_tokens) on a GPU whose MLP
    input holds `tokens` tokens: all of them untiled (0); else at most the chunk (the baselines'
    Megatron MLP cuts along the sequence: max(1, chunk // B) positions of each of the `batch`
    sequences; TSP's exchanges cut the token rows)."""
    chunk = train.mlp_chunk_tokens
    if not chunk:
        return tokens
    return min(tokens, max(1, chunk // batch) * batch)


# -- mixture of experts: Megatron's MoELayer, alltoall dispatcher, SequentialMLP experts --------

def moe_saved_per_token(m: ModelSpec) -> Dict[str, float]:
    """Bytes an MoE layer's router, dispatcher and routed experts save per token of the MoE
    region (each GPU's own tokens under TSP, TP+SP and CP), listed with saved_tensors_hooks on
    megatron-core 0.19 (tests/planner/test_plan_moe.py checks it on CPU). Balanced routing: the
    k copies of each token this GPU sends come back as k tokens to its own experts. The layer's
    input (the pre-MLP norm output, the router's input) is the block input counted beside it.
    Router (fp32 / int64 whatever the model dtype): the top-k probabilities [k] (pre-softmax:
    the softmax over all E; sigmoid: its output [E], the normalised top-k and two per-token
    sums), the top-k indices (int64 [k]); the load-balancing loss adds the fp32 scores [E] and
    a second index [k]; the z-loss the fp32 logits [E] and their log-sum-exp. Dispatcher: the
    permutation indices (int64: one per copy, and one per (token, expert) pair of the routing
    map). Experts, per routed copy: the permuted token
    (fc1's input, h), its probability and the MLP intermediates at width fe plus the activation
    output the probability multiplies (gated 6 fe, GELU 3 fe). Megatron 0.16.1 keeps the
    routing map [E] as bool and the probabilities [E] in fp32 instead of one int64 index per
    copy: within 2% of this at the test's shape. A gated shared expert (SharedExpertMLP's gate,
    TSP's the same) keeps its output (h) and the sigmoid score (1) for the product's backward."""
    b, k, E = m.dtype_bytes, m.moe_router_topk, m.num_experts
    if m.moe_router_score_function == "sigmoid":
        probs = FP32 * (E + k) + 2 * FP32
    else:
        probs = FP32 * (E if m.moe_router_pre_softmax else k)
    router = probs + 8 * k
    if m.router_aux_loss:
        router += FP32 * E + 8 * k
    if m.router_z_loss:
        router += FP32 * (E + 1)
    gate = {"MoE shared expert gate (output and score)": b * (m.hidden_size + 1)} if m.shared_gate_params else {}
    return {
        **gate,
        "MoE router (probabilities, top-k indices, loss scores)": router,
        "MoE dispatcher permutation indices": 8 * k + 8 * E,
        "MoE permuted tokens (k copies, expert fc1 input)": b * k * m.hidden_size,
        "MoE routed probabilities (k copies)": b * k,
        "MoE expert intermediates (k copies)": b * k * ((6 if m.swiglu else 3) * m.fe),
    }


def shared_expert_model(m: ModelSpec) -> ModelSpec:
    """The model whose (dense) MLP is the shared expert: TSP runs it as its ring MLP, the
    baselines as Megatron's SharedExpertMLP (a TP+SP MLP of width fs)."""
    return dataclasses.replace(m, ffn_hidden_size=m.moe_shared_expert_intermediate_size, num_experts=None)


def layer_counts_saved(m: ModelSpec, train: TrainSpec) -> Tuple[int, int]:
    """(dense, MoE) layers that keep their full activations under the layer recompute: all
    without it, none with uniform, the layers after the first N with block."""
    rc = layer_recompute(m, train)
    pattern = m.moe_pattern
    saved = pattern[m.num_layers - rc.saved:] if rc.saved else []
    return len(saved) - sum(saved), sum(saved)


def moe_in_flight(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple:
    """(buffers, scratch) in bytes while an MoE layer runs its backward (from the code, not
    measured): the combine's and the dispatch's gradient all-to-alls (a send and a receive
    buffer of [s k, h]), the permuted tokens' gradient [s k, h], one expert's intermediate
    gradients (SequentialMLP runs its E / EP experts one after the other: s k EP / E tokens
    each, gated 5 fe, GELU 2 fe) and dx and the incoming gradient [s, h]."""
    b, h, k = m.dtype_bytes, m.hidden_size, m.moe_router_topk
    s = train.micro_batch_size * train.seq_length / lay.token_shards
    ep = train.expert_size
    comm = 2 * s * k * h * b if ep > 1 else 0.0
    one_expert = s * k * ep / m.num_experts
    scratch = s * k * h * b + one_expert * (5 if m.swiglu else 2) * m.fe * b + 2 * s * h * b
    return comm, scratch


def tsp_saved_per_token(m: ModelSpec, save_activations: bool, norm: str = "lean",
                        exchange: str = "ring", moe: bool = False, tiled: bool = False) -> Dict[str, float]:
    """TSP, per local token of one layer. Block recompute: the two norms, the inputs of the
    attention and MLP functions (x_p) and the RoPE slice; nothing per shard. "Save activations"
    mode adds, summed over the D shards: q, the local k/v, the attention output and its
    log-sum-exp, and the MLP fc1 output. With the `tokens` exchange the MLP is Megatron's
    sequence-parallel MLP, which saves its intermediates over all S tokens at width f/D in
    either mode (it does not follow TSP's recompute): D x that over S/D local tokens.
    `moe`: an MoE layer, whose MLP is Megatron's MoELayer on the local tokens
    (moe_saved_per_token, the same in both modes: TSP's recompute does not cover it) and whose
    shared expert is the TSP ring MLP at width fs (its items as the MLP's above). `tiled`
    (parallel.mlp_chunk_tokens > 0): the MLP (every exchange) saves only its input x_p."""
    b = m.dtype_bytes
    items = {
        "norms": 2 * norm_saved(m, norm),
        "attention block input x_p": b * m.hidden_size,
        "MLP block input x_p": b * m.hidden_size,  # the MLP function's: freed by its backward
        "RoPE table slice": rope_saved(m),
    }
    # the TSP MLP of the layer: dense, or the shared expert
    f_mlp = (m.moe_shared_expert_intermediate_size or 0) if moe else m.f
    if save_activations:
        items.update({
            "q (all shards)": b * m.q_dim,
            "local k, v (all shards)": b * 2 * m.kv_dim,
            "attention output o (all shards)": b * m.q_dim,
            "softmax log-sum-exp": FP32 * m.num_attention_heads,
        })
        if exchange != "tokens" and f_mlp and not tiled:
            items["shared expert fc1 output (all shards)" if moe else "MLP fc1 output (all shards)"] = \
                b * (2 if m.swiglu else 1) * f_mlp
    if exchange == "tokens" and f_mlp and not tiled:
        items[("shared expert" if moe else "MLP") + " intermediates (tokens exchange, S tokens x f/D)"] = \
            b * mlp_intermediates(m, f_mlp)
    if moe:
        items.update(moe_saved_per_token(m))
    return items


def native_saved(m: ModelSpec, lay: Layout, norm: str = "lean", selective: bool = False,
                 moe: bool = False, tiled: bool = False, ring: bool = False) -> Dict[str, tuple]:
    """Megatron's local-spec layer (SDPA core attention), per token: {item: (bytes, region)}
    with region 'norm' (tokens of the norm/residual region) or 'core' (tokens of the attention
    / MLP region, widths already divided by T). `selective` (Megatron's core-attention
    recompute): the checkpointed core attention keeps its inputs q, k, v (saved anyway, below)
    and not its log-sum-exp; its output is still saved by linear_proj. `moe`: an MoE layer
    (ETP = 1): router, dispatcher and experts on the tokens of the norm region
    (moe_saved_per_token), the shared expert Megatron's SharedExpertMLP (MLP intermediates at
    width fs / T) instead of the MLP. `tiled` (parallel.mlp_chunk_tokens > 0): the dense MLP
    (megatron_tsp.tsp.tiled_mlp.TiledMLP) saves only its input, linear_fc1's input above; the
    shared expert (Megatron's SharedExpertMLP) is not tiled.
    CP (lay.cp > 1, megatron_tsp.baselines.context_parallel, without selective recompute): v is
    consumed by the cat [k | v] the K/V all-gather sends, so no view keeps the mixed qkv, nor is
    k after RoPE saved; the attention keeps q after RoPE, the local [k | v] (re-gathered in
    backward), each local chunk's output o (the kernel's) and their concatenation (linear_proj's
    input): (3 q + 2 kv) / T per token, not the (3 q + 3 kv) / T of the SDPA path. Evidence
    (issue 25 follow-up, benchmarks/fake_rank_memory.py, CP 4 and TP 2 x CP 2, S 4K and 8K, h 512):
    the planner was over by exactly [S / C, kv / T] at both lengths; the H100 rows at 256K (CP 4,
    TP+SP 2 x CP 2) by 0.5 GiB = the same tensor. `ring` (parallel.cp_comm_type = p2p): the ring's
    output o is linear_proj's input (one tensor, no per-chunk outputs): (2 q + 2 kv) / T; the fp32
    log-sum-exps as the all-gather's."""
    b, T = m.dtype_bytes, lay.weight_shards
    mlp = mlp_intermediates(m)
    items = {
        "norms": (2 * norm_saved(m, norm), "norm"),
        "input of linear_qkv": (b * m.hidden_size, "norm"),
        "input of linear_fc1 (MLP)": (b * m.hidden_size, "norm"),  # freed by the MLP's backward
        "mixed qkv (v is a view of it)": (b * (m.q_dim + 2 * m.kv_dim) / T, "core"),
        "q, k after RoPE": (b * (m.q_dim + m.kv_dim) / T, "core"),
        "attention output (linear_proj input)": (b * m.q_dim / T, "core"),
        "softmax log-sum-exp": (FP32 * m.num_attention_heads / T, "core"),
        "RoPE cos/sin of q and k": (4 * b * m.head_dim, "core"),
        "MLP intermediates": (b * mlp / T, "core"),
    }
    if selective:
        del items["softmax log-sum-exp"]
    elif lay.cp > 1:
        del items["mixed qkv (v is a view of it)"], items["q, k after RoPE"]
        items = {"q after RoPE": (b * m.q_dim / T, "core"),
                 "local [k | v] (the CP all-gather's input, re-gathered in backward)": (b * 2 * m.kv_dim / T, "core"),
                 "chunk attention outputs o": (b * m.q_dim / T, "core"), **items}
        if ring:
            del items["chunk attention outputs o"]
            items["local [k | v] (the ring's own K/V)"] = items.pop(
                "local [k | v] (the CP all-gather's input, re-gathered in backward)")
    if tiled:
        del items["MLP intermediates"]
    if moe:
        items.pop("MLP intermediates", None)
        fs = m.moe_shared_expert_intermediate_size
        if fs:
            items["shared expert intermediates"] = (b * mlp_intermediates(m, fs) / T, "core")
        items.update({k: (v, "norm") for k, v in moe_saved_per_token(m).items()})
    return items


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
    recompute_working_set: float = 0.0  # one checkpointed chunk's activations, rebuilt in its backward
    host_offload: float = 0.0  # checkpointed layer inputs held in pinned host memory (per GPU)
    # train.optimizer_cpu_offload: the host's share of the optimizer (per GPU): fp32 main weight,
    # two Adam moments and a pinned fp32 copy of the gradient per offloaded parameter
    host_optimizer: float = 0.0
    at_peak: Dict[str, float] = field(default_factory=dict)  # what is allocated at the peak, by kind
    points: Dict[str, float] = field(default_factory=dict)  # the total at each candidate peak point
    # allocated before a step starts and kept across steps, beside the model states: Megatron's
    # global all-gather buffer (sequence parallelism; counted in `comm_buffers` and the peak points)
    # and the cached RoPE table (counted in the peak points)
    persistent_buffers: float = 0.0
    # what is kept when the model's forward returns (the loss): the saved activations (`activations`)
    # and what the LM head keeps for its backward (Megatron's vocab-parallel cross entropy: the fp32
    # softmax [B S / C, V / T]; the local head: nothing beside its log-sum-exp, in `activations`)
    kept_at_loss: float = 0.0
    # allocated when a step starts (model states + persistent buffers) and when its forward returns:
    # the probe's `model_states_gib` and `forward_end_gib`. FSDP over CP: the start holds the fp32
    # main gradients the previous step's optimizer made (`step_extra`, none for an fp32 model), which
    # zero_grad frees before the forward (H100 probe at 256K: 1.24 GiB = P x 4 bytes, 4 layers)
    step_start: float = 0.0
    forward_end: float = 0.0

    def as_gib(self) -> dict:
        out = {k: getattr(self, k) / GIB for k in ("params", "grads", "optimizer", "activations", "comm_buffers",
                                                    "logits", "other_transient", "optimizer_step_transient",
                                                    "recompute_working_set", "host_offload", "host_optimizer",
                                                    "peak")}
        out["peak_point"] = self.peak_point
        return out

    @property
    def host(self) -> float:
        """Pinned host memory this GPU's process needs: offloaded inputs + offloaded optimizer state."""
        return self.host_offload + self.host_optimizer


# -- memory -------------------------------------------------------------------------------------

def param_counts(m: ModelSpec, lay: Layout, expert_size: int = 1) -> Dict[str, float]:
    """Parameters held per GPU (elements): matmul weights split by the weight shards (TSP or
    TP; FSDP-over-CP: C), norms replicated, embeddings vocab-parallel over the weight shards.
    MoE layers: attention and the shared expert split like the dense layer's, the router
    replicated, E / EP whole experts (`experts`, stepped over expert-DP, not DP x CP)."""
    w = lay.weight_shards
    shard = lay.cp if lay.mesh.fsdp else 1
    heads = 1 if m.share_embeddings_and_output_weights else 2
    layers = m.dense_layers * (m.layer_matmul_params / w + m.layer_norm_params)
    if m.is_moe:
        layers += m.moe_layers * ((m.attn_params + m.shared_params) / w + m.router_params + m.shared_gate_params
                                  + m.layer_norm_params)
    experts = m.moe_layers * m.num_experts / expert_size * m.expert_params if m.is_moe else 0.0
    embed = heads * m.embedding_params / w + m.hidden_size
    return {"layers": layers / shard, "embeddings": embed / shard, "experts": experts,
            "total": (layers + embed) / shard + experts}


def stepped_params(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster) -> float:
    """Parameters whose optimizer state this GPU holds and steps: with the distributed optimizer
    the dense ones / (DP x C) and the experts / expert-DP (GPUs / EP); all of them without."""
    P = param_counts(m, lay, train.expert_size)
    if not train.distributed_optimizer or lay.mesh.fsdp:
        return P["total"]
    dp = cluster.world // lay.size
    return (P["total"] - P["experts"]) / (dp * lay.cp) + P["experts"] / (cluster.world // train.expert_size)


def in_layer_mode(lay: Layout, train: TrainSpec) -> str:
    """What one layer keeps inside itself: TSP 'save' (parallel.tsp_recompute = none: per-shard
    activations) or 'block' (tsp_recompute = full: each block recomputed from its input); the
    baselines 'none', or 'selective' (Megatron's core-attention recompute)."""
    if lay.record.uses_tsp:
        return "save" if train.tsp_recompute == "none" else "block"
    return "selective" if train.recompute == "selective" else "none"


@dataclass(frozen=True)
class LayerRecompute:
    """Megatron's layer checkpointing (parallel.recompute = full) over the L layers of a stage:
    `inputs` checkpointed inputs kept ([s, b, h] each), `saved` layers that keep their full
    activations, `chunk` layers recomputed together in one backward (their activations live at
    once), `recomputed` layers whose forward runs twice."""

    inputs: int = 0
    saved: int = 0
    chunk: int = 0
    recomputed: int = 0
    label: str = "none"


def layer_recompute(m: ModelSpec, train: TrainSpec) -> LayerRecompute:
    """uniform N (default 1): ceil(L/N) chunks of N layers, each keeps its input only; block N
    (default L): the first N layers each keep their input, the other L-N save everything."""
    L = m.num_layers
    if train.recompute != "full":
        return LayerRecompute(saved=L, label=train.recompute)
    inputs = checkpointed_inputs(L, train.recompute, train.recompute_method, train.recompute_num_layers)
    if train.recompute_method == "uniform":
        N = min(train.recompute_num_layers or 1, L)
        return LayerRecompute(inputs=inputs, chunk=N, recomputed=L, label=f"full uniform N={N}")
    N = inputs
    return LayerRecompute(inputs=N, saved=L - N, chunk=1 if N else 0, recomputed=N, label=f"full block N={N}")


def checkpointed_inputs(layers: int, recompute: str, method: str, num_layers: Optional[int]) -> int:
    """Layer inputs Megatron's full recompute keeps over `layers` layers ([s, b, h] each; with
    parallel.offload_activations all on the host): uniform N: ceil(L/N); block N: N (default L);
    none without full recompute. The driver's host check (training/host_memory.py) counts with it."""
    if recompute != "full":
        return 0
    if method == "uniform":
        return -(-layers // min(num_layers or 1, layers))
    return layers if num_layers is None else min(num_layers, layers)


def recompute_mode(lay: Layout, train: TrainSpec) -> str:
    """The recompute a plan runs, in words (its notes)."""
    parts = []
    if lay.record.uses_tsp:
        parts.append(f"TSP in-layer {'none (save activations)' if train.tsp_recompute == 'none' else 'full (block)'}")
    parts.append(f"layers {train.recompute if train.recompute != 'full' else train.recompute_method}"
                 + (f" N={train.recompute_num_layers}" if train.recompute_num_layers else ""))
    if train.offload_activations:
        parts.append("checkpointed inputs offloaded to host")
    return ", ".join(parts)


def uses_local_head(train: TrainSpec, lay: Layout) -> bool:
    """The sequence-local LM head (megatron_tsp/lm_head.py) runs only on TSP layouts; the
    baselines run Megatron's."""
    return lay.record.uses_tsp and train.tsp_lm_head == "local"


def lm_head_working_set(m: ModelSpec, train: TrainSpec, lay: Layout) -> Dict[str, float]:
    """Bytes the LM head + cross entropy hold while they run (the loss point). Megatron's head
    (every baseline; TSP with tsp_lm_head = megatron) gathers the sequence of its group: every
    GPU holds logits of all B S / C tokens x V / (D or T), the fp32 softmax the cross entropy
    saves and the model-dtype logits beside it. The local head: at most lm_head_chunk_tokens x
    V/D fp32 logits (forward and backward), the vocab shard in flight (V/D x h) and, in backward,
    its gradient (V/D x h, model dtype)."""
    b, w = m.dtype_bytes, lay.weight_shards
    if uses_local_head(train, lay):
        chunk = min(train.lm_head_chunk_tokens, train.micro_batch_size * train.seq_length // lay.tsp_size)
        return {"logits chunk (fp32)": FP32 * chunk * m.vocab_size / w,
                "vocab shard and its gradient in flight": 2 * b * m.vocab_size / w * m.hidden_size}
    tokens = train.micro_batch_size * train.seq_length / lay.cp
    return {"logits (fp32 softmax)": FP32 * tokens * m.vocab_size / w,
            "logits (model dtype)": b * tokens * m.vocab_size / w}


def lm_head_kept(m: ModelSpec, train: TrainSpec, lay: Layout) -> float:
    """Bytes the LM head keeps from the end of forward to its backward, beside its input (counted
    in the activations): Megatron's vocab-parallel cross entropy saves its fp32 softmax
    [B S / C, V / T] (the model-dtype logits are freed when the forward returns); the local head
    only its log-sum-exp (counted in the activations). H100 probe, 7B width, 256K, 4 ranks: the
    forward's end is 7.81 GiB = [S, V / 4] fp32 above the saved activations for TP+SP, CP and
    TP+SP x CP (FSDP over CP too, less the gradients zero_grad frees), TSP's local head 0."""
    if uses_local_head(train, lay):
        return 0.0
    return FP32 * train.micro_batch_size * train.seq_length / lay.cp * m.vocab_size / lay.weight_shards


def rope_table(m: ModelSpec, train: TrainSpec, lay: Layout) -> float:
    """Megatron's RotaryEmbedding caches its table (lru_cache, fp32 [S / C, d]) across steps; TSP
    indexes the same table over the whole sequence. In the step's starting allocation of the H100
    probe at 256K: 0.125 GiB TP+SP 4, 0.0625 TP+SP 2 x CP 2, 0.031 CP 4 and FSDP over CP 4
    beyond the model states and Megatron's all-gather buffer (TSP D=4: 0.20, of which 0.075 is not
    this table and not modelled). With it the 512K fake-group rows (test_plan.py) are within 0.7%."""
    return FP32 * train.seq_length / lay.cp * m.head_dim


def model_states(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster) -> Dict[str, float]:
    """Bytes of the model states per GPU: parameters, gradients, the optimizer's state on the GPU
    and on the host, the Adam step's transient; `stepped`: the parameters this GPU steps."""
    b = m.dtype_bytes
    P = param_counts(m, lay, train.expert_size)["total"]
    adam = train.optimizer == "adam"
    master = FP32 if b < FP32 and adam else 0  # fp32 main params of a bf16 model
    stepped = stepped_params(m, train, lay, cluster)
    # train.optimizer_cpu_offload: megatron-core's HybridDeviceOptimizer keeps the main weights and
    # moments of this fraction of the stepped parameters on the host (the GPU keeps the bf16 weights
    # and the fp32 gradient buffer: 6 bytes per parameter instead of 18) and adds a pinned fp32
    # copy of their gradients there
    on_host = train.host_optimizer_fraction
    return {"params": P * b, "grads": P * (FP32 if train.grad_reduce_in_fp32 else b), "stepped": stepped,
            "optimizer": stepped * (master + (2 * FP32 if adam else 0)) * (1 - on_host),
            "host_optimizer": stepped * on_host * HOST_OPTIMIZER_BYTES_PER_PARAM,
            # torch Adam (foreach) allocates sqrt(exp_avg_sq) for every parameter it steps on the GPU
            "optimizer_step_transient": stepped * FP32 * (1 - on_host) if adam else 0.0}


def layer_saved(m: ModelSpec, train: TrainSpec, lay: Layout, moe: bool = False) -> Dict[str, float]:
    """Bytes one layer (an MoE layer with `moe`) saves for its backward on one GPU, by item:
    TSP's per local token (tsp_saved_per_token), Megatron's per token of its region (native_saved:
    the norm region's B S / (the token shards), the attention / MLP region's B S / C, widths / T)."""
    mode, tiled = in_layer_mode(lay, train), bool(train.mlp_chunk_tokens)
    B, S = train.micro_batch_size, train.seq_length
    tokens_norm = B * S / lay.token_shards
    if lay.record.uses_tsp:
        return {k: v * tokens_norm for k, v in tsp_saved_per_token(
            m, save_activations=(mode == "save"), norm=train.norm, exchange=mlp_exchange(train, lay), moe=moe,
            tiled=tiled).items()}
    tokens_core = B * S / lay.cp
    return {k: v * (tokens_norm if region == "norm" else tokens_core)
            for k, (v, region) in native_saved(m, lay, train.norm, selective=(mode == "selective"),
                                               moe=moe, tiled=tiled, ring=cp_ring(train, lay)).items()}


def memory(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster) -> Memory:
    """Per-GPU bytes. Peak = model state + the largest of: the loss point (saved activations +
    the LM head's working set), the backward of a layer that saved its activations (the layers'
    saved tensors, without the final norm's and LM head's, whose backward has freed them, + its
    in-flight buffers and scratch), the backward of a checkpointed chunk (the checkpointed inputs
    still on the GPU + the chunk's rebuilt activations + in-flight), the optimizer step."""
    b, B, S, C = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.cp
    states = model_states(m, train, lay, cluster)
    params, grads, optimizer, stepped = states["params"], states["grads"], states["optimizer"], states["stepped"]
    opt_step_transient = states["optimizer_step_transient"]

    rc = layer_recompute(m, train)
    tokens_norm = B * S / lay.token_shards  # norm / residual region, per GPU
    dense_items, moe_items = layer_saved(m, train, lay), (layer_saved(m, train, lay, moe=True) if m.is_moe else {})
    # the largest layer's: a checkpointed chunk of N layers rebuilds at most N of these
    moe_bigger = not m.dense_layers or sum(moe_items.values()) > sum(dense_items.values())
    big_items = moe_items if (m.is_moe and moe_bigger) else dense_items
    layer_act = sum(big_items.values())
    # what the layer's MLP (MoE layer, shared expert) saves: its backward runs first and frees them,
    # so they are gone when the attention's backward runs (issue 25: the CPU fake-group probe,
    # benchmarks/fake_rank_memory.py, finds the attention-backward peak of TSP and of CP one layer's
    # MLP intermediates below a count that keeps them)
    layer_mlp = sum(v for k, v in big_items.items() if _is_mlp_item(k))
    layer_input = b * m.hidden_size * tokens_norm  # [s, b, h]: what a checkpointed layer keeps
    inputs_on_gpu = min(2, rc.inputs) if train.offload_activations else rc.inputs
    saved_dense, saved_moe = layer_counts_saved(m, train)
    detail: Dict[str, float] = {}
    for items, n in ((dense_items, saved_dense), (moe_items, saved_moe)):
        for k, v in items.items():
            if n:
                detail[k] = detail.get(k, 0.0) + v * n
    if rc.inputs:
        detail[f"checkpointed layer inputs ({rc.label}: {inputs_on_gpu} of {rc.inputs} on the GPU)"] = \
            inputs_on_gpu * layer_input
    # final norm + the output layer's (local) input; the local head adds lse and the target logit.
    # Their backward runs before any layer's, and releases them: they count at the loss point only
    head_saved = {"final norm and LM-head input": (norm_saved(m, train.norm) + b * m.hidden_size) * tokens_norm}
    if uses_local_head(train, lay):
        head_saved["LM-head log-sum-exp"] = FP32 * tokens_norm  # (its input is counted above; labels are the batch's)
    detail.update(head_saved)
    activations = sum(detail.values())
    layers_saved = activations - sum(head_saved.values())  # what is still saved when the last layer's backward runs

    kept_at_loss = activations + lm_head_kept(m, train, lay)
    head = lm_head_working_set(m, train, lay)
    logits = sum(head.values())
    # Megatron's persistent all-gather buffer (sequence-parallel linears, its LM head, the
    # `tokens` MLP); TSP's own blocks and local head do not use it
    needs_buffer = lay.sequence_parallel and (not lay.record.uses_tsp or not uses_local_head(train, lay)
                                              or mlp_exchange(train, lay) == "tokens")
    mpu_buffer = b * B * S / C * m.hidden_size if needs_buffer else 0.0
    rope = rope_table(m, train, lay)

    # what is in flight while one layer runs its backward, block by block
    blocks = [(c + mpu_buffer, sc, name, frees) for c, sc, name, frees in backward_blocks(m, train, lay)]
    comm, scratch, point, _ = max(blocks, key=lambda x: x[0] + x[1] - (layer_mlp if x[3] else 0.0))
    static = params + grads + optimizer + rope
    step_extra = 0.0
    if lay.mesh.fsdp:
        # FSDP2's sharded gradients are set to None by the optimizer's zero_grad and appear layer
        # by layer as each reduce-scatter lands, after the first layers' backward (the peak): they
        # do not count in forward and backward (probe: FSDP over CP at 4 and 32 layers on the GPU
        # rows, 1-6% over with them). At the step they exist in the parameter dtype, and Megatron's
        # mixed-precision optimizer copies them to fp32 main gradients (model_param.grad.float())
        static_fb = params + optimizer + rope
        step_extra = stepped * FP32 if b < FP32 else 0.0
    else:
        static_fb = static
    # a checkpointed chunk rebuilds its N layers' saved tensors: the first layer's input is the
    # checkpointed input (counted there), and the chunk's rebuilt output, which the checkpoint holds
    # until the chunk's backward ends, takes its place ([s, b, h] each): N x layer_act
    working = rc.chunk * layer_act if rc.recomputed else 0.0
    points = {"loss (start of backward)": (activations, logits + mpu_buffer, 0.0, 0.0)}
    for b_comm, b_scratch, b_point, frees_mlp in blocks:
        gone = layer_mlp if frees_mlp else 0.0
        if rc.saved:
            points[b_point] = (layers_saved - gone, b_comm, b_scratch, 0.0)
        if rc.recomputed:
            points[f"checkpointed {b_point}"] = (inputs_on_gpu * layer_input, b_comm, b_scratch, working - gone)
    name, (act_at, buf_at, scratch_at, work_at) = max(points.items(), key=lambda kv: sum(kv[1]))
    fwd_bwd_peak = static_fb + act_at + buf_at + scratch_at + work_at
    step_peak = static + opt_step_transient + step_extra + mpu_buffer
    if fwd_bwd_peak >= step_peak:
        peak, point = fwd_bwd_peak, name
        at_peak = {"params": params, "grads": grads if static_fb == static else 0.0, "optimizer": optimizer,
                   "RoPE table": rope, "saved activations": act_at,
                   "recompute working set": work_at,
                   ("LM head + buffers" if name.startswith("loss") else "in-flight buffers"): buf_at,
                   "scratch": scratch_at}
    else:
        peak, point = step_peak, "optimizer step"
        at_peak = {"params": params, "grads": grads, "optimizer": optimizer, "RoPE table": rope,
                   "optimizer step transient": opt_step_transient + step_extra, "buffers": mpu_buffer}
    return Memory(
        params=params, grads=grads, optimizer=optimizer, activations=activations,
        comm_buffers=comm, logits=logits, other_transient=scratch,
        optimizer_step_transient=opt_step_transient, peak=peak, peak_point=point, detail=detail,
        recompute_working_set=working, host_offload=(rc.inputs * layer_input if train.offload_activations else 0.0),
        host_optimizer=states["host_optimizer"],
        at_peak=at_peak, points={k: static_fb + sum(v) for k, v in points.items()} | {"optimizer step": step_peak},
        persistent_buffers=mpu_buffer + rope, kept_at_loss=kept_at_loss,
        step_start=static_fb + step_extra + mpu_buffer,
        forward_end=static_fb + mpu_buffer + kept_at_loss,
    )


def backward_blocks(m: ModelSpec, train: TrainSpec, lay: Layout) -> list:
    """What is in flight while one layer runs its backward: [(buffers, scratch, point, frees the
    MLP's saved tensors)] for each block of the layout's layer (the MLP's backward runs first, the
    attention's after it), Megatron's all-gather buffer aside."""
    if lay.record.uses_tsp:
        return tsp_backward_blocks(m, train, lay)
    return baseline_backward_blocks(m, train, lay)


def tsp_backward_blocks(m: ModelSpec, train: TrainSpec, lay: Layout) -> list:
    """TSP: the attention and the MLP backward run one after the other: the larger of the two
    (an MoE layer: the MoE layer's, its shared expert's, run as the TSP MLP)."""
    blocks = [(*tsp_attention_in_flight(m, train, lay), "layer backward (attention)", True)]
    if m.dense_layers:
        blocks.append((*tsp_mlp_in_flight(m, train, lay), "layer backward (MLP)", False))
    if m.is_moe:
        blocks.append((*moe_in_flight(m, train, lay), "layer backward (MoE)", False))
        if m.moe_shared_expert_intermediate_size:
            blocks.append((*tsp_mlp_in_flight(shared_expert_model(m), train, lay),
                           "layer backward (shared expert)", False))
    return blocks


def baseline_backward_blocks(m: ModelSpec, train: TrainSpec, lay: Layout) -> list:
    """TP, TP+SP, CP, TP x CP, FSDP over CP: Megatron's MLP (or the MoE layer) and attention
    backward, with FSDP's gathered layer beside each."""
    b, C = m.dtype_bytes, lay.cp
    fsdp = 0.0
    if lay.mesh.fsdp:
        # torch FSDP2 without a mixed-precision policy (Megatron's wrapper sets none): the layer's
        # all-gathered weights, its unsharded gradients, the previous layer's reduce-scatter
        # input and output, all in the parameter dtype (probe: all_gather_copy_out P_l, the
        # post-backward buffers 1.25 P_l at C = 4; not 2 gathered layers + fp32 grads), and the
        # root's gathered output layer (V x h)
        fsdp = (2 + 1 / C) * m.layer_matmul_params * b + m.embedding_params * b
    dense_mlp = baseline_mlp_in_flight(m, train, lay) if m.dense_layers else (0.0, 0.0)
    mlp_comm, mlp_scratch = dense_mlp
    if m.is_moe:  # the larger of a dense layer's MLP and an MoE layer's backward
        moe_comm, moe_scratch = moe_in_flight(m, train, lay)
        # the baselines' shared expert is Megatron's SharedExpertMLP: never tiled
        shared = baseline_mlp_in_flight(shared_expert_model(m), dataclasses.replace(train, mlp_chunk_tokens=0),
                                        lay)[1] if m.moe_shared_expert_intermediate_size else 0.0
        if moe_comm + max(moe_scratch, shared) > sum(dense_mlp):
            mlp_comm, mlp_scratch = moe_comm, max(moe_scratch, shared)
    return [(mlp_comm + fsdp, mlp_scratch, "layer backward (MLP)", False),
            (*[x + y for x, y in zip(baseline_attention_in_flight(m, train, lay), (fsdp, 0.0))],
             "layer backward (attention)", True)]


def _is_mlp_item(key: str) -> bool:
    """A saved item of the layer's MLP block (dense MLP, shared expert, MoE router/dispatcher/experts)."""
    return "MLP" in key or "MoE" in key or "shared expert" in key


def baseline_mlp_in_flight(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple:
    """(buffers, scratch) in bytes at the peak of Megatron's MLP backward (TP / TP+SP / CP /
    FSDP-over-CP), measured with the CPU fake-group probe (benchmarks/fake_rank_memory.py) at
    7B proportions: beside all of the layer's saved tensors, either fc2's input gradient [s_c, f/T]
    and, with sequence parallelism, the all-gathered output gradient [B S / C, h] (fc2's dgrad), or,
    gated, after fc2's backward has freed its input (the product): the product's gradient and the
    two gradients of the product's factors, 3 x [s_c, f/T] for the freed 1 (net 2). The incoming
    gradient [s, h] beside. (It counted 2 x [s_c, 2f/T] + 2 [s, h] before: 14-20% over the
    measured baselines with the product kept.)
    Tiled (parallel.mlp_chunk_tokens, TiledMLP): the same pieces over one chunk's tokens of the MLP
    region (the chunk of the s local tokens, all-gathered over T with sequence parallelism), plus
    that chunk's rebuilt intermediates (saved by the untiled MLP for all tokens, counted there) and
    the input gradient [s, h] the chunks fill."""
    b, B, S, C, T = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.cp, lay.weight_shards
    s = B * S / lay.token_shards
    core = B * S / C * mlp_chunk(train, s, B) / s  # tokens of the MLP region in one chunk (all of them untiled)
    f_c = core * m.f / T * b
    gathered = core * m.hidden_size * b if lay.sequence_parallel else 0.0
    scratch = max(f_c + gathered, 2 * f_c if m.swiglu else 0.0) + s * m.hidden_size * b
    if train.mlp_chunk_tokens:
        scratch += core * mlp_intermediates(m) / T * b + s * m.hidden_size * b
    return 0.0, scratch


# the CP attention's backward (baselines/context_parallel.py) at its peak on CP rank 0, in units of
# the whole sequence's K/V [B S, 2 kv / T]: the re-gathered K/V in natural order, the last chunk's
# dK/dV (its prefix is the whole sequence) from the kernels' two parts (prefix, causal block) and
# their concatenation (3), and an autograd add of a quarter of it: 3.3 on the CPU probe (CP 8,
# 16K, h 512); the GPU rows of CP and FSDP over CP at 4 and 8 ranks fit 3.2-3.4, one (FSDP over
# CP with offload, 4 ranks) 3.6
CP_ATTENTION_KV_UNITS = 3.25


def cp_ring(train: TrainSpec, lay: Layout) -> bool:
    """The CP baseline streams K/V around the CP ring (parallel.cp_comm_type = p2p, CP layouts)."""
    return lay.cp > 1 and train.cp_comm_type == "p2p"


def baseline_attention_in_flight(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple:
    """(buffers, scratch) in bytes while Megatron's attention runs its backward (the MLP's saved
    tensors are freed by then): with CP the gathered sequence's K/V and their gradients
    (CP_ATTENTION_KV_UNITS x [B S, 2 kv / T]: the planner counted [B S / C, 2 kv / T] x 2 before,
    and was 7% LOW for FSDP over CP on 8 ranks, where this is the peak), or with
    parallel.cp_comm_type = p2p the ring's buffers (`cp_ring_kv_buffers`) and its fp32 dq;
    scratch: the gradients of q, k, v over the attention region and the incoming gradient [s, h]."""
    b, B, S, C, T = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.cp, lay.weight_shards
    comm = CP_ATTENTION_KV_UNITS * B * S * 2 * m.kv_dim / T * b if C > 1 else 0.0
    s = B * S / lay.token_shards
    scratch = B * S / C * (m.q_dim + 2 * m.kv_dim) / T * b + s * m.hidden_size * b
    if cp_ring(train, lay):
        comm = cp_ring_kv_buffers(m, train, lay)
        scratch += B * S / C * FP32 * m.q_dim / T  # dq accumulated over the ring steps in fp32
    return comm, scratch


def cp_ring_kv_buffers(m: ModelSpec, train: TrainSpec, lay: Layout) -> float:
    """Bytes of K/V and dK/dV the CP ring's backward (baselines/context_parallel.py, cp_comm_type
    p2p: tsp/streamed_attention.py's stream_backward on the CP group) holds at once, in units of one
    rank's K/V u = [B S / C, 2 kv / T]: the K/V held and the one arriving, a block's dK/dV out of
    the kernel, the dK/dV partial arriving and the one last sent (5 u), and the partial being built
    in fp32 (4 / b u); `streamed_kv_buffers` less TSP's previous shard waiting for its finish (one
    ring per layer here). It scales with S / C, where the all-gather's CP_ATTENTION_KV_UNITS x
    [B S, 2 kv / T] does not. Not measured on the GPU yet."""
    b, B, S, C, T = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.cp, lay.weight_shards
    u = B * S / C * 2 * m.kv_dim / T
    return u * (5 * b + 4)


def tsp_attention_in_flight(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple:
    """(buffers, scratch) in bytes while TSPAttentionFunction.backward runs shard j, with one
    shard of lag: shard j-1's finish (the adjoint of its projection, its weight gradient) waits
    for its dK/dV reduce-scatter, which stays in flight until shard j's is posted. The forward
    holds fewer (no gradients; two gathered K/V at a time) and is not modelled.
    parallel.tsp_attention_kv = streamed (tsp/streamed_attention.py): no K/V of all S tokens;
    see `streamed_kv_buffers`."""
    b, B, S, D = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.tsp_size
    s = B * S / D
    save = in_layer_mode(lay, train) == "save"
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
    streamed = train.tsp_attention_kv == "streamed"
    kv_bytes = streamed_kv_buffers(m, train, lay) if streamed else kv_buffers * kv
    comm = (shards + grads) * shard + kv_bytes
    # dx, the incoming gradient, do and two shards' dq, d(mixed qkv); recompute adds j's q, k/v, o
    scratch = s * b * (2 * m.hidden_size + 3 * m.q_dim / D + (m.q_dim + 2 * m.kv_dim) / D)
    if streamed:  # dq accumulated over the ring steps in fp32
        scratch += s * 4 * m.q_dim / D
    if not save:
        scratch += s * b * (2 * m.q_dim + 2 * m.kv_dim) / D
    return comm, scratch


def streamed_kv_buffers(m: ModelSpec, train: TrainSpec, lay: Layout) -> float:
    """Bytes of K/V and dK/dV the streamed attention's backward holds at once (in place of the
    gathered schedule's 3-4 x [B S, 2 kv / D]), in units of one rank's K/V of one head shard,
    u = [B S / D, 2 kv / D]: the K/V held and the one arriving, a block's dK/dV out of the
    kernel, the dK/dV partial arriving, the one last sent (alive until its hop completes) and the
    previous shard's summed dK/dV waiting for its finish (6 u), and the partial being built in
    fp32 (4 / b u). It scales with S / D: unlike the gathered K/V, D divides it."""
    b, B, S, D = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.tsp_size
    u = B * S / D * 2 * m.kv_dim / D
    return u * (6 * b + 4)


def tsp_mlp_in_flight(m: ModelSpec, train: TrainSpec, lay: Layout) -> tuple:
    """(buffers, scratch) in bytes while TSP's MLP backward runs one shard, for the exchange it
    runs (megatron_tsp/mlp.py)."""
    b, B, S, D = m.dtype_bytes, train.micro_batch_size, train.seq_length, lay.tsp_size
    s = B * S / D
    exchange = mlp_exchange(train, lay)
    tiled = bool(train.mlp_chunk_tokens)
    if exchange == "tokens":
        # Megatron's MLP: no weight buffers (the input re-gather uses the persistent mpu
        # buffer, counted by the caller); the gradients of its intermediates, as TP+SP's; tiled
        # (TiledMLP's function) those of one chunk all-gathered (D chunks), the chunk's rebuilt
        # intermediates and the input gradient the chunks fill
        gathered = D * mlp_chunk(train, s, B)
        scratch = 2 * gathered * 2 * m.f / D * b + 2 * s * m.hidden_size * b
        if tiled:
            scratch += gathered * mlp_intermediates(m) / D * b + s * m.hidden_size * b
        return 0.0, scratch
    shard = m.mlp_params / D * b
    if exchange == "ring":
        # the packed own shard, the one in use, the next hop's; the shard's gradient, the
        # previous one's in its hop and the receive buffer of that hop
        comm = (min(D, 3) + (3 if D > 1 else 1)) * shard
    else:  # broadcast: own, in use, next; the gradient, up to two reductions (+ the owner's)
        comm = (min(D, 2) + (1 if D > 2 else 0) + min(D, 3) + (1 if D > 3 else 0)) * shard
    # shard_backward rebuilds the activation with autograd and differentiates it while all of
    # these are alive (at the end of the product's backward, before its saved tensors are freed),
    # each [s, f/D]: gated: act(gate), up + offset, their product a (held until the grad returns),
    # d a = g @ W_fc2 (the grad's grad_outputs), d act(gate), d up; GELU: act(h1), d a, d h1. Plus
    # dx and the incoming gradient [s, h]; recompute adds the shard's fc1 output [s, 2f/D or f/D].
    # Tiled (parallel.mlp_chunk_tokens): the [., f/D] pieces and the rebuilt fc1 output (always
    # rebuilt then) of one chunk c = min(chunk, s) instead of s
    c = mlp_chunk(train, s)
    scratch = c * b * (6 if m.swiglu else 3) * m.f / D + s * b * 2 * m.hidden_size
    if in_layer_mode(lay, train) != "save" or tiled:
        scratch += c * b * (2 if m.swiglu else 1) * m.f / D
    return comm, scratch


# -- compute -----------------------------------------------------------------------------------

def flops(m: ModelSpec, train: TrainSpec, lay: Layout) -> Dict[str, float]:
    """FLOPs per GPU per micro-batch. Causal attention counts the unmasked half:
    forward 2 x B S^2 q (QK^T and PV), backward 2.5 x forward (flash: 5 GEMMs vs 2): what the
    kernels execute, for the time model. `model_flops` (MFU) is planner/flops.py's count.
    MoE layers count the active weights (router, k experts, shared expert): balanced routing
    gives every GPU s k expert tokens."""
    B, S, L = train.micro_batch_size, train.seq_length, m.num_layers
    mode = in_layer_mode(lay, train)
    n = lay.size  # every layout divides the work evenly over its GPUs
    active = m.active_matmul_params  # summed over the L layers
    fwd_mm = 2 * B * S * active / n
    fwd_attn = 2 * B * S * S * m.q_dim * L / n
    if train.document_length:  # document masks: only the pairs inside documents (blocks skipped)
        fwd_attn *= packed_pairs(S, train.document_length) / causal_pairs(S)
    extra = 1.0 if mode == "block" else 0.0  # TSP's block recompute, every layer
    # what TSP's block recompute reruns: attention and the TSP MLP (the dense MLP, the shared
    # expert); not the tokens MLP (Megatron's) nor the MoE layer's router and experts (Megatron's)
    tokens = mlp_exchange(train, lay) == "tokens"
    rerun_tsp = L * m.attn_params + (0 if tokens else m.dense_layers * m.mlp_params
                                     + m.moe_layers * m.shared_params)
    extra_mm = extra * rerun_tsp / active
    if train.mlp_chunk_tokens:
        # the token-tiled MLP runs forward again chunk by chunk in backward: Megatron's MLP (the
        # baselines', TSP's tokens exchange) all of it; TSP's exchanges fc1 (what block mode
        # already reruns)
        if not lay.record.uses_tsp or tokens:
            extra_mm += m.dense_layers * m.mlp_params / active
        elif mode == "save":
            fc1_share = 2 / 3 if m.swiglu else 1 / 2
            extra_mm += fc1_share * (m.dense_layers * m.mlp_params + m.moe_layers * m.shared_params) / active
    # Megatron's layer recompute: one more forward of the recomputed layers (inside which TSP's
    # block mode still recomputes in its backward); selective: one more core-attention forward
    rerun = layer_recompute(m, train).recomputed / L
    extra_attn = extra + rerun + (1.0 if mode == "selective" else 0.0)
    # the LM head (local: its logits again in backward)
    head = 2 * B * S * m.hidden_size * m.vocab_size / n * (4 if uses_local_head(train, lay) else 3)
    return {
        "matmul": fwd_mm * (3 + extra_mm + rerun) + head,
        "attention": fwd_attn * (1 + extra_attn) + 2.5 * fwd_attn,
        # for MFU: the one model-FLOP count bench uses too (planner/flops.py: attention backward
        # = 2 x forward, no recompute, the LM head once), per GPU
        "model_flops": model_flops(layers=L, matmul_params_per_layer=active / L, q_dim=m.q_dim,
                                   hidden=m.hidden_size, vocab=m.vocab_size, seq=S, batch=B,
                                   document_length=train.document_length)["total"] / n,
    }


def elementwise_bytes(m: ModelSpec, train: TrainSpec, lay: Layout) -> Dict[str, float]:
    """HBM traffic of the memory-bound kernels per GPU per micro-batch (bytes), counted per op
    of the code path (docs/planner.md, "time"); the profile's `elementwise_efficiency` turns
    it into seconds."""
    b, B, S, L, h = m.dtype_bytes, train.micro_batch_size, train.seq_length, m.num_layers, m.hidden_size
    mode = in_layer_mode(lay, train)
    s = B * S / lay.token_shards
    w = lay.weight_shards
    s_core_width = B * S / lay.cp / w  # tokens x (1/T) of the TP family's core region
    if lay.record.uses_tsp:
        s_core_width = s  # each rank runs all D shards on its s tokens
    refwd = 1 if mode == "block" else 0
    tokens_mlp = mlp_exchange(train, lay) == "tokens"  # Megatron's MLP: no TSP recompute, no per-shard adds
    # MoE layers (estimated, not profiled): the activation runs on the k routed copies (width fe)
    # and the shared expert; the dispatcher's permute / unpermute copies read and write the s
    # tokens and their k copies once each way; the layers' figures below are per layer on average
    Lm = m.moe_layers
    f_act = ((L - Lm) * m.f + Lm * (m.moe_router_topk * m.fe + (m.moe_shared_expert_intermediate_size or 0))) / L
    # width of the MLP TSP recomputes and rings (dense, shared expert)
    f_tsp = ((L - Lm) * m.f + Lm * (m.moe_shared_expert_intermediate_size or 0)) / L
    m_act = dataclasses.replace(m, ffn_hidden_size=max(1, round(f_act)), num_experts=None)
    # composite fp32: fwd 36h + bwd 72h bytes per token; lean (estimated, not profiled): the same
    # ops, plus the backward rebuilding the fp32 normalized value from the saved input (+18h);
    # fused: one read and one write each way
    norm = {"torch": 108 * h, "lean": 126 * h, "fused": 6 * h * b}[train.norm]
    rope = 28 * (m.q_dim + m.kv_dim) * b / 2  # per token, one direction
    act = (16 if m.swiglu else 4) * m_act.f * b / 2  # fwd
    act_bwd = (26 if m.swiglu else 6) * m_act.f * b / 2
    act_tsp = (16 if m.swiglu else 4) * f_tsp * b / 2  # the part TSP's block mode recomputes
    resid = 24 * h * b / 2
    per_layer = 2 * norm * s + resid * s
    per_layer += s_core_width * (rope * (2 + refwd) + act + (0 if tokens_mlp else refwd) * act_tsp + act_bwd)
    if train.mlp_chunk_tokens:  # the tiled MLP's activation again in backward (TSP's block mode already reruns it)
        per_layer += s_core_width * ((L - Lm) / L * act * m.f / m_act.f if (not lay.record.uses_tsp or tokens_mlp)
                                     else (0 if refwd else act_tsp))
    per_layer += Lm / L * 4 * (1 + m.moe_router_topk) * h * b * s  # MoE permute / unpermute, forward and backward
    P_layer = (m.dense_layers * m.layer_matmul_params / w + (m.moe_layers * (
        (m.attn_params + m.shared_params) / w + m.router_params + m.shared_gate_params
        + m.num_experts / train.expert_size * m.expert_params)
        if m.is_moe else 0)) / L
    per_layer += P_layer * (b + 2 * FP32)  # add the weight grads into the fp32 main grads
    if lay.record.uses_tsp:
        D = lay.tsp_size
        blocks = 1 if tokens_mlp else 2
        per_layer += (2 * D - 1) * blocks * 6 * h * b / 2 * s  # out.add_ / dx.add_ per shard
        per_layer += (2 + refwd) * (2 * 2 * m.kv_dim * b * D + 2 * m.q_dim * b) * s  # zigzag K/V copy, cat
        mlp_tsp = 3 * h * f_tsp if m.swiglu else 2 * h * f_tsp  # the TSP MLP's weights (dense, shared expert)
        packed = m.attn_params if tokens_mlp else m.attn_params + mlp_tsp
        per_layer += packed / D * b * (2 * 2 + 2)  # pack (fwd, bwd), cat of grads
        if mlp_exchange(train, lay) == "ring":
            per_layer += (D - 1) * 3 * mlp_tsp / D * b  # ring gradient adds
    # Megatron's layer recompute reruns the forward's memory-bound ops of the recomputed layers
    fwd_part = (2 * norm / 3 * s + resid / 2 * s + s_core_width * (rope + act)
                + Lm / L * 2 * (1 + m.moe_router_topk) * h * b * s)
    if lay.record.uses_tsp:
        fwd_part += (lay.tsp_size * 6 * h * b / 2 + 2 * 2 * m.kv_dim * b * lay.tsp_size + 2 * m.q_dim * b) * s
    per_layer += fwd_part * layer_recompute(m, train).recomputed / L
    logits = 60 * B * S / lay.cp * m.vocab_size / w
    return {"layers": per_layer * L, "logits": logits, "total": per_layer * L + logits}


ADAM_BYTES_PER_PARAM = 80  # foreach AdamW + grad-norm + clip + copy to bf16 (docs/planner.md)
# train.optimizer_cpu_offload, per offloaded parameter: host memory (fp32 main weight, exp_avg,
# exp_avg_sq, the pinned fp32 gradient copy), bytes copied (the fp32 gradient to the host, the
# fp32 main weight back into the bf16 weight), bytes the host's fused CPU AdamW moves (reads weight,
# gradient, two moments; writes weight, two moments) and the rate one GPU's process steps them at:
# an estimate (a node's host memory bandwidth shared by its processes), not measured
HOST_OPTIMIZER_BYTES_PER_PARAM = 16
HOST_OPTIMIZER_COPY_BYTES_PER_PARAM = 8
HOST_ADAM_BYTES_PER_PARAM = 28
HOST_ADAM_GB_S = 10.0
