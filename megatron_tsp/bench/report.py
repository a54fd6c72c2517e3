"""The reports of `megatron-tsp bench`: rows and targets from the records, the markdown table,
the results block of a page (`--readme docs/bench.md`) and the plot."""

from __future__ import annotations

import json
import os
from typing import List, Optional

from .rows import K, MODELS, model_config, read_records, seq_label


# -- reports -----------------------------------------------------------------------------------

TARGETS_DOC = """\
Targets (ratios within this run; memory = peak allocated per GPU, the maximum over ranks):
1. TSP peak <= 0.6 x TP at 128K.
2. TSP peak <= CP and <= TP x CP at every S >= 64K.
3. TSP peak within 5% of TP+SP (read as: TSP <= 1.05 x TP+SP at every S where both ran).
4. TSP step time <= 1.0 x TP+SP at every S >= 64K, and <= 1.1 x at 16K.
5. TSP step time <= 1.15 x its compute-only time (tsp_compute_only) at every S >= 32K.
6. Attention MFU at 128K >= 40% of the measured bf16 matmul peak (TSP's attention kernel alone,
   model FLOPs of forward + backward, from the attention probe).
A baseline that runs out of memory where TSP does not counts as reached for the memory targets
and as not comparable for the time targets."""


def collect(records: List[dict]):
    """(meta, device records, rows): the last meta (a --resume appends one), the last record of
    each row, rows ordered MHA first, layouts in the order the plans first named them, S upward."""
    metas = [r for r in records if r.get("kind") == "meta"]
    meta = dict(metas[-1]) if metas else {}
    if len(metas) > 1:
        meta["commands"] = [m.get("command") for m in metas]
    devices = [r for r in records if r.get("kind") == "device"]
    rows, commit = {}, None
    for r in records:
        if r.get("kind") == "meta":
            commit = r.get("commit")
        elif r.get("kind") == "row":
            rows[r["id"]] = dict(r, run_commit=commit)  # the last record of a row wins; its run's commit
    layout_order = {}
    for m in metas:
        for rid in m.get("plan", []):
            layout_order.setdefault(rid.split("/")[0], len(layout_order))
    ordered = sorted(rows.values(), key=lambda r: (r["variant"] != "mha", r["variant"],
                                                   layout_order.get(r["layout"], 1e9), r["layout"], r["seq"]))
    return meta, devices, ordered


def _commits(rows: List[dict], meta: dict) -> str:
    """The commit of the run, or, when --resume runs of several commits are merged, which rows
    each measured."""
    by_commit = {}
    for r in rows:
        if r["status"] != "unavailable":
            by_commit.setdefault(r.get("run_commit") or meta.get("commit", "?"), []).append(r["id"])
    if len(by_commit) <= 1:
        return f"`{next(iter(by_commit), meta.get('commit', '?'))}`"
    return "; ".join(f"`{c}`: {', '.join(ids)}" for c, ids in by_commit.items())


def _find(rows, layout, variant, seq):
    return next((r for r in rows if r["layout"] == layout and r["variant"] == variant and r["seq"] == seq), None)


def _ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    if a and b and a["status"] == "ok" and b["status"] == "ok" and a.get(key) and b.get(key):
        return a[key] / b[key]
    return None


