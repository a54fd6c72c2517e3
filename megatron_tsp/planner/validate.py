"""Predicted vs measured: reads every benchmark JSON in `benchmarks/results/` and writes
`docs/plan_validation.md`.

    python -m megatron_tsp.cli plan validate [--results DIR] [--out FILE]

A benchmark JSON is a list of rows, or an object with `rows` (or `results`) and optional
file-level `model` ({"recipe": path} or ModelShape / planner field names), `train`,
`hardware` (a profile name), `memory_unit` (GiB, the default, or GB). A row names its layout
(`tsp`, `tp`, `tp_sp`, `cp`, `tp_cp`, `fsdp_cp`, or a planner spelling like `tp2xcp2`) with
`size` / `tsp_size` / `tp_size` / `cp_size`, the sequence length (`seq_len` or `seq_length`),
and what was measured: `peak_allocated_gb` (or `peak_mem_gb`), `step_time_s` (or
`median_step_time_s`), or `oom: true`; `tsp_mlp_exchange` (row or `train`, default auto) is the
TSP MLP exchange the run used. Rows that cannot be read are listed, not dropped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .. import layouts
from . import hardware as hw_mod
from .formulas import GIB, mlp_exchange
from .model import MODEL_KEYS, Cluster, Layout, ModelSpec, PlanError, TrainSpec
from .plan import plan_layout

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MEMORY_BOUND, TIME_BOUND = 0.10, 0.25

# Why a row is outside the bounds (or measured on other code), when it is known: its source
# (a key ending in "/" covers every row whose source starts with it) -> text.
_OLD_TSP = ("the planner models the current schedule (K/V all-gathers and dK/dV reduce-scatters one shard behind: "
            "b0bd17f; MLP ring hops hidden behind the shards' GEMMs where those are longer); ")
KNOWN_REASONS: Dict[str, str] = {
    "benchmarks/results/train_7b_h200x4.json#0":
        "Measured at commit 3c0c8d4: chunk attention on flash's lower-right kernel (~245 TFLOP/s, rect_lower_right), "
        "every K/V transfer synchronous, the MLP ring serialized with compute (`profile_7b_16k.md`, dc1ffe3); " + _OLD_TSP + "at the "
        "flash rate with the K/V transfers serial it predicts 1.110 s (-22.2%), with the ring serial too 1.334 s "
        "(-6.5%).",
    "benchmarks/results/train_7b_h200x4.json#2":
        "Measured at commit 3c0c8d4: chunk attention on flash's lower-right kernel (~245 TFLOP/s, rect_lower_right), "
        "every K/V transfer synchronous, the MLP ring serialized with compute (`profile_7b_16k.md`, dc1ffe3); " + _OLD_TSP + "at the "
        "flash rate with the K/V transfers serial it predicts 8.014 s (+8.1%), with the ring serial too 8.259 s "
        "(+11.4%).",
    "benchmarks/results/train_7b_h200x4.json#4":
        "Measured at commit 2eeb292: the forward's K/V all-gathers and the dK/dV reduce-scatters were synchronous "
        "(the backward's re-gathers already prefetched); " + _OLD_TSP + "with those serial it predicts 0.768 s "
        "(-21.0%), with the MLP ring serial too 0.963 s (-1.0%).",
    "benchmarks/results/bench_h200x4.json#fsdp_cp4/":
        "FSDP-over-CP's memory model is not updated yet. Probable causes, not checked on a GPU: `baselines/fsdp.py` "
        "casts the norm weights to bf16, so torch's RMSNorm can take its fused CUDA kernel (input + rstd saved, not "
        "two fp32 copies), and FSDP2 keeps bf16 gradients; with `--norm fused` and bf16 gradients the loss-point "
        "peak comes within 6% (16K) to 2% (128K), and the predicted layer point (two gathered layers and an fp32 "
        "layer gradient) is above every measured peak.",
}


def known_reason(source: str) -> Optional[str]:
    for key, text in KNOWN_REASONS.items():
        if source == key or (key.endswith("/") and source.startswith(key)):
            return text
    return None


# The paper's 8 x MI300X table (docs/design.md §1), peak GB per GPU.
PAPER = {
    16384: {"tsp8": 31.0, "tp8": 31.5},
    131072: {"tsp8": 38.8, "tp8": 70.0, "tp_sp8": 85.0, "tp2xcp4": 140.0, "tp4xcp2": 140.0},
}

# older result files name the model's fields with the planner's former short names
_OLD_MODEL_KEYS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                   "kv_groups": "num_query_groups", "ffn": "ffn_hidden_size", "vocab": "vocab_size", "gated": "swiglu",
                   "tied_embeddings": "share_embeddings_and_output_weights"}


@dataclass
class Measurement:
    source: str
    model: Optional[ModelSpec] = None
    layout: Optional[Layout] = None
    train: Optional[TrainSpec] = None
    world: Optional[int] = None
    hardware: str = "h200x4"
    peak_gib: Optional[float] = None
    step_time_s: Optional[float] = None
    oom: bool = False
    compute_only: bool = False  # TSP with every collective skipped: compared with the predicted compute alone
    problem: Optional[str] = None
    raw: dict = field(default_factory=dict)


_recipe_cache: Dict[str, Tuple[ModelSpec, int]] = {}


def _model(spec: dict) -> Tuple[ModelSpec, Optional[int]]:
    if "recipe" in spec:
        path = spec["recipe"] if os.path.isabs(spec["recipe"]) else os.path.join(ROOT, spec["recipe"])
        if path not in _recipe_cache:
            _recipe_cache[path] = ModelSpec.from_recipe(path)
        return _recipe_cache[path]
    kw = {}
    for k, v in spec.items():
        k = _OLD_MODEL_KEYS.get(k, k)
        if k in MODEL_KEYS:
            kw[k] = v
    return ModelSpec(**kw), spec.get("seq_length") or spec.get("seq_len")


_OLD_KINDS = {"cp_fsdp": "fsdp_cp", "fsdp": "fsdp_cp", "tpxcp": "tp_cp"}  # older files' names of planner kinds


def _layout(row: dict) -> Layout:
    """A measurement row's layout: a spelling with its sizes (`tsp4`, Layout.parse), or a planner
    kind with each size in its own column (`tsp_size`, `tp_size`, `cp_size`; a kind of one size
    also `size`, TP x CP also `tp`, `cp`)."""
    text = str(row.get("layout", "")).strip().lower().replace("+", "_").replace("-", "_").replace(" ", "")
    size = row.get("size")
    if any(ch.isdigit() for ch in text):
        return Layout.parse(text)
    kind = _OLD_KINDS.get(text, text)
    if kind not in layouts.PLANNER_KINDS:
        raise PlanError(f"layout {row.get('layout')!r} is not understood")
    sizes = layouts.PLANNER_KINDS[kind][1].sizes
    return Layout(kind, **{s: int(row.get(s if s.endswith("_size") else f"{s}_size")
                                   or (size if len(sizes) == 1 else row.get(s))) for s in sizes})


def _bench_rows(data: dict) -> List[dict]:
    """`megatron-tsp bench` JSON -> this module's row format (model, layout, train per row)."""
    meta = data["meta"]
    mc = meta["model_config"]
    out = []
    for row in data.get("rows", []):
        r = {"bench_id": row.get("id")}
        parallel = row.get("recipe_parallel") or {}
        compute_only = bool(parallel.get("tsp_compute_only"))
        layout = layouts.planner_spelling(parallel) if parallel else None
        exchange = parallel.get("tsp_mlp_exchange", "auto")
        if compute_only and exchange == "auto":
            exchange = "ring"  # TSPMLP.exchange: compute-only keeps TSP's own exchanges
        if layout is None:
            r["unsupported"] = f"bench layout {row.get('layout')!r} is not a planner layout"
        elif row.get("status") not in ("ok", "oom"):
            r["unsupported"] = f"bench row {row.get('status')}: {row.get('note', '')}"[:160]
        gqa = row.get("variant") == "gqa"
        r.update(layout=layout or row.get("layout"), seq_len=row.get("seq"),
                 model={"layers": row.get("layers") or meta.get("layers"), "hidden": mc["hidden_size"],
                        "heads": mc["num_attention_heads"],
                        "kv_groups": mc["gqa_groups"] if gqa else mc["num_attention_heads"],
                        "ffn": mc["ffn_hidden_size"], "vocab": mc["vocab_size"], "dtype": mc["dtype"]},
                 train={"micro_batch_size": 1, "global_batch_size": 1, "distributed_optimizer": True,
                        "recompute": "none", "tsp_mlp_exchange": exchange},
                 compute_only=compute_only,
                 world_size=row.get("world") or meta.get("gpus"), oom=row.get("status") == "oom",
                 peak_allocated_gb=row.get("peak_alloc_gb"), step_time_s=row.get("median_step_s"))
        out.append(r)
    return out


