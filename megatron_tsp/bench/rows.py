"""What `megatron-tsp bench` measures: the layouts (each a set of recipe overrides), the models
(recipes of configs/: the shape is the recipe's), the rows (variant x layout x sequence length) and which of them the installed package can
run. Plain Python (no torch): the orchestrator plans with it."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config import ModelRecipe, ModelShape, _yaml_value
from ..layouts import get_layout
from ..planner.flops import causal_area, layer_matmul_params  # noqa: F401  (causal_area: the worker's probe)
from ..planner.flops import model_flops as flops_of

OOM_EXIT, ERROR_EXIT = 17, 18
STARTUP_S = 180  # allowance for torchrun start, imports and process-group set-up before the first row
# Tests: "LAYOUT:SEQ:RANK[,...]" makes that rank raise a simulated OOM / hang in that row's second step.
FAKE_OOM_ENV, FAKE_HANG_ENV = "MEGATRON_TSP_BENCH_FAKE_OOM", "MEGATRON_TSP_BENCH_FAKE_HANG"
K = 1024


# -- what is benchmarked ---------------------------------------------------------------------

@dataclass(frozen=True)
class RowLayout:
    """A benchmarked layout: a layout of the registry (`megatron_tsp.layouts`) at sizes given as
    templates over the GPUs ({n} = number of GPUs, {half} = n // 2), plus recipe overrides of
    its own. Its label and recipe overrides follow from them."""

    layout: str
    """parallel.layout (a name of megatron_tsp.layouts.LAYOUTS)."""
    size: str = "{n}"
    """parallel.size."""
    context_size: str = "1"
    """parallel.context_size."""
    fsdp: bool = False
    """parallel.fsdp."""
    extra: tuple = ()
    """Further recipe overrides, after the layout's."""
    suffix: str = ""
    """Appended to the label (what the row changes)."""
    note: str = ""
    probe: Optional[str] = None
    """Attention-kernel micro-measurement: 'tsp' (a TSP shard: two zigzag chunks against their
    causal prefixes), 'sdpa' (the full-sequence causal SDPA of the TP baselines) or None."""

    @property
    def record(self):
        return get_layout(self.layout, "bench row layout")

    @property
    def overrides(self) -> tuple:
        """Recipe overrides ({n} = number of GPUs, {half} = n // 2)."""
        return ((f"parallel.layout={self.layout}", f"parallel.size={self.size}")
                + ((f"parallel.context_size={self.context_size}",) if self.context_size != "1" else ())
                + (("parallel.fsdp=true",) if self.fsdp else ()) + tuple(self.extra))

    @property
    def label(self) -> str:
        """How the table names it ({n} = number of GPUs): the registry's bench label of its mesh."""
        record = self.record
        mesh = record.mesh(2 if self.context_size != "1" else 1, self.fsdp)
        if mesh is None:
            raise ValueError(f"bench row layout {self.layout} with context_size {self.context_size} and fsdp "
                             f"{self.fsdp} has no label in megatron_tsp.layouts")
        size = {"tsp_size": self.size if record.size_group == "tsp" else "1",
                "tp": self.size if record.size_group == "tp" else "1"}
        label = mesh.format(mesh.bench_label, cp=self.context_size, **size)
        return f"{label}, {self.suffix}" if self.suffix else label


def _tsp_variant(label: str, override: str) -> RowLayout:
    return RowLayout("tsp", extra=(override,), suffix=label)


# Declared rows. CP, FSDP-over-CP, TSP compute-only and TSP recompute rows run once the
# installed recipe accepts their keys; until then each is reported "unavailable: <reason>".
LAYOUTS: Dict[str, RowLayout] = {
    "tsp": RowLayout("tsp", probe="tsp"),
    "tp": RowLayout("tp", probe="sdpa"),
    "tp_sp": RowLayout("tp_sp", probe="sdpa"),
    "cp4": RowLayout("dp", "1", context_size="{n}", note="context parallelism, K/V all-gathered, weights replicated"),
    "tp2_cp2": RowLayout("tp_sp", "{half}", context_size="2", note="TP x CP mesh (the paper's TP+SP)"),
    # The paper's single-node factorizations on 8 GPUs (issue 6): explicit TP x CP meshes.
    "tp2_cp4": RowLayout("tp_sp", "2", context_size="4", note="TP x CP mesh, 8 GPUs"),
    "tp4_cp2": RowLayout("tp_sp", "4", context_size="2", note="TP x CP mesh, 8 GPUs"),
    "fsdp_cp4": RowLayout("dp", "1", context_size="{n}", fsdp=True, extra=("train.distributed_optimizer=false",),
                          note="weights, gradients and optimizer state sharded over the context-parallel group "
                               "(torch FSDP2; it shards the optimizer state itself, so Megatron's distributed "
                               "optimizer is off)"),
    "tsp_compute_only": RowLayout("tsp", extra=("parallel.tsp_compute_only=true",), suffix="comm skipped",
                                  note="TSP's shapes and kernels with the communication skipped (numerically "
                                       "meaningless)"),
    # TSP with one setting changed: the A/B rows of docs/performance.md
    **{name: _tsp_variant(label, override) for name, label, override in (
        ("tsp_mlp_broadcast", "MLP by broadcast", "parallel.tsp_mlp_exchange=broadcast"),
        ("tsp_ring", "MLP ring", "parallel.tsp_mlp_exchange=ring"),
        ("tsp_mlp_tokens", "MLP tokens", "parallel.tsp_mlp_exchange=tokens"),
        ("tsp_high_priority", "high-priority comm stream", "parallel.high_priority_comm=true"),
        ("tsp_carveout16", "GEMMs leave 16 SMs", "parallel.gemm_sm_carveout=16"),
        ("tsp_ctas8", "NCCL max 8 CTAs", "parallel.comm_max_ctas=8"),
        ("tsp_recompute_full", "recompute full", "parallel.tsp_recompute=full"),
        ("tsp_recompute_none", "no recompute", "parallel.tsp_recompute=none"),
    )},
}
DEFAULT_LAYOUTS = "tsp,tp_sp,tsp_compute_only,tp,cp4,tp2_cp2,fsdp_cp4"  # run order: the main comparison first

@dataclass(frozen=True)
class BenchModel:
    """A benchmarked model: a recipe of configs/ (its model section is the shape, defined once
    there), run with a bench-chosen number of layers and sequence lengths."""

    recipe: str
    """The recipe (relative to the repository) whose model the `mha` variant runs."""
    gqa: object
    """The `gqa` variant: a recipe whose model is the same but for num_query_groups (and
    seq_length), or a number of KV groups."""
    layers: int
    """Layers when --layers is not given."""
    seq: str
    """Sequence lengths when --seq is not given."""


MODELS: Dict[str, BenchModel] = {
    # the 7B-class recipes (bf16): MHA, and GQA with 8 KV groups
    "7b": BenchModel("configs/7b_16k.yaml", "configs/7b_gqa_32k.yaml", layers=2, seq="16K,32K,64K,128K"),
    # For tests on CPU (gloo, float32): the embedded tiny recipe, GQA with 2 KV groups.
    "tiny": BenchModel("configs/tiny.yaml", 2, layers=2, seq="64,128"),
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the model keys every row sets, in this order (a recipe's other model keys follow where they differ
# from the defaults)
ROW_MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
                  "seq_length", "swiglu", "normalization", "position_embedding_type", "dtype")


@functools.lru_cache(maxsize=None)
def model_recipe(model: str, variant: str = "mha") -> ModelRecipe:
    """The model section of bench model `model`'s recipe; for `gqa` with the GQA variant's KV
    groups. Raises SystemExit when a GQA recipe is another model than the MHA one."""
    from ..training.recipe import load_recipe

    spec = MODELS[model]
    base = load_recipe(os.path.join(REPO_ROOT, spec.recipe)).model
    if variant == "mha":
        return base
    if not isinstance(spec.gqa, str):
        return dataclasses.replace(base, num_query_groups=spec.gqa)
    gqa = load_recipe(os.path.join(REPO_ROOT, spec.gqa)).model
    same = dataclasses.replace(gqa, num_query_groups=base.num_query_groups, seq_length=base.seq_length)
    if same != base:
        diff = [f"{k}: {v!r} vs {getattr(base, k)!r}" for k, v in dataclasses.asdict(same).items() if getattr(base, k) != v]
        raise SystemExit(f"bench: {spec.gqa} must be {spec.recipe}'s model with other KV groups; it differs in "
                         + ", ".join(diff))
    return gqa


def model_config(model: str) -> dict:
    """What a run records of its model (the report's and `plan validate`'s `model_config`)."""
    spec, m = MODELS[model], model_recipe(model)
    return dict(hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                gqa_groups=model_recipe(model, "gqa").num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
                vocab_size=m.vocab_size, dtype=m.dtype, layers=spec.layers, seq=spec.seq)


def model_overrides(model: str, variant: str, layers: int, seq: int) -> List[str]:
    """The recipe overrides of a row's model: the bench model's recipe with `layers` and `seq`."""
    m = dataclasses.replace(model_recipe(model, variant), num_layers=layers, seq_length=seq)
    default = ModelRecipe()
    keys = list(ROW_MODEL_KEYS) + [f.name for f in dataclasses.fields(m)
                                   if f.name not in ROW_MODEL_KEYS and getattr(m, f.name) != getattr(default, f.name)]
    return [f"model.{k}={_yaml_value(getattr(m, k))}" for k in keys]


def parse_seq(text: str) -> int:
    t = text.strip().upper()
    if t.endswith("K"):
        return int(float(t[:-1]) * K)
    if t.endswith("M"):
        return int(float(t[:-1]) * K * K)
    return int(t)


def seq_label(s: int) -> str:
    return f"{s // K}K" if s % K == 0 and s >= K else str(s)


def model_shape(model: str, variant: str, layers: int, seq: int) -> ModelShape:
    return dataclasses.replace(model_recipe(model, variant).shape(), num_layers=layers, seq_length=seq)


# -- FLOPs: the planner's model (planner/flops.py), so bench and plan report the same MFU ---------

def model_flops(shape, seq_length: Optional[int] = None, batch: int = 1) -> dict:
    """Model FLOPs of one training step of `shape` (a `config.ModelShape`): planner.flops.model_flops, whose
    docstring says what is counted (attention backward = 2 x forward, no recompute)."""
    seq = shape.seq_length if seq_length is None else seq_length
    per_layer = layer_matmul_params(shape.hidden_size, shape.num_attention_heads, shape.ffn_hidden_size,
                                    groups=shape.num_query_groups, gated=shape.swiglu)
    q_dim = shape.hidden_size // shape.num_attention_heads * shape.num_attention_heads
    return flops_of(layers=shape.num_layers, matmul_params_per_layer=per_layer, q_dim=q_dim, hidden=shape.hidden_size,
                    vocab=shape.vocab_size, seq=seq, batch=batch)


# -- planning ----------------------------------------------------------------------------------

def plan_rows(args) -> List[dict]:
    """Every (layout, variant, S) row, in run order: variant by variant (MHA first), layout by
    layout in the order given, S upward."""
    seqs = sorted({parse_seq(s) for s in args.seq.split(",") if s.strip()})
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    variants = [x.strip() for x in args.variants.split(",") if x.strip()]
    gqa_layouts = None if args.gqa_layouts == "all" else {x.strip() for x in args.gqa_layouts.split(",")}
    for name in layouts:
        if name not in LAYOUTS:
            raise SystemExit(f"bench: unknown layout {name!r}; declared: {', '.join(LAYOUTS)}")
    for v in variants:
        if v not in ("mha", "gqa"):
            raise SystemExit(f"bench: unknown variant {v!r} (mha, gqa)")
    n = args.gpus
    layers = args.layers or MODELS[args.model].layers
    rows = []
    for variant in variants:
        for name in layouts:
            lay = LAYOUTS[name]
            if variant == "gqa" and gqa_layouts is not None and name not in gqa_layouts:
                continue
            for S in seqs:
                overrides = model_overrides(args.model, variant, layers, S) + [
                    "train.distributed_optimizer=true", "train.micro_batch_size=1", "train.global_batch_size=1",
                    f"train.steps={args.warmup + args.steps}", "train.lr=0.0003", "train.log_interval=1000000",
                    "train.progress_bar=false", "parallel.baseline_attention=sdpa",
                ] + [o.format(n=n, half=max(n // 2, 1)) for o in lay.overrides]  # last: a layout may override the rest
                rows.append({"id": f"{name}/{variant}/{seq_label(S)}", "layout": name, "variant": variant, "seq": S,
                             "label": lay.label.format(n=n, half=max(n // 2, 1)), "layers": layers,
                             "probe": lay.probe, "overrides": overrides})
    return rows


def availability(row: dict, world: int) -> Optional[str]:
    """None if the installed recipe accepts the row's keys for this world size, else the reason."""
    from ..training.recipe import RecipeError, load_recipe

    try:
        load_recipe(None, row["overrides"]).check(world)
    except RecipeError as e:
        return str(e)
    except Exception as e:  # a recipe check that fails otherwise is as unavailable
        return f"{type(e).__name__}: {e}"
    return None


def estimate_seconds(rows: List[dict], model: str, warmup: int, steps: int) -> float:
    """Rough wall time on 4 x H200: ~30 s to start torchrun, and per row ~3 s (build, probe) plus
    (warmup + steps) steps at TSP's measured rate (7B, 32 layers, D=4: 1.43 s at 16K, 7.41 s at
    64K, fitted as (0.0806*S + 0.00055*S^2) s with S in K tokens), scaled by layers/32. Baselines
    are mostly faster, so this is an upper estimate when nothing goes out of memory."""
    if model != "7b":
        return 20.0 + len(rows) * (3.0 + 0.3 * (warmup + steps))
    total = 30.0
    for r in rows:
        sk = r["seq"] / K
        step = (0.0806 * sk + 0.00055 * sk * sk) * r["layers"] / 32
        if r["layout"] == "tsp_compute_only":
            step *= 0.8
        total += 3.0 + (warmup + steps) * step
    return total


def row_base(row: dict, status: str, note: str = "", measured: bool = True, **extra) -> dict:
    rec = {"kind": "row", "id": row["id"], "layout": row["layout"], "variant": row["variant"], "seq": row["seq"],
           "label": row["label"], "layers": row["layers"], "status": status, "note": note}
    if not measured:
        rec["measured"] = False
    rec.update(extra)
    return rec


# -- records --------------------------------------------------------------------------------------

def git_commit() -> str:
    """BENCH_COMMIT when set (the GPU machine's copy of the tree may carry a stale .git), else git."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def read_records(path: str) -> List[dict]:
    recs = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill
                        pass
    return recs


def append_record(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