def evaluate_targets(rows: List[dict]) -> List[dict]:
    """Each target: verdict 'reached' / 'not reached' / 'not measured' and the numbers behind it."""
    out = []
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "mha", v))
    seqs = sorted({r["seq"] for r in rows})

    def status(r):
        return None if r is None else r["status"]

    def compare(name, variant, base, at, key, bound, oom_base_ok):
        verdicts, details = [], []
        for S in at:
            t, b = _find(rows, "tsp", variant, S), _find(rows, base, variant, S)
            if status(t) == "ok" and status(b) == "ok" and not (t[key] and b[key]):
                verdicts.append(None)
                details.append(f"{seq_label(S)}: no {key} figures (CPU run)")
            elif status(t) == "ok" and status(b) == "ok":
                ratio = t[key] / b[key]
                verdicts.append(ratio <= bound)
                details.append(f"{seq_label(S)}: {ratio:.2f}")
            elif status(t) == "ok" and status(b) == "oom":
                verdicts.append(True if oom_base_ok else None)
                details.append(f"{seq_label(S)}: {base} OOM" + ("" if oom_base_ok else " (not comparable)"))
            elif status(t) == "oom":
                verdicts.append(False)
                details.append(f"{seq_label(S)}: TSP OOM")
            else:
                verdicts.append(None)
                details.append(f"{seq_label(S)}: {base} {status(b) or 'not planned'}, TSP {status(t) or 'not planned'}")
        measured = [v for v in verdicts if v is not None]
        if not at:
            verdict = "not measured"
            details = ["no sequence length in range"]
        elif not measured:
            verdict = "not measured"
        elif not all(measured):
            verdict = "not reached"
        else:
            verdict = "reached" if len(measured) == len(verdicts) else "reached where measured"
        out.append({"target": name, "variant": variant, "verdict": verdict, "detail": "; ".join(details)})

    for v in variants:
        planned = {r["layout"] for r in rows if r["variant"] == v}
        if "tsp" not in planned:
            continue
        if "tp" in planned:
            compare("1. TSP peak <= 0.6 x TP at 128K", v, "tp", [s for s in seqs if s == 128 * K], "peak_alloc_gb", 0.6, True)
        for base in ("cp4", "tp2_cp2"):
            if base in planned:
                compare(f"2. TSP peak <= {base} at S >= 64K", v, base, [s for s in seqs if s >= 64 * K],
                        "peak_alloc_gb", 1.0, True)
        if "tp_sp" in planned:
            compare("3. TSP peak <= 1.05 x TP+SP", v, "tp_sp", seqs, "peak_alloc_gb", 1.05, True)
            compare("4a. TSP step <= 1.0 x TP+SP at S >= 64K", v, "tp_sp", [s for s in seqs if s >= 64 * K],
                    "median_step_s", 1.0, False)
            compare("4b. TSP step <= 1.1 x TP+SP at 16K", v, "tp_sp", [s for s in seqs if s == 16 * K],
                    "median_step_s", 1.1, False)
        if "tsp_compute_only" in planned:
            compare("5. TSP step <= 1.15 x compute-only at S >= 32K", v, "tsp_compute_only",
                    [s for s in seqs if s >= 32 * K], "median_step_s", 1.15, False)
        t = _find(rows, "tsp", v, 128 * K)
        if t is not None:
            p = t.get("attention_probe")
            if t["status"] == "ok" and p and "mfu" in p:
                out.append({"target": "6. attention MFU at 128K >= 40% of peak", "variant": v,
                            "verdict": "reached" if p["mfu"] >= 0.4 else "not reached",
                            "detail": f"{100 * p['mfu']:.1f}% ({p['tflops']:.0f} TFLOP/s of {t['peak_tflops']:.0f})"})
            else:
                out.append({"target": "6. attention MFU at 128K >= 40% of peak", "variant": v, "verdict": "not measured",
                            "detail": f"TSP 128K {t['status']}" + ("" if t["status"] != "ok" else
                                                                    f", probe: {(p or {}).get('error', 'not run')}")})
    return out


def _fmt(x, spec, empty="-"):
    return empty if x is None else format(x, spec)


def on_gpus(devices: List[dict]) -> bool:
    """Whether the rows ran on GPUs: CPU runs (gloo) have no GPU memory, no bf16 peak and no MFU."""
    return bool(devices) and devices[0].get("backend") == "nccl"


GPU_ONLY_COLUMNS = ("alloc GiB", "reserved GiB", "MFU", "alloc / TP+SP")