def load_file(path: str) -> List[Measurement]:
    rel = os.path.relpath(path, ROOT)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return [Measurement(source=rel, problem=f"not readable as JSON: {e}")]
    if isinstance(data, dict) and isinstance(data.get("meta"), dict) and "model_config" in data["meta"]:
        data = {"rows": _bench_rows(data)}
    top = data if isinstance(data, dict) else {}
    rows = data if isinstance(data, list) else (data.get("rows") or data.get("results") or [])
    if not isinstance(rows, list) or not rows:
        return [Measurement(source=rel, problem="no rows")]
    scale = 1e9 / GIB if str(top.get("memory_unit", "GiB")) == "GB" else 1.0
    out = []
    for i, row in enumerate(rows):
        tag = row.get("bench_id") if isinstance(row, dict) and row.get("bench_id") else i
        m = Measurement(source=f"{rel}#{tag}", hardware=row.get("hardware") or top.get("hardware") or "h200x4", raw=row)
        try:
            if not isinstance(row, dict):
                raise PlanError("a row must be an object")
            if row.get("unsupported"):
                raise PlanError(row["unsupported"])
            spec = row.get("model") or ({"recipe": row["recipe"]} if "recipe" in row else None) or top.get("model") \
                or ({"recipe": top["recipe"]} if "recipe" in top else None)
            if not spec:
                raise PlanError("no model (give model or recipe)")
            m.model, seq = _model(spec)
            m.layout = _layout(row)
            tr = dict(top.get("train") or {}, **(row.get("train") or {}))
            seq = row.get("seq_len") or row.get("seq_length") or seq
            # the rows name the old planner's `recompute` (auto: TSP block, baselines none; none:
            # TSP saves; full: TSP block, baselines Megatron's full) or the recipe keys; rows
            # measured before lean norms ran torch's composite norm (their `norm`, default torch)
            old = row.get("recompute", tr.get("recompute", "auto"))
            tsp_rec = "none" if old in ("none", "save") else "full"
            layer_rec = "full" if old == "full" else "none"
            get = lambda k, d: row.get(k, tr.get(k, d))  # noqa: E731
            m.train = TrainSpec(seq_length=int(seq), micro_batch_size=int(tr.get("micro_batch_size", 1)),
                                global_batch_size=tr.get("global_batch_size"),
                                distributed_optimizer=bool(get("distributed_optimizer", False)),
                                recompute=get("layer_recompute", layer_rec), tsp_recompute=get("tsp_recompute", tsp_rec),
                                recompute_method=get("recompute_method", "uniform"),
                                recompute_num_layers=get("recompute_num_layers", None),
                                offload_activations=bool(get("offload_activations", False)),
                                tsp_lm_head=get("tsp_lm_head", "megatron"), norm=get("norm", "torch"),
                                tsp_mlp_exchange=get("tsp_mlp_exchange", "auto"))
            m.world = int(row.get("world_size") or top.get("world_size") or m.layout.size)
            m.compute_only = bool(row.get("compute_only"))
            m.oom = bool(row.get("oom")) or "failed_rc" in row and "oom" in str(row).lower()
            peak = row.get("peak_allocated_gb", row.get("peak_mem_gb"))
            m.peak_gib = None if peak is None else float(peak) * scale
            t = row.get("step_time_s", row.get("median_step_time_s"))
            m.step_time_s = None if t is None else float(t)
            if not m.oom and m.peak_gib is None and m.step_time_s is None:
                raise PlanError("nothing measured (no peak_allocated_gb, step_time_s or oom)")
        except (PlanError, KeyError, TypeError, ValueError) as e:
            m.problem = str(e)
        out.append(m)
    return out


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def validate(results_dir: str) -> Tuple[List[dict], List[Measurement]]:
    rows, bad = [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        for m in load_file(path):
            if m.problem:
                bad.append(m)
                continue
            try:
                hw = hw_mod.load(m.hardware)
                gpn = min(m.world, hw.gpus_per_node) if m.world <= hw.gpus_per_node else hw.gpus_per_node
                cluster = Cluster(gpus_per_node=gpn, nodes=max(1, m.world // gpn))
                p = plan_layout(m.model, m.train, m.layout, cluster, hw)
            except PlanError as e:
                m.problem = str(e)
                bad.append(m)
                continue
            r = {"m": m, "plan": p, "pred_peak": p.memory.peak / GIB, "pred_time": p.time["as_implemented"],
                 "capacity": hw.gpu_memory_gib}
            if m.compute_only:  # its buffers differ (no other shard arrives): time only, against the compute
                r["pred_peak"], r["pred_time"] = None, compute_seconds(p.time)
            r["mem_err"] = None if m.peak_gib is None or r["pred_peak"] is None else _err(r["pred_peak"], m.peak_gib)
            r["time_err"] = None if m.step_time_s is None else _err(r["pred_time"], m.step_time_s)
            r["mem_ok"] = (not p.fits) if m.oom else (r["mem_err"] is None or abs(r["mem_err"]) <= MEMORY_BOUND)
            r["time_ok"] = r["time_err"] is None or abs(r["time_err"]) <= TIME_BOUND
            rows.append(r)
    return rows, bad


def compute_seconds(t: dict) -> float:
    """The predicted step without its communication."""
    return sum(t[k] for k in ("matmul_s", "attention_s", "elementwise_s", "optimizer_s"))


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def paper_section() -> List[str]:
    """The paper's 8-GPU 7B setting: our predictions against the published peaks, with the
    norms as they run here (torch composite) and fused (TE / apex, as a ROCm or TE build has)."""
    hw = hw_mod.load("h200x4")
    model = ModelSpec(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=16384, vocab_size=32000, name="7b")
    cluster = Cluster(gpus_per_node=8, gpu_memory_gib=192 * 1e9 / GIB)
    lines = ["| S | layout | published (GB) | predicted, torch norms (GB) | ratio | predicted, fused norms (GB) | ratio |",
             "|---|---|---|---|---|---|---|"]
    preds: Dict[Tuple[str, int, str], float] = {}
    for S, table in PAPER.items():
        for key in ("tsp8", "tp8", "tp_sp8", "tp2xcp4", "tp4xcp2"):
            lay = Layout.parse(key)
            cells = []
            for norm in ("torch", "fused"):  # TSP with the paper's exchange: weights move (the ring)
                gb = plan_layout(model, TrainSpec(seq_length=S, norm=norm, tsp_mlp_exchange="ring", tsp_recompute="full", tsp_lm_head="megatron"),
                        lay, cluster, hw).memory.peak / 1e9
                preds[(norm, S, key)] = gb
                pub = table.get(key)
                cells += [f"{gb:.1f}", "-" if pub is None else f"{gb / pub:.2f}"]
            pub = table.get(key)
            lines.append(f"| {S // 1024}K | {lay.label} | {pub if pub is not None else '-'} | " + " | ".join(cells) + " |")
    lines.append("")
    for norm in ("torch", "fused"):
        g = lambda S, k: preds[(norm, S, k)]  # noqa: E731
        for tp_key, what in (("tp8", "TP = Megatron TP without sequence parallelism"),
                             ("tp_sp8", "TP = Megatron TP + sequence parallelism")):
            ok = g(131072, "tsp8") < g(131072, tp_key) < min(g(131072, "tp2xcp4"), g(131072, "tp4xcp2"))
            ok16 = g(16384, "tsp8") < g(16384, tp_key)
            lines.append(f"- {norm} norms, {what}: TSP < TP < TP x CP at 128K **{'reproduced' if ok else 'not reproduced'}**; "
                         f"TSP < TP at 16K **{'reproduced' if ok16 else 'not reproduced'}**.")
    return lines


def tsp_overlap_section(rows: List[dict]) -> List[str]:
    """TSP against its compute-only run (same file, model, S): the measured cost of communication
    beside the predicted exposed communication, and the predicted compute beside the measured."""
    by = {}
    for r in rows:
        m = r["m"]
        if m.layout.record.uses_tsp and m.step_time_s is not None:
            by.setdefault((m.source.split("#")[0], m.model, m.train.seq_length), {})[m.compute_only] = r
    pairs = [(k, v[False], v[True]) for k, v in by.items() if len(v) == 2]
    if not pairs:
        return []
    out = ["", "## TSP: communication cost, measured against the compute-only run", "",
           "The compute-only run skips every TSP collective (MLP by ring). Measured TSP - compute-only is what "
           "communication costs the step, overlapped or not (where TSP ran the tokens MLP it also holds that "
           "change); the model hides overlapped transfers completely, so its exposed time is a lower bound of "
           "that cost.", "",
           "| S | model | MLP exchange | measured TSP | measured compute-only | difference | predicted compute (ring) "
           "| error | predicted exposed comm |", "|---|---|---|---|---|---|---|---|---|"]
    for (_, model, S), tsp, alone in sorted(pairs, key=lambda x: (x[0][1].groups, x[0][2])):
        t = tsp["plan"].time
        diff = tsp["m"].step_time_s - alone["m"].step_time_s
        kv = "MHA" if model.groups == model.num_attention_heads else f"GQA {model.groups}"
        out.append(f"| {S // 1024}K | {kv} | {mlp_exchange(tsp['m'].train, tsp['m'].layout)} | "
                   f"{tsp['m'].step_time_s:.3f} | {alone['m'].step_time_s:.3f} | {1e3 * diff:.1f} ms | "
                   f"{alone['pred_time']:.3f} | {_pct(alone['time_err'])} | {1e3 * t['comm_exposed_s']:.1f} ms |")
    return out


def render(rows: List[dict], bad: List[Measurement], results_dir: str) -> str:
    hw = hw_mod.load("h200x4")
    out = ["# Planner validation: predicted vs measured", "",
           "Regenerate with `python -m megatron_tsp.cli plan validate` (reads every `benchmarks/results/*.json`; "
           "formulas in `docs/planner.md`). Memory is GiB (2^30 bytes, `torch.cuda.max_memory_allocated`, the "
           "training logs' \"GB\"); step time is the predicted time with the overlap the code has today (\"as run\"). "
           f"Bounds: peak memory within {100 * MEMORY_BOUND:.0f}%, step time within {100 * TIME_BOUND:.0f}%. "
           "An OOM row agrees when the predicted peak exceeds the GPU's memory.", "",
           f"Hardware profile `configs/hardware/{hw.name}.yaml`: matmul {hw.matmul_tflops:g} TFLOP/s, attention "
           + ", ".join(f"{k} {v:g}" for k, v in hw.attention_tflops.items())
           + f" TFLOP/s, HBM {hw.hbm_tb_s:g} TB/s x elementwise efficiency {hw.elementwise_efficiency:g}. "
           "The matmul and attention rates and the link bandwidths are measured by `benchmarks/measure_hardware.py`; "
           "the elementwise efficiency is the one fitted constant (the TP+SP 16K profile, "
           "`benchmarks/results/profile_7b_16k.md`). Memory uses no fitted constant.", "",
           "| source | layout | S | measured peak | predicted peak | error | ok | measured step (s) | predicted (s) | error | ok | predicted peak at |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    outside = []
    for r in rows:
        m, p = r["m"], r["plan"]
        meas_peak = "OOM" if m.oom else ("-" if m.peak_gib is None else f"{m.peak_gib:.1f}")
        pred_peak = "-" if r["pred_peak"] is None else \
            f"{r['pred_peak']:.1f}" + (" (> {:.0f}: OOM)".format(r["capacity"]) if not p.fits else "")
        label = m.layout.label + (", comm skipped (predicted: compute alone)" if m.compute_only else "")
        out.append(f"| {m.source} | {label} | {m.train.seq_length // 1024}K | {meas_peak} | {pred_peak} | "
                   f"{_pct(r['mem_err'])} | {'yes' if r['mem_ok'] else 'NO'} | "
                   f"{'-' if m.step_time_s is None else f'{m.step_time_s:.3f}'} | {r['pred_time']:.3f} | "
                   f"{_pct(r['time_err'])} | {'yes' if r['time_ok'] else 'NO'} | {p.memory.peak_point} |")
        if not (r["mem_ok"] and r["time_ok"]):
            outside.append(r)
    out += ["", "## Rows outside the bounds", ""]
    if not outside:
        out.append("None.")
    for r in outside:
        m, p = r["m"], r["plan"]
        reason = known_reason(m.source)
        if reason is None:
            t = p.time
            parts = {k: t[k] for k in ("matmul_s", "attention_s", "elementwise_s", "comm_exposed_s", "optimizer_s")}
            reason = ("not yet explained; predicted breakdown " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in parts.items())
                      + f"; peak at {p.memory.peak_point}")
        out.append(f"- {m.source} {m.layout.label} {m.train.seq_length // 1024}K: memory {_pct(r['mem_err'])}, "
                   f"time {_pct(r['time_err'])}. {reason}")
    older = [r for r in rows if r not in outside and known_reason(r["m"].source)]
    if older:
        out += ["", "## Rows within the bounds, measured on older code", ""]
        out += [f"- {r['m'].source} {r['m'].layout.label} {r['m'].train.seq_length // 1024}K: time {_pct(r['time_err'])}. "
                f"{known_reason(r['m'].source)}" for r in older]
    out += tsp_overlap_section(rows)
    if bad:
        out += ["", "## Rows not evaluated", ""] + [f"- {m.source}: {m.problem}" for m in bad]
    out += ["", "## Predicted time breakdown (s per step)", "",
            "| source | layout | S | matmul | attention | memory-bound | comm (all) | comm exposed | optimizer | no overlap | as run | full overlap |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, t = r["m"], r["plan"].time
        out.append(f"| {m.source} | {m.layout.label} | {m.train.seq_length // 1024}K | {t['matmul_s']:.3f} | {t['attention_s']:.3f} | "
                   f"{t['elementwise_s']:.3f} | {t['comm_s']:.3f} | {t['comm_exposed_s']:.3f} | {t['optimizer_s']:.3f} | "
                   f"{t['no_overlap']:.3f} | {t['as_implemented']:.3f} | {t['full_overlap']:.3f} |")
    out += ["", "## The paper's 8-GPU 7B setting", "",
            "Model h=4096, 32 layers, 32 heads (MHA), gated MLP f=16384, V=32000 (the paper's vocabulary is not "
            "public; 32000 assumed), bf16, micro-batch 1, 8 GPUs in one node, Adam with fp32 master weights and fp32 "
            "gradients as our driver runs it (not distributed), TSP's MLP by the ring (the paper's exchange; `auto` "
           "would move the tokens at 16K, D = 8). Published numbers: 8 x MI300X (docs/design.md §1), "
            "unit \"GB\" (taken as 10^9 bytes; if they are GiB the ratios grow by 7%).", ""]
    out += paper_section()
    out += ["", "Why the numbers differ: `docs/planner.md`, section \"The paper's table\"."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-tsp plan validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "plan_validation.md"))
    args = p.parse_args(argv)
    rows, bad = validate(args.results)
    text = render(rows, bad, args.results)
    with open(args.out, "w") as f:
        f.write(text)
    n_out = sum(1 for r in rows if not (r["mem_ok"] and r["time_ok"]))
    print(f"wrote {args.out}: {len(rows)} rows, {n_out} outside the bounds, {len(bad)} not evaluated")
    return 0



