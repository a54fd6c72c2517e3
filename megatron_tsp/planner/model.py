"""The planner's inputs: a model shape, the training settings, and a parallel layout.

Pure Python (no torch, no megatron import): the planner runs anywhere in well under a second.
Every check raises `PlanError` (a `TSPConfigError`) naming the flag at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..config import MLP_EXCHANGES, TSPConfigError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LAYOUT_KINDS = ("tsp", "tp", "tp_sp", "cp", "tp_cp", "fsdp_cp")
RECOMPUTE = ("auto", "none", "full")


class PlanError(TSPConfigError):
    """A model, layout, training setting or hardware profile the planner cannot evaluate."""


def _positive(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{flag} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """A dense GPT: Megatron's local spec, RMSNorm or LayerNorm, RoPE, untied embeddings by
    default. `ffn` is the MLP width f; a gated (SwiGLU) MLP has fc1 of 2f x h."""

    layers: int
    hidden: int
    heads: int
    kv_groups: Optional[int] = None  # None: MHA
    ffn: Optional[int] = None  # None: 4h
    vocab: int = 32000
    dtype: str = "bfloat16"
    gated: bool = True
    tied_embeddings: bool = False
    name: str = "model"

    def __post_init__(self):
        for flag, v in (("--layers", self.layers), ("--hidden", self.hidden), ("--heads", self.heads),
                        ("--vocab", self.vocab)):
            _positive(flag, v)
        if self.kv_groups is not None:
            _positive("--kv-groups", self.kv_groups)
        if self.ffn is not None:
            _positive("--ffn", self.ffn)
        if self.hidden % self.heads:
            raise PlanError(f"--hidden = {self.hidden} must be divisible by --heads = {self.heads}")
        if self.heads % self.groups:
            raise PlanError(f"--heads = {self.heads} must be divisible by --kv-groups = {self.groups}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype = {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")

    # symbols of docs/planner.md
    @property
    def groups(self) -> int:
        return self.kv_groups or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def f(self) -> int:
        return self.ffn if self.ffn is not None else 4 * self.hidden

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): kv_groups x head_dim."""
        return self.groups * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def attn_params(self) -> int:
        """Wqkv (h x (q + 2 kv)) + Wo (q x h), no biases."""
        h = self.hidden
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h

    @property
    def mlp_params(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.f

    @property
    def layer_matmul_params(self) -> int:
        return self.attn_params + self.mlp_params

    @property
    def layer_norm_params(self) -> int:
        return 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        heads = 1 if self.tied_embeddings else 2
        return (self.layers * (self.layer_matmul_params + self.layer_norm_params)
                + heads * self.embedding_params + self.hidden)

    @classmethod
    def from_recipe(cls, path: str, overrides: List[str] = ()):
        """(ModelSpec, seq_length) of a training recipe (configs/*.yaml) with overrides."""
        from ..recipe import load_recipe  # imports megatron (a few seconds): only for recipes

        m = load_recipe(path, list(overrides)).model
        return cls(layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads,
                   kv_groups=m.num_query_groups, ffn=m.ffn_hidden_size, vocab=m.vocab_size,
                   dtype=m.dtype, gated=m.swiglu, tied_embeddings=m.share_embeddings_and_output_weights,
                   name=path.rsplit("/", 1)[-1].rsplit(".", 1)[0]), m.seq_length


def recipe_tsp_options(path: str, overrides: List[str] = ()) -> dict:
    """The TSP options of a training recipe that the planner models, as TrainSpec fields:
    {"mlp_exchange": parallel.tsp_mlp_exchange}."""
    from ..recipe import load_recipe

    return {"mlp_exchange": load_recipe(path, list(overrides)).parallel.tsp_mlp_exchange}


@dataclass(frozen=True)
class TrainSpec:
    """One optimizer step: `micro_batch` sequences of `seq_len` tokens per micro-batch and
    model replica, `global_batch` sequences per step (default: micro_batch x data-parallel)."""

    seq_len: int
    micro_batch: int = 1
    global_batch: Optional[int] = None
    optimizer: str = "adam"
    distributed_optimizer: bool = False
    recompute: str = "auto"  # auto: as each layout runs today; none; full
    grad_reduce_in_fp32: bool = True  # megatron_tsp.training.wrap_ddp_and_optimizer sets it
    norm: str = "torch"  # torch: composite torch norm (no TE, as on the GPU machine); fused: TE/apex kernel
    mlp_exchange: str = "auto"  # TSP's MLP exchange (parallel.tsp_mlp_exchange): ring, broadcast, tokens, auto

    def __post_init__(self):
        _positive("--seq-len", self.seq_len)
        _positive("--micro-batch", self.micro_batch)
        if self.global_batch is not None:
            _positive("--global-batch", self.global_batch)
        if self.optimizer != "adam":
            raise PlanError(f"--optimizer = {self.optimizer!r}: only adam is modelled")
        if self.norm not in ("torch", "fused"):
            raise PlanError(f"--norm = {self.norm!r} is not one of torch, fused")
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"--recompute = {self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if self.mlp_exchange not in MLP_EXCHANGES:
            raise PlanError(f"--tsp-mlp-exchange = {self.mlp_exchange!r} is not one of {', '.join(MLP_EXCHANGES)}")


@dataclass(frozen=True)
class Layout:
    """A parallel layout of one model replica. `tsp`: D = `tsp`; `tp` / `tp_sp`: T = `tp`
    (without / with Megatron sequence parallelism); `cp`: C = `cp` (K/V all-gather, full
    weights); `tp_cp`: T x C (TP + SP inside, CP across); `fsdp_cp`: C, weights, gradients and
    optimizer state sharded over the CP group (ZeRO-3 inside CP)."""

    kind: str
    tsp: int = 1
    tp: int = 1
    cp: int = 1

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise PlanError(f"--layout kind {self.kind!r} is not one of {', '.join(LAYOUT_KINDS)}")
        for flag, v in (("tsp size", self.tsp), ("tp size", self.tp), ("cp size", self.cp)):
            _positive(f"--layout {self.kind}: {flag}", v)

    @property
    def size(self) -> int:
        """GPUs of one model replica."""
        return self.tsp * self.tp * self.cp

    @property
    def weight_shards(self) -> int:
        """How many ways each layer's weights are split for compute (TP or TSP)."""
        return self.tsp * self.tp

    @property
    def token_shards(self) -> int:
        """How many ways the tokens of a sequence are split in the norm / residual regions."""
        if self.kind == "tp":
            return self.cp
        return self.tsp * self.tp * self.cp

    @property
    def sequence_parallel(self) -> bool:
        return self.kind in ("tsp", "tp_sp", "tp_cp") and self.weight_shards > 1

    @property
    def label(self) -> str:
        return {"tsp": f"TSP D={self.tsp}", "tp": f"TP {self.tp}", "tp_sp": f"TP+SP {self.tp}",
                "cp": f"CP {self.cp}", "tp_cp": f"TP+SP {self.tp} x CP {self.cp}",
                "fsdp_cp": f"FSDP-over-CP {self.cp}"}[self.kind]

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """`tsp4`, `tp4`, `tp_sp4`, `cp4`, `tp2xcp4` (or `tp_cp2x4`), `fsdp_cp4`."""
        import re

        t = text.strip().lower().replace("-", "_").replace("+", "_")
        m = re.fullmatch(r"(?:tp_?cp|tp)(\d+)x(?:cp)?(\d+)", t)
        if m:
            return cls("tp_cp", tp=int(m.group(1)), cp=int(m.group(2)))
        m = re.fullmatch(r"(tsp|tp_sp|tp|cp|fsdp_cp)(\d+)", t)
        if not m:
            raise PlanError(f"--layout {text!r}: expected one of tspD, tpT, tp_spT, cpC, tpTxcpC, fsdp_cpC "
                            "(e.g. tsp4, tp_sp8, tp2xcp4)")
        kind, n = m.group(1), int(m.group(2))
        key = {"tsp": "tsp", "tp": "tp", "tp_sp": "tp", "cp": "cp", "fsdp_cp": "cp"}[kind]
        return cls(kind, **{key: n})


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int = 1
    gpu_memory_gib: Optional[float] = None  # None: the hardware profile's

    def __post_init__(self):
        _positive("--gpus-per-node", self.gpus_per_node)
        _positive("--nodes", self.nodes)
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise PlanError(f"--gpu-memory-gb must be positive, got {self.gpu_memory_gib}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def check_layout(model: ModelSpec, train: TrainSpec, layout: Layout, cluster: Cluster) -> None:
    """Raise PlanError if `layout` cannot run `model` at `train.seq_len` on `cluster`."""
    w = layout.weight_shards
    where = f"layout {layout.label}"
    if cluster.world % layout.size:
        raise PlanError(f"{where} needs {layout.size} GPUs per replica, which does not divide "
                        f"--gpus-per-node x --nodes = {cluster.world}")
    if layout.kind in ("tsp", "tp", "tp_sp") and w > cluster.gpus_per_node:
        raise PlanError(f"{where}: the {'TSP' if layout.kind == 'tsp' else 'TP'} axis ({w}) must fit in one node "
                        f"(--gpus-per-node = {cluster.gpus_per_node})")
    if layout.kind == "tp_cp" and layout.tp > cluster.gpus_per_node:
        raise PlanError(f"{where}: the TP axis ({layout.tp}) must fit in one node (--gpus-per-node = "
                        f"{cluster.gpus_per_node})")
    for flag, value in (("--heads", model.heads), ("--kv-groups", model.groups), ("--ffn", model.f),
                        ("--vocab", model.vocab)):
        if value % w:
            raise PlanError(f"{flag} = {value} must be divisible by the {where} weight split {w}")
    if layout.kind == "tsp" and train.seq_len % (2 * layout.tsp):
        raise PlanError(f"--seq-len = {train.seq_len} must be divisible by 2 x D = {2 * layout.tsp} "
                        f"({where}: zigzag cuts each sequence into 2D chunks)")
    if layout.cp > 1 and train.seq_len % (2 * layout.cp * layout.tp):
        raise PlanError(f"--seq-len = {train.seq_len} must be divisible by 2 x CP x TP = "
                        f"{2 * layout.cp * layout.tp} ({where}: zigzag chunks, then TP sequence split)")
    if layout.kind == "tp_sp" and train.seq_len % layout.tp:
        raise PlanError(f"--seq-len = {train.seq_len} must be divisible by TP = {layout.tp} ({where})")
    dp = cluster.world // layout.size
    if train.global_batch is not None and train.global_batch % (train.micro_batch * dp):
        raise PlanError(f"--global-batch = {train.global_batch} must be a multiple of --micro-batch "
                        f"({train.micro_batch}) x data-parallel size ({dp}) for {where}")


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cluster: Cluster) -> List[Layout]:
    """Every layout the issue asks about on this cluster (whether it fits the model or not):
    TSP for every D > 1 dividing the node, TP and TP+SP likewise, CP and FSDP-over-CP for every
    C > 1 dividing the world, and TP x CP factorizations (T > 1 in a node, C > 1)."""
    G, W = cluster.gpus_per_node, cluster.world
    out: List[Layout] = []
    for d in divisors(G)[1:]:
        out.append(Layout("tsp", tsp=d))
    for t in divisors(G)[1:]:
        out += [Layout("tp", tp=t), Layout("tp_sp", tp=t)]
    for c in divisors(W)[1:]:
        out += [Layout("cp", cp=c), Layout("fsdp_cp", cp=c)]
    for t in divisors(G)[1:]:
        for c in divisors(W // t)[1:]:
            out.append(Layout("tp_cp", tp=t, cp=c))
    return out


@dataclass
class Skipped:
    layout: Layout
    reason: str


def usable_layouts(model: ModelSpec, train: TrainSpec, cluster: Cluster, layouts=None):
    """(layouts that can run, [Skipped]) out of `layouts` (default: candidate_layouts)."""
    ok, skipped = [], []
    for lay in layouts or candidate_layouts(cluster):
        try:
            check_layout(model, train, lay, cluster)
        except PlanError as e:
            skipped.append(Skipped(lay, str(e)))
        else:
            ok.append(lay)
    return ok, skipped