def _results_table(rows: List[dict], gpu: bool = True) -> List[str]:
    lines = _results_table_all(rows)
    if gpu:
        return lines
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    keep = [i for i, c in enumerate(head) if c not in GPU_ONLY_COLUMNS]
    out = []
    for ln in lines:
        cells = ln.strip()[1:-1].split("|")
        if cells[5].strip() == "-":  # a row that did not run: its status word moves to the step column
            cells[5] = cells[3]
        out.append("|" + "|".join(cells[i] for i in keep) + "|")
    return [ln.replace("tok/s/GPU", "tok/s/process") for ln in out]


def _results_table_all(rows: List[dict]) -> List[str]:
    lines = ["| layout | variant | S | alloc GiB | reserved GiB | step s | tok/s/GPU | MFU | alloc / TP+SP | step / TP+SP | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    shown_unavailable = set()
    for r in rows:
        base = _find(rows, "tp_sp", r["variant"], r["seq"])
        if r["status"] == "unavailable":  # one line per layout and variant
            key = (r["layout"], r["variant"], r.get("note"))
            if key in shown_unavailable:
                continue
            shown_unavailable.add(key)
            seqs = [x["seq"] for x in rows if (x["layout"], x["variant"], x.get("note")) == key]
            r = dict(r, seq_text=", ".join(seq_label(x) for x in seqs))
        if r["status"] == "ok":
            ra, rs = _ratio(r, base, "peak_alloc_gb"), _ratio(r, base, "median_step_s")
            if base and base["status"] == "oom" and r["layout"] != "tp_sp":
                ra_s = rs_s = "TP+SP OOM"
            else:
                ra_s, rs_s = _fmt(ra, ".2f"), _fmt(rs, ".2f")
            lines.append(f"| {r['label']} | {r['variant']} | {seq_label(r['seq'])} | {r['peak_alloc_gb']:.1f} | "
                         f"{r['peak_reserved_gb']:.1f} | {r['median_step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                         f"{100 * r['mfu']:.1f}% | {ra_s} | {rs_s} | |")
        else:
            word = {"oom": "OOM", "unavailable": "unavailable", "timeout": "timeout", "error": "error",
                    "skipped": "skipped"}.get(r["status"], r["status"])
            note = (r.get("note") or "").replace("|", "/").replace("\n", " ")
            if r["status"] == "unavailable":
                note = note[:140] + ("..." if len(note) > 140 else "")
            lines.append(f"| {r['label']} | {r['variant']} | {r.get('seq_text') or seq_label(r['seq'])} | {word} | {word} | - | - | - "
                         f"| - | - | {note} |")
    return lines


def _targets_table(targets: List[dict]) -> List[str]:
    lines = ["| target | variant | verdict | detail |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['variant']} | **{t['verdict']}** | {t['detail']} |")
    return lines


README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def update_readme(readme: str, meta: dict, devices: List[dict], rows: List[dict], targets: List[dict],
                  md_path: str, png_path: Optional[str]) -> None:
    """Replace the block between the bench markers of `readme` (docs/bench.md) with this run's tables and plot."""
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"bench: {readme} has no {README_BEGIN} ... {README_END} block")
    here = os.path.dirname(os.path.abspath(readme))
    rel = lambda p: os.path.relpath(os.path.abspath(p), here)  # noqa: E731
    dev = devices[0] if devices else {}
    block = [README_BEGIN,
             " then ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command", "")]))
             + f" at commit `{str(meta.get('commit', '?'))[:12]}` on {dev.get('world', '?')} x "
             f"{dev.get('device', '?')}; {meta.get('layers')} layers of the 7B-class model, measured bf16 peak "
             f"{_fmt(dev.get('peak_tflops'), '.0f')} TFLOP/s. Full report: [{os.path.basename(md_path)}]({rel(md_path)}).", ""]
    if png_path:
        block += [f"![memory and throughput vs sequence length]({rel(png_path)})", ""]
    block += _results_table(rows) + [""] + _targets_table(targets) + [README_END]
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(readme, "w") as f:
        f.write(head + "\n".join(block) + tail)


