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
(`megatron_tsp.training.loop`: `build` / `train_step`, i.e. Megatron's get_forward_backward_func), mock
data, micro batch 1, global batch 1 (one model replica on the N GPUs), `--warmup` untimed steps
then `--steps` timed ones, each timed with CUDA events around the whole step (forward, backward,
gradient reduction, optimizer); the median over steps (of the slowest rank per step) is reported.
Peak memory: `torch.cuda.max_memory_allocated / max_memory_reserved` over the timed and warm-up
steps (model states included), the maximum over ranks. MFU uses model FLOPs (`model_flops`) and
the bf16 matmul rate measured at start on each GPU (8192^3, the largest of the ranks).

Outputs in `--out`: `bench_<tag>.jsonl` (records as they come), `bench_<tag>.json` (rows, config,
command, commit, device, torch version, measured peak), `bench_<tag>.md` (table + targets),
`bench_<tag>.png` (memory and tokens/s/GPU vs S; needs matplotlib, `pip install -e .[bench]`, else
rebuild it anywhere with `--from-jsonl`), `bench_<tag>.log` (the workers' output). `--out` defaults
to ./bench_results; the recorded GPU results are in benchmarks/results (`plan validate` reads them).
On CPU (gloo, --model tiny) the reports give step times only: no memory, TFLOP/s or MFU columns.
A run in which no row ran exits 1; a machine that cannot run the model (7B without GPUs) exits 2.
"""


from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from .report import README_BEGIN, README_END, write_reports
from .rows import (DEFAULT_LAYOUTS, FAKE_HANG_ENV, FAKE_OOM_ENV, LAYOUTS, MODELS, STARTUP_S, append_record, availability,
                   estimate_seconds, git_commit, model_config, plan_rows, read_records, row_base, seq_label)
from .worker import worker


# -- the orchestrator --------------------------------------------------------------------------

DEFAULT_OUT = "bench_results"  # in the current directory: not benchmarks/results, which `plan validate` reads


def machine_cannot(model: str, gpus: int) -> Optional[str]:
    """Why this machine cannot run the rows at all (None if it can): the 7B rows need CUDA GPUs
    (bf16; CPU processes run --model tiny), and --gpus of them."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if model != "tiny" and have == 0:
        return f"--model {model} runs in bf16 on CUDA GPUs and this machine has none (on CPU: --model tiny)"
    if have and gpus > have:
        return f"--gpus {gpus}: this machine has {have} GPUs"
    return None


def _row_line(rec: dict, gpu: bool = True) -> str:
    head = f"{rec['layout']:>18s} {rec['variant']} {seq_label(rec['seq']):>5s}: "
    if rec["status"] != "ok":
        return head + rec["status"].upper() + (f" ({rec.get('note')})" if rec.get("note") else "")
    if not gpu:  # CPU: no GPU memory, no bf16 peak, no MFU
        return head + f"{rec['median_step_s']:.3f} s/step, {rec['tokens_per_s_per_gpu']:,.0f} tok/s/process"
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
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.model == "tiny":
        env.setdefault("OMP_NUM_THREADS", "1")
    seen = len(read_records(paths["jsonl"]))
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
        recs = read_records(paths["jsonl"])
        for rec in recs[seen:]:
            if rec.get("kind") == "row":
                print(_row_line(rec, args.on_gpus), flush=True)
            elif rec.get("kind") == "device" and rec.get("backend") != "nccl":
                args.on_gpus = False
                print(f"device: {rec['device']} x {rec['world']} ({rec.get('backend')}): step times only "
                      "(memory, TFLOP/s and MFU are GPU measurements)", flush=True)
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
    cannot = machine_cannot(args.model, args.gpus)
    if args.dry_run:
        if cannot:
            print(f"  not runnable on this machine: {cannot}; 0 rows available here (the plan, for a machine "
                  f"that has them:)", flush=True)
            for r in rows:
                print(f"    {r['id']}")
            return 0
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

    if cannot:
        print(f"bench: not runnable on this machine: {cannot}", file=sys.stderr, flush=True)
        return 2
    args.on_gpus = True  # until the workers' device record says otherwise
    done = {}
    redo = set(filter(None, (args.redo or "").split(",")))
    if redo and not args.resume:
        raise SystemExit("bench: --redo goes with --resume (without it every row is measured anyway)")
    if args.resume:
        old = read_records(paths["jsonl"])
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
            "commit": git_commit(), "model": args.model, "model_config": model_config(args.model),
            "layers": rows[0]["layers"] if rows else None, "gpus": args.gpus, "warmup": args.warmup,
            "steps": args.steps, "timeout_s": args.timeout, "torch": _torch_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "estimated_s": est,
            "plan": [r["id"] for r in rows], "layouts": {k: {"label": v.label, "note": v.note,
                                                             "overrides": list(v.overrides)} for k, v in LAYOUTS.items()}}
    append_record(paths["jsonl"], meta)
    pending = [r for r in rows if r["id"] not in done]
    t0 = time.time()
    deadline = t0 + args.budget if args.budget else None

    def record(rec):
        append_record(paths["jsonl"], rec)
        done[rec["id"]] = rec

    while pending:
        if deadline is not None and time.time() > deadline:
            for r in pending:
                record(row_base(r, status="skipped", note="over the --budget", measured=False))
            break
        batch = pending if args.launch == "one" else [r for r in pending if r["layout"] == pending[0]["layout"]]
        res = _launch(batch, args, paths, deadline)
        for rec in read_records(paths["jsonl"]):
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
                record(row_base(r, status="skipped", note="over the --budget", measured=r["id"] == failed))
            break
        if failed is None:  # a failure outside any row (start-up): it would repeat, so stop here
            why = (f"the workers stopped before their first row (rc {res['rc']})" if res["current"] is None
                   else f"the workers stopped with rc {res['rc']} and left no record")
            print(f"bench: {why}; log tail:\n{_log_tail(paths['log'])}", file=sys.stderr, flush=True)
            for r in pending:
                record(row_base(r, status="error", note=why))
            break
        row = left[failed]
        msgs = [f for f in res["fails"] if f.get("row") == failed]
        oom = next((f for f in msgs if f.get("kind") == "oom"), None)
        if oom is not None:
            rec = row_base(row, status="oom", note=f"rank {oom['rank']}: {oom['message'][:160]}",
                            memory_at_oom=oom.get("memory"))
            follow = ("oom", f"not run: out of memory at S={seq_label(row['seq'])} (memory grows with S)")
        elif res["timed_out"]:
            rec = row_base(row, status="timeout", note=f"no result after {args.timeout:.0f} s (--timeout)")
            follow = ("skipped", f"not run: timeout at S={seq_label(row['seq'])}")
        else:
            msg = msgs[0]["message"] if msgs else (_log_tail(paths["log"], 3) or f"rc {res['rc']}")
            rec = row_base(row, status="error", note=msg[:300])
            print(f"bench: {row['id']} failed (rc {res['rc']}); log tail:\n{_log_tail(paths['log'])}",
                  file=sys.stderr, flush=True)
            follow = ("skipped", f"not run: error at S={seq_label(row['seq'])}")
        record(rec)
        print(_row_line(rec, args.on_gpus), flush=True)
        for r in pending:
            if r["layout"] == row["layout"] and r["variant"] == row["variant"] and r["seq"] > row["seq"]:
                record(row_base(r, status=follow[0], note=follow[1], measured=False))
        pending = [r for r in pending if r["id"] not in done]
    print(f"bench: finished in {(time.time() - t0) / 60:.1f} min", flush=True)
    rc = write_reports(paths["jsonl"], args.out, args.tag, args.readme)
    ran = [rec for rec in done.values() if rec.get("status") in ("ok", "oom")]
    if rc == 0 and rows and not ran:
        print(f"bench: no row ran ({len(rows)} failed, timed out or were unavailable; the log: {paths['log']})",
              file=sys.stderr, flush=True)
        return 1
    return rc


# -- command line ------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-tsp bench",
        description="Benchmark TSP against TP, TP+SP, CP, TP x CP and FSDP-over-CP (peak memory, step time, "
                    "tokens/s/GPU, MFU) over sequence lengths; launches torchrun itself (do not wrap it in torchrun).",
        epilog="Layouts (N = --gpus): " + ", ".join(f"{k} ({v.label.format(n='N', half='N/2')})" for k, v in LAYOUTS.items())
               + f".\nFor tests: {FAKE_OOM_ENV} / {FAKE_HANG_ENV}=LAYOUT:SEQ:RANK simulate an OOM / a hang.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpus", type=int, default=4, help="processes (GPUs; CPU processes without CUDA) (default 4)")
    p.add_argument("--model", choices=sorted(MODELS), default="7b",
                   help="the model of a recipe, with its GQA variant: "
                        + "; ".join(f"{k}: {m.recipe}, GQA {m.gqa}" for k, m in MODELS.items()) + " (tiny: CPU tests)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default: "
                   + ", ".join(f"{m.layers} for {k}" for k, m in MODELS.items()) + ")")
    p.add_argument("--seq", default=None, help="sequence lengths, e.g. 16K,32K,64K,128K (default: "
                   + "; ".join(f"{m.seq} for {k}" for k, m in MODELS.items()) + ")")
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
    p.add_argument("--out", default=None, help=f"output folder (default ./{DEFAULT_OUT} in the current directory; "
                                               "with --from-jsonl: the file's folder). The recorded GPU results live in "
                                               "benchmarks/results, which `plan validate` reads: write there on purpose only")
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
    p.add_argument("--readme", metavar="FILE", help=f"also put the tables and the plot into FILE (docs/bench.md) "
                                                     f"between {README_BEGIN} and {README_END}")
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
    args.seq = args.seq or MODELS[args.model].seq
    args.tag = args.tag or f"{args.model}_{args.gpus}"
    args.out = args.out or DEFAULT_OUT
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("bench: --steps must be >= 1 and --warmup >= 0")
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())
