"""`megatron-tsp bench`: TSP against its baselines on N GPUs: peak memory, step time, MFU.

    megatron-tsp bench --gpus 4 --tag h200x4                      # the default table (~6 min on 4 x H200)
    megatron-tsp bench --gpus 4 --layers 4 --seq 16K,32K,64K,128K --layouts tsp,tp,tp_sp,cp4,tp2_cp2,fsdp_cp4 \
        --variants mha,gqa --steps 10 --warmup 3 --timeout 300 --out benchmarks/results --tag h200x4
    megatron-tsp bench --from-jsonl benchmarks/results/bench_h200x4.jsonl   # rebuild the .json/.md/.png
    megatron-tsp bench --gpus 2 --model tiny --seq 64,128 --layouts tsp,tp_sp --steps 2   # CPU (gloo)

How it runs. This process (the orchestrator, plain python: no torchrun around it) plans the rows
(variant x layout x sequence length: MHA first, layouts in the order given, S upward) and launches
ONE torchrun that walks every pending row (`--launch per-layout`: one torchrun per layout). Per
row, the workers first check the row's recipe overrides against the installed package: a layout
whose keys it rejects is recorded "unavailable: <reason>" and costs nothing. Then the model, DDP
and optimizer are rebuilt, memory is freed and the peak counters are reset between rows, and the
process groups are rebuilt when the parallel layout changes. Each finished row is appended to
`bench_<tag>.jsonl` at once, so a partial run still leaves data.

- Out of memory is a result: the rank that catches it writes an OOM record and leaves with
  `os._exit(17)`; torchrun tears the other ranks down; the orchestrator records "OOM" for that
  row and for every longer sequence of the same layout and variant (memory grows with S: those
  rows are marked as not run), then relaunches torchrun on the remaining rows.
- A row that runs longer than `--timeout` seconds (a hung collective, or far too slow) is killed
  and recorded as "timeout"; any other failure as "error" with its message. The longer
  sequences of that layout and variant are then skipped and the benchmark goes on.
- `--budget SECONDS` stops the whole benchmark in time and still writes the report.

Each row: the driver's own model, DDP, distributed optimizer and training step
(`megatron_tsp.training.loop.build` / `train_step`, i.e. Megatron's get_forward_backward_func), mock
data, micro batch 1, global batch 1 (one model replica on the N GPUs), `--warmup` untimed steps
then `--steps` timed ones, each timed with CUDA events around the whole step (forward, backward,
gradient reduction, optimizer); the median over steps (of the slowest rank per step) is reported.
Peak memory: `torch.cuda.max_memory_allocated / max_memory_reserved` over the timed and warm-up
steps (model states included), the maximum over ranks. MFU uses model FLOPs (`model_flops`) and
the bf16 matmul rate measured at start on each GPU (8192^3, the largest of the ranks).

Outputs in `--out`: `bench_<tag>.jsonl` (records as they come), `bench_<tag>.json` (rows, config,
command, commit, device, torch version, measured peak), `bench_<tag>.md` (table + targets),
`bench_<tag>.png` (memory and tokens/s/GPU vs S; needs matplotlib, else rebuild it anywhere with
`--from-jsonl`), `bench_<tag>.log` (the workers' output).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional

OOM_EXIT, ERROR_EXIT = 17, 18
STARTUP_S = 180  # allowance for torchrun start, imports and process-group set-up before the first row
# Tests: "LAYOUT:SEQ:RANK[,...]" makes that rank raise a simulated OOM / hang in that row's second step.
FAKE_OOM_ENV, FAKE_HANG_ENV = "MEGATRON_TSP_BENCH_FAKE_OOM", "MEGATRON_TSP_BENCH_FAKE_HANG"
K = 1024


# -- what is benchmarked ---------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    label: str
    """How the table names it ({n} = number of GPUs)."""
    overrides: tuple
    """Recipe overrides ({n} = number of GPUs, {half} = n // 2)."""
    note: str = ""
    probe: Optional[str] = None
    """Attention-kernel micro-measurement: 'tsp' (a TSP shard: two zigzag chunks against their
    causal prefixes), 'sdpa' (the full-sequence causal SDPA of the TP baselines) or None."""


def _tsp_variant(label: str, override: str) -> Layout:
    return Layout(f"TSP D={{n}}, {label}", ("parallel.layout=tsp", "parallel.size={n}", override))


# Declared rows. CP, FSDP-over-CP, TSP compute-only and TSP recompute rows run once the
# installed recipe accepts their keys; until then each is reported "unavailable: <reason>".
LAYOUTS: Dict[str, Layout] = {
    "tsp": Layout("TSP D={n}", ("parallel.layout=tsp", "parallel.size={n}"), probe="tsp"),
    "tp": Layout("TP={n}", ("parallel.layout=tp", "parallel.size={n}"), probe="sdpa"),
    "tp_sp": Layout("TP={n}+SP", ("parallel.layout=tp_sp", "parallel.size={n}"), probe="sdpa"),
    "cp4": Layout("CP={n}", ("parallel.layout=dp", "parallel.size=1", "parallel.context_size={n}"),
                  "context parallelism, K/V all-gathered, weights replicated"),
    "tp2_cp2": Layout("TP={half}+SP x CP=2", ("parallel.layout=tp_sp", "parallel.size={half}", "parallel.context_size=2"),
                      "TP x CP mesh (the paper's TP+SP)"),
    # The paper's single-node factorizations on 8 GPUs (issue 6): explicit TP x CP meshes.
    "tp2_cp4": Layout("TP=2+SP x CP=4", ("parallel.layout=tp_sp", "parallel.size=2", "parallel.context_size=4"),
                      "TP x CP mesh, 8 GPUs"),
    "tp4_cp2": Layout("TP=4+SP x CP=2", ("parallel.layout=tp_sp", "parallel.size=4", "parallel.context_size=2"),
                      "TP x CP mesh, 8 GPUs"),
    "fsdp_cp4": Layout("FSDP/ZeRO-3 over CP={n}", ("parallel.layout=dp", "parallel.size=1", "parallel.context_size={n}",
                                                   "parallel.fsdp=true", "train.distributed_optimizer=false"),
                       "weights, gradients and optimizer state sharded over the context-parallel group (torch FSDP2; "
                       "it shards the optimizer state itself, so Megatron's distributed optimizer is off)"),
    "tsp_compute_only": Layout("TSP D={n}, comm skipped", ("parallel.layout=tsp", "parallel.size={n}",
                                                           "parallel.tsp_compute_only=true"),
                               "TSP's shapes and kernels with the communication skipped (numerically meaningless)"),
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

MODELS = {
    # 7B-class: h=4096, 32 heads (MHA; GQA: 8 KV groups), SwiGLU FFN 4h, vocab 32000, RoPE, RMSNorm, bf16.
    "7b": dict(hidden_size=4096, num_attention_heads=32, gqa_groups=8, ffn_hidden_size=16384, vocab_size=32000,
               dtype="bfloat16", layers=2, seq="16K,32K,64K,128K"),
    # For tests on CPU (gloo, float32).
    "tiny": dict(hidden_size=64, num_attention_heads=4, gqa_groups=2, ffn_hidden_size=256, vocab_size=128,
                 dtype="float32", layers=2, seq="64,128"),
}


def parse_seq(text: str) -> int:
    t = text.strip().upper()
    if t.endswith("K"):
        return int(float(t[:-1]) * K)
    if t.endswith("M"):
        return int(float(t[:-1]) * K * K)
    return int(t)


def seq_label(s: int) -> str:
    return f"{s // K}K" if s % K == 0 and s >= K else str(s)


@dataclass(frozen=True)
class Shape:
    """The fields of `training.ModelShape` that the FLOP count reads (no megatron import here)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: Optional[int]
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    swiglu: bool = True


def model_shape(model: str, variant: str, layers: int, seq: int) -> Shape:
    m = MODELS[model]
    return Shape(num_layers=layers, hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
                 num_query_groups=m["gqa_groups"] if variant == "gqa" else None,
                 ffn_hidden_size=m["ffn_hidden_size"], vocab_size=m["vocab_size"], seq_length=seq)


# -- FLOPs -------------------------------------------------------------------------------------

def model_flops(shape, seq_length: Optional[int] = None, batch: int = 1) -> dict:
    """Model FLOPs of one training step (forward + backward, no recompute counted) of a GPT:

        dense     = 6 * T * N            N = matmul weights of the L layers:
                                           L * (h*(h + 2*g*d) + h*h + (3 if gated else 2)*h*f)
                                           (QKV, output projection, MLP; d = h/a head dim, g KV groups)
        lm_head   = 6 * T * h * V
        attention = 6 * L * b * h * S*(S+1)/2 * 2
                  = per layer and sequence: QK^T and PV each cost 2*h FLOPs per (query, key) pair
                    (a*d = h over all query heads), S*(S+1)/2 pairs under the causal mask, so the
                    forward is 4*h*S*(S+1)/2 and forward + backward 3x that.

    T = b*S tokens. Backward = 2 x forward (input and weight gradients). Not counted: the
    embedding lookup, norms, RoPE, softmax, activations, the loss, and any recomputation (TSP's
    backward re-runs each attention shard's forward: real work, not model FLOPs)."""
    S = shape.seq_length if seq_length is None else seq_length
    h, L, a, f, V = shape.hidden_size, shape.num_layers, shape.num_attention_heads, shape.ffn_hidden_size, shape.vocab_size
    g = shape.num_query_groups or a
    d = h // a
    per_layer = h * (h + 2 * g * d) + h * h + (3 if shape.swiglu else 2) * h * f
    tokens = batch * S
    dense = 6 * tokens * L * per_layer
    lm_head = 6 * tokens * h * V
    attention = 6 * L * batch * h * S * (S + 1)
    return {"dense": dense, "lm_head": lm_head, "attention": attention, "total": dense + lm_head + attention,
            "matmul_params": L * per_layer}


def causal_area(q_len: int, start: int) -> int:
    """(query, key) pairs of a chunk of q_len queries at positions [start, start+q_len) against
    its causal prefix [0, start+q_len)."""
    return q_len * start + q_len * (q_len + 1) // 2


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
    m = MODELS[args.model]
    layers = args.layers or m["layers"]
    dtype = m["dtype"]
    rows = []
    for variant in variants:
        for name in layouts:
            lay = LAYOUTS[name]
            if variant == "gqa" and gqa_layouts is not None and name not in gqa_layouts:
                continue
            for S in seqs:
                shape = model_shape(args.model, variant, layers, S)
                overrides = [
                    f"model.num_layers={layers}", f"model.hidden_size={shape.hidden_size}",
                    f"model.num_attention_heads={shape.num_attention_heads}",
                    f"model.num_query_groups={shape.num_query_groups if shape.num_query_groups else 'null'}",
                    f"model.ffn_hidden_size={shape.ffn_hidden_size}", f"model.vocab_size={shape.vocab_size}",
                    f"model.seq_length={S}", "model.swiglu=true", "model.normalization=RMSNorm",
                    "model.position_embedding_type=rope", f"model.dtype={dtype}",
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


# -- the orchestrator --------------------------------------------------------------------------

def _git_commit() -> str:
    """BENCH_COMMIT when set (the GPU machine's copy of the tree may carry a stale .git), else git."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _read_records(path: str) -> List[dict]:
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


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _row_line(rec: dict) -> str:
    head = f"{rec['layout']:>18s} {rec['variant']} {seq_label(rec['seq']):>5s}: "
    if rec["status"] != "ok":
        return head + rec["status"].upper() + (f" ({rec.get('note')})" if rec.get("note") else "")
    mfu = f", MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
    left = rec.get("alloc_before_build_gb") or 0
    warn = f" [WARNING: {left:.2f} GiB still allocated before the build]" if left > 0.25 else ""
    return (head + f"{rec['median_step_s']:.3f} s/step, {rec['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, "
            f"peak {rec['peak_alloc_gb']:.2f} GiB alloc / {rec['peak_reserved_gb']:.2f} GiB reserved{mfu}{warn}")


def _kill(proc: subprocess.Popen, state_dir: str) -> None:
    """Stop torchrun (it stops its workers), then any worker left (by the pids they wrote)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for name in os.listdir(state_dir):
        if name.startswith("pid."):
            try:
                with open(os.path.join(state_dir, name)) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


def _launch(rows: List[dict], args, paths: dict, deadline: Optional[float]) -> dict:
    """One torchrun over `rows`. Returns rc, whether a row timed out, the row in progress."""
    state = paths["state"]
    for name in os.listdir(state):
        os.remove(os.path.join(state, name))
    spec = {"rows": rows, "jsonl": paths["jsonl"], "state": state, "warmup": args.warmup, "steps": args.steps,
            "probe": not args.no_probe, "probe_steps": 3, "profile": args.profile}
    spec_path = os.path.join(state, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
           "-m", "megatron_tsp.bench.launcher", "--worker", spec_path]
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.model == "tiny":
        env.setdefault("OMP_NUM_THREADS", "1")
    seen = len(_read_records(paths["jsonl"]))
    with open(paths["log"], "a") as log:
        log.write(f"\n=== {time.strftime('%H:%M:%S')} torchrun over {len(rows)} rows: {rows[0]['id']} .. {rows[-1]['id']}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    current, started, timed_out, over_budget = None, time.time(), False, False
    marker = os.path.join(state, "current.json")

    def read_marker():
        try:
            with open(marker) as f:
                return json.load(f)["row"]
        except (OSError, ValueError, KeyError):
            return None

    while True:
        rc = proc.poll()
        recs = _read_records(paths["jsonl"])
        for rec in recs[seen:]:
            if rec.get("kind") == "row":
                print(_row_line(rec), flush=True)
            elif rec.get("kind") == "device":
                print(f"device: {rec['device']} x {rec['world']}, measured peak {rec['peak_tflops']:.0f} TFLOP/s "
                      f"({rec['peak_what']})", flush=True)
        seen = len(recs)
        if rc is not None:
            current = read_marker() or current  # the row it stopped in, even if it stopped at once
            break
        now_row = read_marker()
        if now_row is not None and now_row != current:
            current, started = now_row, time.time()
        # Before the first row starts, torchrun, imports and NCCL set-up get STARTUP_S more.
        if time.time() - started > args.timeout + (0 if current is not None else STARTUP_S):
            timed_out = True
        if deadline is not None and time.time() > deadline:
            over_budget = True
        if timed_out or over_budget:
            _kill(proc, state)
            rc = proc.returncode
            break
        time.sleep(0.5)
    fails = []
    for name in sorted(os.listdir(state)):
        if name.startswith("fail."):
            try:
                with open(os.path.join(state, name)) as f:
                    fails.append(json.load(f))
            except (OSError, ValueError):
                pass
    return {"rc": rc, "timed_out": timed_out, "over_budget": over_budget, "current": current, "fails": fails}


def _log_tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()[-400:]
    except OSError:
        return ""
    keep = [ln.rstrip() for ln in lines if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    return "\n".join(keep[-n:])


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001
        return "unknown"


def orchestrate(args, argv: List[str]) -> int:
    os.makedirs(args.out, exist_ok=True)
    paths = {"jsonl": os.path.join(args.out, f"bench_{args.tag}.jsonl"),
             "log": os.path.join(args.out, f"bench_{args.tag}.log"),
             "state": tempfile.mkdtemp(prefix=f"bench_{args.tag}_")}
    rows = plan_rows(args)
    est = estimate_seconds(rows, args.model, args.warmup, args.steps)
    print(f"megatron-tsp bench: {len(rows)} rows ({args.model}, {rows[0]['layers'] if rows else '-'} layers) on "
          f"{args.gpus} processes; estimated time {est / 60:.1f} min if every row runs"
          + (" (a rough upper estimate for 4 x H200)" if args.model == "7b" else "")
          + "; rows the installed recipe rejects are reported unavailable and take no time", flush=True)
    if args.dry_run:
        reasons = {}
        for r in rows:
            key = (r["layout"], r["variant"])
            if key not in reasons:
                reasons[key] = availability(r, args.gpus)
        runnable = [r for r in rows if reasons[(r["layout"], r["variant"])] is None]
        for (layout, variant), why in reasons.items():
            if why:
                print(f"  {layout} {variant}: unavailable: {why.splitlines()[0][:200]}", flush=True)
        print(f"  {len(runnable)} rows available here, estimated "
              f"{estimate_seconds(runnable, args.model, args.warmup, args.steps) / 60:.1f} min:", flush=True)
        for r in runnable:
            print(f"    {r['id']}")
        return 0

    done = {}
    redo = set(filter(None, (args.redo or "").split(",")))
    if redo and not args.resume:
        raise SystemExit("bench: --redo goes with --resume (without it every row is measured anyway)")
    if args.resume:
        old = _read_records(paths["jsonl"])
        before = next((r for r in reversed(old) if r.get("kind") == "meta"), None)
        layers = rows[0]["layers"] if rows else None
        if before is not None:
            for key, mine in (("model", args.model), ("layers", layers), ("gpus", args.gpus), ("warmup", args.warmup),
                              ("steps", args.steps)):
                if before.get(key) != mine:
                    raise SystemExit(f"bench: --resume: {paths['jsonl']} was written with {key} = {before.get(key)!r}, "
                                     f"this run has {mine!r}; use another --tag")
        for rec in old:
            if (rec.get("kind") == "row" and rec["status"] not in ("timeout", "error", "skipped")
                    and rec["layout"] not in redo):
                done[rec["id"]] = rec
        if done:
            print(f"  --resume: {len([r for r in rows if r['id'] in done])} of the planned rows are already done", flush=True)
    else:
        open(paths["jsonl"], "w").close()
        open(paths["log"], "w").close()
    meta = {"kind": "meta", "tag": args.tag, "command": "megatron-tsp bench " + " ".join(argv),
            "commit": _git_commit(), "model": args.model, "model_config": MODELS[args.model],
            "layers": rows[0]["layers"] if rows else None, "gpus": args.gpus, "warmup": args.warmup,
            "steps": args.steps, "timeout_s": args.timeout, "torch": _torch_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "estimated_s": est,
            "plan": [r["id"] for r in rows], "layouts": {k: {"label": v.label, "note": v.note,
                                                             "overrides": list(v.overrides)} for k, v in LAYOUTS.items()}}
    _append(paths["jsonl"], meta)
    pending = [r for r in rows if r["id"] not in done]
    t0 = time.time()
    deadline = t0 + args.budget if args.budget else None

    def record(rec):
        _append(paths["jsonl"], rec)
        done[rec["id"]] = rec

    while pending:
        if deadline is not None and time.time() > deadline:
            for r in pending:
                record(_row_base(r, status="skipped", note="over the --budget", measured=False))
            break
        batch = pending if args.launch == "one" else [r for r in pending if r["layout"] == pending[0]["layout"]]
        res = _launch(batch, args, paths, deadline)
        for rec in _read_records(paths["jsonl"]):
            if rec.get("kind") == "row":
                done[rec["id"]] = rec
        left = {r["id"]: r for r in batch if r["id"] not in done}
        pending = [r for r in pending if r["id"] not in done]
        if not left:
            continue
        failed = next((f["row"] for f in res["fails"] if f.get("kind") == "oom" and f.get("row") in left), None)
        failed = failed or next((f["row"] for f in res["fails"] if f.get("row") in left), None)
        failed = failed or (res["current"] if res["current"] in left else None)
        if res["over_budget"]:
            for r in pending:
                record(_row_base(r, status="skipped", note="over the --budget", measured=r["id"] == failed))
            break
        if failed is None:  # a failure outside any row (start-up): it would repeat, so stop here
            why = (f"the workers stopped before their first row (rc {res['rc']})" if res["current"] is None
                   else f"the workers stopped with rc {res['rc']} and left no record")
            print(f"bench: {why}; log tail:\n{_log_tail(paths['log'])}", file=sys.stderr, flush=True)
            for r in pending:
                record(_row_base(r, status="error", note=why))
            break
        row = left[failed]
        msgs = [f for f in res["fails"] if f.get("row") == failed]
        oom = next((f for f in msgs if f.get("kind") == "oom"), None)
        if oom is not None:
            rec = _row_base(row, status="oom", note=f"rank {oom['rank']}: {oom['message'][:160]}",
                            memory_at_oom=oom.get("memory"))
            follow = ("oom", f"not run: out of memory at S={seq_label(row['seq'])} (memory grows with S)")
        elif res["timed_out"]:
            rec = _row_base(row, status="timeout", note=f"no result after {args.timeout:.0f} s (--timeout)")
            follow = ("skipped", f"not run: timeout at S={seq_label(row['seq'])}")
        else:
            msg = msgs[0]["message"] if msgs else (_log_tail(paths["log"], 3) or f"rc {res['rc']}")
            rec = _row_base(row, status="error", note=msg[:300])
            print(f"bench: {row['id']} failed (rc {res['rc']}); log tail:\n{_log_tail(paths['log'])}",
                  file=sys.stderr, flush=True)
            follow = ("skipped", f"not run: error at S={seq_label(row['seq'])}")
        record(rec)
        print(_row_line(rec), flush=True)
        for r in pending:
            if r["layout"] == row["layout"] and r["variant"] == row["variant"] and r["seq"] > row["seq"]:
                record(_row_base(r, status=follow[0], note=follow[1], measured=False))
        pending = [r for r in pending if r["id"] not in done]
    print(f"bench: finished in {(time.time() - t0) / 60:.1f} min", flush=True)
    return write_reports(paths["jsonl"], args.out, args.tag, args.readme)


def _row_base(row: dict, status: str, note: str = "", measured: bool = True, **extra) -> dict:
    rec = {"kind": "row", "id": row["id"], "layout": row["layout"], "variant": row["variant"], "seq": row["seq"],
           "label": row["label"], "layers": row["layers"], "status": status, "note": note}
    if not measured:
        rec["measured"] = False
    rec.update(extra)
    return rec


# -- the worker (under torchrun) -----------------------------------------------------------------

def _fake(env: str, layout: str, seq: int, rank: int) -> bool:
    for item in filter(None, os.environ.get(env, "").split(",")):
        lay, s, r = item.split(":")
        if lay == layout and parse_seq(s) == seq and int(r) == rank:
            return True
    return False


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_peak(device) -> tuple:
    """bf16 8192^3 matmul rate on a GPU (3 warm-up, 10 timed, CUDA events); on CPU a float32
    1024^3 one (only so that the CPU path has a number)."""
    import torch

    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        dt = start.elapsed_time(end) / 1e3 / reps
        del a, b
        torch.cuda.empty_cache()
        return 2 * n**3 / dt, f"bf16 {n}^3 matmul, CUDA events, mean of {reps} after 3 warm-ups"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    dt = (time.perf_counter() - t) / 3
    return 2 * n**3 / dt, f"float32 {n}^3 matmul on CPU (not a GPU peak)"


class _Timer:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __enter__(self):
        if self.cuda:
            self.start.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t
        return False


def attention_probe(kind: str, recipe, rank: int, device, reps: int = 3) -> Optional[dict]:
    """Times the core-attention kernel of one layer shard alone, forward + backward, on this
    rank's shapes, and returns its model FLOPs rate (forward 4*h_shard*pairs, backward 2x).

    'tsp': one TSP shard (a/D query heads, g/D KV groups): the rank's two zigzag chunks against
    their causal prefixes of the gathered K/V (TSP's own `AttentionShard.attend` and
    `attend_backward`; a layer
    runs it D times). 'sdpa': the TP baselines' causal SDPA over the full sequence with a/D heads
    (one layer's attention on one rank)."""
    import torch

    from ..tsp.zigzag import local_chunk_starts

    m = recipe.model
    a, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d, S = m.hidden_size // a, m.seq_length
    D = recipe.axis_size
    heads, groups = a // D, max(g // D, 1)
    dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(rank)
    if kind == "tsp":
        from ..tsp.attention import AttentionShard

        c = S // (2 * D)
        starts = local_chunk_starts(S, D, rank)
        shard = AttentionShard(config=None, group=None, heads=heads, groups=groups, head_dim=d,
                               softmax_scale=1 / math.sqrt(d), chunk_starts=starts, chunk_len=c,
                               backend=recipe.parallel.tsp_attention_backend)
        q = torch.randn(2 * c, 1, heads, d, device=device, dtype=dtype, generator=gen)
        kv = torch.randn(S, 1, groups, 2 * d, device=device, dtype=dtype, generator=gen)
        do = torch.randn(2 * c, 1, heads * d, device=device, dtype=dtype, generator=gen)
        pairs = sum(causal_area(c, s) for s in starts)

        def step():  # the kernels' forward and their explicit backward, as TSPAttentionFunction runs them
            o, lses = shard.attend(q, kv)
            shard.attend_backward(do, q, kv, o, lses)
    elif kind == "sdpa":
        import torch.nn.functional as F

        q = torch.randn(S, 1, heads, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        k = torch.randn(S, 1, groups, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        v = torch.randn(S, 1, groups, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        grad = torch.randn(1, heads, S, d, device=device, dtype=dtype, generator=gen)
        pairs = causal_area(S, 0)

        def step():  # as SDPACoreAttention: [s, b, n, d] permuted to [b, n, s, d] views
            F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True,
                                           scale=1 / math.sqrt(d), enable_gqa=heads != groups).backward(grad)
    else:
        return None
    times = []
    for i in range(reps + 1):
        with _Timer(device) as t:
            step()
        if i:
            times.append(t.seconds)
    flops = 3 * 4 * heads * d * pairs
    sec = statistics.median(times)
    return {"kind": kind, "seconds": sec, "model_flops": flops, "tflops": flops / sec / 1e12,
            "shape": {"query_heads": heads, "kv_groups": groups, "head_dim": d, "pairs": pairs}}


def _release_caches() -> None:
    """Clear megatron's and megatron_tsp's functools caches: Megatron's RotaryEmbedding.forward
    is an lru_cache keyed by the module, so it keeps every model's RoPE table (S x d floats on
    the GPU) alive after the model is gone and would inflate the next rows' memory."""
    import functools

    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper) and (getattr(obj, "__module__", None) or "").startswith("megatron"):
            obj.cache_clear()
    gc.collect()


def worker(spec_path: str) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    with open(spec_path) as f:
        spec = json.load(f)
    state, jsonl = spec["state"], spec["jsonl"]
    rank_env = int(os.environ.get("RANK", "0"))
    with open(os.path.join(state, f"pid.{rank_env}"), "w") as f:
        f.write(str(os.getpid()))
    current = {"row": None}

    def fail(kind: str, e: BaseException):
        mem = None
        if torch.cuda.is_available():
            mem = {"allocated_gb": torch.cuda.memory_allocated() / 2**30, "reserved_gb": torch.cuda.memory_reserved() / 2**30}
        with open(os.path.join(state, f"fail.{rank_env}.json"), "w") as f:
            json.dump({"kind": kind, "row": current["row"], "rank": rank_env, "message": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-3000:], "memory": mem}, f)
        sys.stdout.flush()
        sys.stderr.flush()
        if kind != "oom":
            traceback.print_exc()
        os._exit(OOM_EXIT if kind == "oom" else ERROR_EXIT)

    try:
        return _worker_rows(spec, state, jsonl, current)
    except BaseException as e:  # noqa: BLE001 - every failure leaves a record and a hard exit
        fail("oom" if _is_oom(e) else "error", e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker_rows(spec: dict, state: str, jsonl: str, current: dict) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from ..training import loop as driver
    from ..training.recipe import RecipeError, load_recipe
    from ..training.build import init_distributed

    backend = init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    peak, peak_what = measure_peak(device)
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    peak = max(peaks)
    if rank == 0:
        props = torch.cuda.get_device_properties(device) if cuda else None
        _append(jsonl, {"kind": "device", "device": props.name if cuda else "cpu", "world": world, "backend": backend,
                        "total_memory_gb": props.total_memory / 2**30 if cuda else None,
                        "torch": torch.__version__, "cuda": torch.version.cuda,
                        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                        "peak_tflops": peak / 1e12, "peak_tflops_per_rank": [p / 1e12 for p in peaks],
                        "peak_what": peak_what})
    groups_key = None
    for row in spec["rows"]:
        current["row"] = row["id"]
        if rank == 0:
            with open(os.path.join(state, "current.json.tmp"), "w") as f:
                json.dump({"row": row["id"], "t": time.time()}, f)
            os.replace(os.path.join(state, "current.json.tmp"), os.path.join(state, "current.json"))
        try:  # pure checks, the same on every rank: no collective is left waiting
            recipe = load_recipe(None, row["overrides"])
            recipe.check(world)
        except RecipeError as e:
            if rank == 0:
                _append(jsonl, _row_base(row, status="unavailable", note=str(e).splitlines()[0]))
            continue
        t_row = time.perf_counter()
        key = json.dumps(recipe.to_dict()["parallel"], sort_keys=True)
        if key != groups_key:
            if cuda:
                torch.cuda.synchronize()
            if groups_key is not None:
                dist.barrier()
            driver._init_groups(recipe)
            groups_key = key
        else:  # same groups: drop Megatron's global buffer (sized by the previous S)
            mpu.destroy_global_memory_buffer()
            mpu._set_global_memory_buffer()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated() if cuda else 0
        t_build = time.perf_counter()
        model, ddp, optimizer = driver.build(recipe)
        dataset = driver.build_train_dataset(recipe)
        build_s = time.perf_counter() - t_build
        if cuda:  # the peak of training (model states included), not of the build's transients
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
        times, losses = [], []
        n_steps = spec["warmup"] + spec["steps"]
        for step in range(n_steps):
            batches = list(driver.micro_batches(dataset, step, recipe, dp_rank, dp_size, device,
                                                 mpu.get_context_parallel_group()))
            if step == 1 and _fake(FAKE_OOM_ENV, row["layout"], row["seq"], rank):
                raise torch.OutOfMemoryError(f"simulated out of memory ({FAKE_OOM_ENV})")
            if step == 1 and _fake(FAKE_HANG_ENV, row["layout"], row["seq"], rank):
                time.sleep(1e6)
            with _Timer(device) as t:
                loss, _ = driver.train_step(ddp, optimizer, batches, recipe)
            if step >= spec["warmup"]:
                times.append(t.seconds)
                losses.append(loss)
        if spec.get("profile"):  # one extra step, after the timed ones and outside their statistics
            from .profiling import StepProfile

            batches = list(driver.micro_batches(dataset, n_steps, recipe, dp_rank, dp_size, device,
                                                 mpu.get_context_parallel_group()))
            with StepProfile() as prof, _Timer(device) as t:
                driver.train_step(ddp, optimizer, batches, recipe)
            if rank == 0:
                name = row["id"].replace("/", "_")
                with open(os.path.join(os.path.dirname(jsonl), f"profile_{name}.md"), "w") as f:
                    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
                    f.write(prof.summary(t.seconds, title=f"{row['label']} {row['variant']} S={row['seq']}, "
                                                         f"{row['layers']} layers, rank 0 of {world} x {device_name}, "
                                                         f"commit {_git_commit()}"))
            del prof
        stats = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0,
                              torch.cuda.max_memory_reserved() if cuda else 0, base_alloc], dtype=torch.float64,
                             device=device)
        per_rank = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(per_rank, stats)
        step_times = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(step_times, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
        del model, ddp, optimizer, dataset, batches
        _release_caches()
        if cuda:
            torch.cuda.empty_cache()
        probe = None
        if spec.get("probe") and row.get("probe"):
            try:  # no collective inside: an OOM here is this rank's alone and costs only the probe
                probe = attention_probe(row["probe"], recipe, mpu.get_tensor_model_parallel_rank(), device,
                                        reps=spec.get("probe_steps", 3))
            except torch.OutOfMemoryError as e:
                probe = {"kind": row["probe"], "error": f"OutOfMemoryError: {str(e)[:120]}"}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            probes = [None] * world
            dist.all_gather_object(probes, probe)
            failed = [p for p in probes if "error" in p]
            if failed:
                probe = failed[0]
            else:
                probe = max(probes, key=lambda p: p["seconds"])  # the slowest rank's shard
                probe["tflops_per_rank"] = [p["tflops"] for p in probes]
        if rank == 0:
            _append(jsonl, _result_record(row, recipe, world, per_rank, step_times.tolist(), losses, peak, build_s, probe))
            print(f"[bench] {row['id']}: {time.perf_counter() - t_row:.1f} s (build {build_s:.1f} s, "
                  f"{n_steps} steps {sum(times):.1f} s timed)", flush=True)
        dist.barrier()
    return 0


def _result_record(row, recipe, world, per_rank, step_times, losses, peak, build_s, probe) -> dict:
    shape = recipe.model.shape()
    flops = model_flops(shape, batch=recipe.train.global_batch_size)
    median = statistics.median(step_times)
    tokens = recipe.train.global_batch_size * shape.seq_length
    gb = 2**30
    rec = _row_base(row, status="ok")
    rec.update({
        "world": world, "steps_timed": len(step_times), "step_times_s": step_times, "median_step_s": median,
        "tokens_per_s_per_gpu": tokens / median / world,
        "peak_alloc_gb": max(float(p[0]) for p in per_rank) / gb, "peak_reserved_gb": max(float(p[1]) for p in per_rank) / gb,
        "peak_alloc_gb_per_rank": [float(p[0]) / gb for p in per_rank],
        "peak_reserved_gb_per_rank": [float(p[1]) / gb for p in per_rank],
        "alloc_before_build_gb": max(float(p[2]) for p in per_rank) / gb,
        "model_flops_per_step": flops["total"], "attention_flops_share": flops["attention"] / flops["total"],
        "peak_tflops": peak / 1e12, "mfu": flops["total"] / (median * world * peak),
        "loss_last": losses[-1] if losses else None, "build_s": build_s,
        "recipe_parallel": recipe.to_dict()["parallel"],
    })
    if probe is not None:
        if "tflops" in probe:
            probe["mfu"] = probe["tflops"] * 1e12 / peak
        rec["attention_probe"] = probe
    return rec


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


def _results_table(rows: List[dict]) -> List[str]:
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
    """Replace the README's block between the bench markers with this run's tables and plot."""
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
    m = MODELS.get(meta.get("model", "7b"), {})
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
        " 2 h S(S+1) per layer), T = S tokens; recomputation is not counted (`megatron_tsp.bench.launcher.model_flops`).",
        "",
    ]
    lines += _results_table(rows)
    probes = [r for r in rows if r["status"] == "ok" and "seconds" in r.get("attention_probe", {})]
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
    lines += ["", "## Targets", ""] + _targets_table(targets)
    lines += ["", TARGETS_DOC, ""]
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
    records = _read_records(jsonl)
    meta, devices, rows = collect(records)
    targets = evaluate_targets(rows)
    base = os.path.join(out, f"bench_{tag}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "devices": devices, "rows": rows, "targets": targets}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(meta, devices, rows, targets))
    made = plot(rows, meta, devices, base + ".png")
    if readme:
        update_readme(readme, meta, devices, rows, targets, base + ".md", base + ".png" if made else None)
    print(f"bench: wrote {base}.json, {base}.md" + (f", {base}.png" if made else
          " (no matplotlib here: rebuild the plot elsewhere with --from-jsonl)"), flush=True)
    for t in targets:
        print(f"  {t['target']} [{t['variant']}]: {t['verdict']} ({t['detail']})", flush=True)
    return 0


# -- command line ------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-tsp bench",
        description="Benchmark TSP against TP, TP+SP, CP, TP x CP and FSDP-over-CP (peak memory, step time, "
                    "tokens/s/GPU, MFU) over sequence lengths; launches torchrun itself (do not wrap it in torchrun).",
        epilog="Layouts: " + ", ".join(f"{k} ({v.label})" for k, v in LAYOUTS.items())
               + f".\nFor tests: {FAKE_OOM_ENV} / {FAKE_HANG_ENV}=LAYOUT:SEQ:RANK simulate an OOM / a hang.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpus", type=int, default=4, help="processes (GPUs; CPU processes without CUDA) (default 4)")
    p.add_argument("--model", choices=sorted(MODELS), default="7b", help="7b (h=4096, 32 heads, bf16) or tiny (CPU tests)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default: 2 for 7b, 2 for tiny)")
    p.add_argument("--seq", default=None, help="sequence lengths, e.g. 16K,32K,64K,128K (default per model)")
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"rows to run (default {DEFAULT_LAYOUTS})")
    p.add_argument("--variants", default="mha,gqa", help="mha and/or gqa (default mha,gqa)")
    p.add_argument("--gqa-layouts", default="tsp,tp_sp", help="layouts that also run the GQA variant, or 'all' (default tsp,tp_sp)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per row (default 3)")
    p.add_argument("--timeout", type=float, default=150,
                   help=f"seconds one row may take before it is killed (default 150; the first row gets {STARTUP_S} s more)")
    p.add_argument("--launch", choices=("one", "per-layout"), default="one",
                   help="one torchrun for all rows (relaunched after a failure), or one per layout (slower start, "
                        "no process-group rebuild inside a process) (default one)")
    p.add_argument("--budget", type=float, default=None, help="stop the whole benchmark after this many seconds (and still report)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results; with --from-jsonl: the file's folder)")
    p.add_argument("--tag", default=None, help="output name bench_<tag>.* (default: model and GPU count)")
    p.add_argument("--no-probe", action="store_true", help="skip the attention-kernel micro-measurement")
    p.add_argument("--profile", action="store_true",
                   help="after each row's timed steps, profile one more step and write profile_<row>.md beside the "
                        "results (GPU time per kernel category and stream, top kernels and operators, rank 0). "
                        "The profiler stays attached to the process: later rows of the same run measured up to "
                        "~10%% slower at 16K on 4 x H200, so time rows in a run without --profile")
    p.add_argument("--resume", action="store_true", help="keep the rows already in bench_<tag>.jsonl and run the rest")
    p.add_argument("--redo", metavar="LAYOUTS", default=None,
                   help="with --resume: measure these layouts' rows again (e.g. after a change to TSP); the new "
                        "records supersede the old in the reports")
    p.add_argument("--dry-run", action="store_true", help="print the plan, unavailable layouts and the time estimate")
    p.add_argument("--from-jsonl", metavar="FILE", help="only rebuild .json/.md/.png from a bench_<tag>.jsonl")
    p.add_argument("--readme", metavar="FILE", help=f"also put the tables and the plot into FILE between {README_BEGIN} "
                                                     f"and {README_END}")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.from_jsonl:
        name = os.path.basename(args.from_jsonl)
        tag = args.tag or (name[len("bench_"):-len(".jsonl")] if name.startswith("bench_") and name.endswith(".jsonl") else "rebuilt")
        out = args.out or os.path.dirname(os.path.abspath(args.from_jsonl))
        os.makedirs(out, exist_ok=True)
        return write_reports(args.from_jsonl, out, tag, args.readme)
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        print("megatron-tsp bench launches torchrun itself: run it without torchrun", file=sys.stderr)
        return 2
    args.seq = args.seq or MODELS[args.model]["seq"]
    args.tag = args.tag or f"{args.model}_{args.gpus}"
    args.out = args.out or "benchmarks/results"
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("bench: --steps must be >= 1 and --warmup >= 0")
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())