def markdown(meta: dict, devices: List[dict], rows: List[dict], targets: List[dict]) -> str:
    dev = devices[0] if devices else {}
    gpu = on_gpus(devices)
    m = meta.get("model_config") or (model_config(meta["model"]) if meta.get("model") in MODELS else {})  # as recorded
    lines = [f"# megatron-tsp bench `{meta.get('tag', '?')}`", ""]
    lines += [
        "- **Command:** " + " then ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command", "?")])),
        f"- **Commit:** {_commits(rows, meta)}. **Started:** {meta.get('started', '?')}.",
        f"- **Device:** {dev.get('world', '?')} x {dev.get('device', '?')}"
        + (f" ({dev['total_memory_gb']:.0f} GiB each)" if dev.get("total_memory_gb") else "")
        + f", {dev.get('backend', '?')}; torch {dev.get('torch', meta.get('torch', '?'))}, CUDA {dev.get('cuda')}, NCCL {dev.get('nccl')}.",
        f"- **Measured peak:** {_fmt(dev.get('peak_tflops'), '.0f')} TFLOP/s ({dev.get('peak_what', '?')}; the largest of the"
        f" ranks: {', '.join(f'{p:.0f}' for p in dev.get('peak_tflops_per_rank', []))}).",
        f"- **Model:** h={m.get('hidden_size')}, {m.get('num_attention_heads')} heads (MHA; GQA: {m.get('gqa_groups')} KV groups),"
        f" SwiGLU FFN {m.get('ffn_hidden_size')}, vocab {m.get('vocab_size')}, RoPE, RMSNorm, {m.get('dtype')}, with embedding"
        f" and LM head; **{meta.get('layers')} layers**"
        + (" (a 7B model has 32: the per-GPU fixed costs, embedding, LM head logits and their optimizer state, weigh"
           " more here than in the full model)" if meta.get("model") == "7b" and meta.get("layers") != 32 else "")
        + ". Adam, Megatron's distributed optimizer, fp32 gradient reduction; micro batch 1, global batch 1 (one"
        " replica on all GPUs), mock data.",
        f"- **Timing:** {meta.get('warmup')} warm-up steps, then {meta.get('steps')} timed steps, each whole training step"
        " (forward, backward, gradient reduction, optimizer) between CUDA events; the median of the per-step maximum over"
        " ranks. Memory: `max_memory_allocated` / `max_memory_reserved` over all steps of the row, the maximum over ranks.",
        "- **MFU** = model FLOPs per step / (median step time x GPUs x measured peak). Model FLOPs = 6 T N (N = the"
        " layers' matmul weights) + 6 T h V (LM head) + 6 L h S(S+1) (causal attention, QK^T and PV; forward"
        " 2 h S(S+1) per layer), T = S tokens; recomputation is not counted (`megatron_tsp.planner.flops`, the planner's count).",
        "",
    ]
    if not gpu:  # no GPU memory, bf16 peak or MFU on CPU: those lines and columns are left out
        lines = [ln for ln in lines if not ln.startswith(("- **Measured peak:**", "- **MFU**"))]
        lines.insert(-1, "- **CPU run** (gloo): step times and tokens/s only; memory, TFLOP/s and MFU are GPU "
                         "measurements and are left out.")
    lines += _results_table(rows, gpu)
    probes = [r for r in rows if gpu and r["status"] == "ok" and "seconds" in r.get("attention_probe", {})]
    if probes:
        lines += ["", "Attention kernel alone (forward + backward of one layer shard on each rank's shapes, model FLOPs;"
                  " TSP: its two zigzag chunks against their causal prefixes, `AttentionShard.attend` and `attend_backward`; TP: causal SDPA"
                  " over the full sequence; the slowest rank):", "",
                  "| layout | variant | S | time ms | TFLOP/s | % of peak | attention share of model FLOPs |",
                  "|---|---|---|---|---|---|---|"]
        for r in probes:
            p = r["attention_probe"]
            lines.append(f"| {r['label']} | {r['variant']} | {seq_label(r['seq'])} | {1e3 * p['seconds']:.1f} | "
                         f"{p['tflops']:.3g} | {100 * p['mfu']:.1f}% | {100 * r['attention_flops_share']:.0f}% |")
    if gpu:
        lines += ["", "## Targets", ""] + _targets_table(targets)
        lines += ["", TARGETS_DOC, ""]
    else:
        lines += [""]
    notes = {r["layout"]: (r["label"], meta.get("layouts", {}).get(r["layout"], {})) for r in rows}
    n = meta.get("gpus", 4)
    lines += ["Layouts (recipe overrides):", ""]
    for name, (label, info) in notes.items():
        keys = " ".join(info.get("overrides", [])).format(n=n, half=max(n // 2, 1))
        lines.append(f"- `{name}` ({label}): `{keys}`" + (f"; {info['note']}" if info.get("note") else ""))
    lines.append("")
    return "\n".join(lines)


def plot(rows: List[dict], meta: dict, devices: List[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    series = {}
    for r in rows:
        series.setdefault((r["layout"], r["variant"], r["label"]), []).append(r)
    cap = devices[0].get("total_memory_gb") if devices else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    layout_color = {}
    for (layout, variant, label), rs in series.items():
        color = layout_color.setdefault(layout, colors[len(layout_color) % len(colors)])
        style = "-" if variant == "mha" else "--"
        ok = [r for r in rs if r["status"] == "ok"]
        oom = [r for r in rs if r["status"] == "oom"]
        if not ok and not oom:
            continue
        name = f"{label} ({variant})"
        for ax, key in ((axes[0], "peak_alloc_gb"), (axes[1], "tokens_per_s_per_gpu")):
            if ok:
                ax.plot([r["seq"] for r in ok], [r[key] for r in ok], style, marker="o", color=color, label=name)
            if oom:
                ax.plot([r["seq"] for r in oom], [0] * len(oom), "x", color=color, markersize=10, mew=2,
                        transform=ax.get_xaxis_transform(), clip_on=False,
                        label=None if ok else name + " (OOM)")
    seqs = sorted({r["seq"] for r in rows})
    for ax, title in ((axes[0], "peak allocated memory per GPU (GiB)"), (axes[1], "tokens / s / GPU (log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs)
        ax.set_xticklabels([seq_label(s) for s in seqs])
        ax.set_xlabel("sequence length (x: out of memory)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    if cap:
        axes[0].axhline(cap, color="gray", linestyle=":", label=f"GPU memory {cap:.0f} GiB")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, title="solid: MHA, dashed: GQA", title_fontsize=7)
    dev = devices[0] if devices else {}
    model = "7B-class" if meta.get("model") == "7b" else meta.get("model", "")
    fig.suptitle(f"megatron-tsp bench {meta.get('tag', '')}: {meta.get('layers')}-layer {model} model on "
                 f"{dev.get('world', '?')} x {dev.get('device', '?')} (commit {str(meta.get('commit', '?'))[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(jsonl: str, out: str, tag: str, readme: Optional[str] = None) -> int:
    records = read_records(jsonl)
    meta, devices, rows = collect(records)
    targets = evaluate_targets(rows) if on_gpus(devices) else []  # memory targets mean nothing on CPU
    base = os.path.join(out, f"bench_{tag}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "devices": devices, "rows": rows, "targets": targets}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(meta, devices, rows, targets))
    made = plot(rows, meta, devices, base + ".png")
    if readme:
        update_readme(readme, meta, devices, rows, targets, base + ".md", base + ".png" if made else None)
    print(f"bench: wrote {base}.json, {base}.md" + (f", {base}.png" if made else
          " (no plot: matplotlib is not installed; `pip install -e .[bench]`, then rebuild it with --from-jsonl)"), flush=True)
    for t in targets:
        print(f"  {t['target']} [{t['variant']}]: {t['verdict']} ({t['detail']})", flush=True)
    return 0
