#!/usr/bin/env python3
"""Run one Megatron-LM recipe with TSP and with Megatron's TP + sequence parallelism (and,
optionally, through the patched pretrain_gpt.py), then print loss, tokens/s/GPU and peak memory
side by side and check that the loss curves agree.

    python scripts/compare_tsp_vs_tpsp.py --megatron-lm <Megatron-LM> \\
        --recipe configs/megatron_lm/7b_16k.yaml [--size 4] [--iters 30] [--out runs/compare] \\
        [--runs tsp,tp_sp,patched --patched-dir <patched Megatron-LM>] [-- extra Megatron flags]

Runs (each `torchrun --standalone --nproc-per-node N`, log in OUT/<run>.log):
  tsp      megatron_tsp.megatron_lm.run pretrain_gpt.py --tsp-recipe R --tsp-size D
  tp_sp    megatron_tsp.megatron_lm.run pretrain_gpt.py --tsp-recipe R --tsp-size 1
           --tensor-model-parallel-size D --sequence-parallel
  patched  <patched-dir>/pretrain_gpt.py --tsp-recipe R --tsp-size D  (scripts/apply_patches.sh)
Comparisons: tsp vs tp_sp and patched vs tsp, max |loss difference| per iteration against
--tolerance. tokens/s/GPU = global batch x sequence length / median iteration time / world
size, over the iterations after the first --warmup; peak memory = the largest "max allocated"
of Megatron's memory reports (--log-memory-interval) over the ranks. Writes OUT/compare.json
and OUT/compare.md; exits 1 when a run fails or a comparison is out of tolerance.
--cpu runs on the CPU with gloo (tests/megatron_lm/cpu_launcher.py); --from-logs only
compares the logs already in OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("tsp", "tp_sp", "patched")
PAIRS = (("tsp", "tp_sp"), ("patched", "tsp"))
LABELS = {"tsp": "TSP D={D}", "tp_sp": "TP={D} + SP", "patched": "TSP D={D}, patched pretrain_gpt.py"}

ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+) \|.*?lm loss: ([-+\d.Ee]+) \|")
MEMORY = re.compile(r"\[Rank (\d+)\] \(after (\d+) iterations\) memory \(MB\) \| allocated: ([\d.]+) \| max allocated: ([\d.]+)")
ARG = re.compile(r"^\s+(\w+) \.+ (.+)$")


def parse_log(path: str) -> dict:
    """Iterations (loss, ms), peak memory and the run's arguments from a Megatron-LM log."""
    iterations, peaks, args = {}, [], {}
    with open(path, errors="replace") as f:
        for line in f:
            m = ITERATION.search(line)
            if m:
                iterations[int(m.group(1))] = {"loss": float(m.group(3)), "ms": float(m.group(2))}
                continue
            m = MEMORY.search(line)
            if m:
                peaks.append(float(m.group(4)))
                continue
            m = ARG.match(line)
            if m and m.group(1) not in args:
                args[m.group(1)] = m.group(2).strip()
    return {"iterations": iterations, "peak_mb": max(peaks) if peaks else None, "args": args}


def summarize(name: str, parsed: dict, warmup: int, rc) -> dict:
    its, args = parsed["iterations"], parsed["args"]
    steady = [v["ms"] for k, v in sorted(its.items()) if k > warmup] or [v["ms"] for v in its.values()]
    median_ms = statistics.median(steady) if steady else None
    tokens_per_s_gpu = None
    try:
        tokens = int(args["global_batch_size"]) * int(args["seq_length"])
        world = int(args["world_size"])
        if median_ms:
            tokens_per_s_gpu = tokens / (median_ms / 1000.0) / world
    except (KeyError, ValueError):
        pass
    peak = parsed["peak_mb"]
    return {
        "run": name, "rc": rc, "iterations": len(its),
        "final_loss": its[max(its)]["loss"] if its else None,
        "median_iteration_ms": median_ms, "tokens_per_s_per_gpu": tokens_per_s_gpu,
        "peak_allocated_gb": None if peak is None else peak / 1024.0,
        "tensor_model_parallel_size": args.get("tensor_model_parallel_size"),
        "tsp_size": args.get("tsp_size"), "sequence_parallel": args.get("sequence_parallel"),
        "losses": {k: v["loss"] for k, v in sorted(its.items())},
    }


def compare(a: dict, b: dict, tolerance: float, expected: int | None) -> dict:
    common = sorted(set(a["losses"]) & set(b["losses"]))
    diffs = [abs(a["losses"][k] - b["losses"][k]) for k in common]
    worst = max(diffs) if diffs else None
    complete = bool(common) and (expected is None or len(common) >= expected)
    ok = complete and a["rc"] in (0, None) and b["rc"] in (0, None) and worst <= tolerance
    return {"runs": [a["run"], b["run"]], "iterations_compared": len(common), "max_abs_loss_diff": worst,
            "worst_iteration": common[diffs.index(worst)] if diffs else None, "tolerance": tolerance, "ok": ok}


def command(run: str, opts, D: int) -> list:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(opts.nproc or D)]
    launcher = [os.path.join(REPO, "tests", "megatron_lm", "cpu_launcher.py")] if opts.cpu else ["-m", "megatron_tsp.megatron_lm.run"]
    if run == "patched":
        if not opts.patched_dir:
            raise SystemExit("compare_tsp_vs_tpsp.py: error: --runs patched needs --patched-dir")
        script = os.path.join(opts.patched_dir, "pretrain_gpt.py")
        launcher = launcher + ["--direct"] if opts.cpu else []
    else:
        script = os.path.join(opts.megatron_lm, "pretrain_gpt.py")
    flags = ["--tsp-recipe", opts.recipe]
    flags += ["--tsp-size", "1", "--tensor-model-parallel-size", str(D), "--sequence-parallel"] if run == "tp_sp" else ["--tsp-size", str(D)]
    if opts.iters:
        flags += ["--train-iters", str(opts.iters)]
    if opts.cpu:
        flags += ["--distributed-backend", "gloo"]
    return torchrun + launcher + [script] + flags + opts.extra


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="compare_tsp_vs_tpsp.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM_DIR"), help="Megatron-LM tree (default: $MEGATRON_LM_DIR)")
    p.add_argument("--recipe", required=True, help="a recipe of configs/megatron_lm/")
    p.add_argument("--size", type=int, default=None, help="D: TSP size and TP size (default: the recipe's --tsp-size)")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: D)")
    p.add_argument("--iters", type=int, default=None, help="--train-iters for every run (default: the recipe's)")
    p.add_argument("--runs", default="tsp,tp_sp", help="comma-separated, of tsp, tp_sp, patched (default: tsp,tp_sp)")
    p.add_argument("--patched-dir", default=None, help="a Megatron-LM tree patched by scripts/apply_patches.sh")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--tolerance", type=float, default=1e-2, help="max |loss difference| per iteration (default 1e-2)")
    p.add_argument("--warmup", type=int, default=3, help="iterations left out of the timing (default 3)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per run")
    p.add_argument("--cpu", action="store_true", help="CPU and gloo (tests/megatron_lm/cpu_launcher.py)")
    p.add_argument("--from-logs", action="store_true", help="compare the logs in --out without running")
    opts = p.parse_args(argv)
    opts.extra = extra
    runs = [r for r in opts.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        p.error(f"--runs: {','.join(bad) or 'empty'} not in {', '.join(RUNS)}")
    if not os.path.isfile(opts.recipe):
        p.error(f"--recipe {opts.recipe}: no such file")
    sys.path.insert(0, REPO)
    from megatron_tsp.megatron_lm.arguments import load_recipe

    flags, _ = load_recipe(opts.recipe)
    D = opts.size or int((flags.get("--tsp-size") or ["0"])[0])
    if D < 2:
        p.error("--size: give D >= 2 (the recipe has no --tsp-size > 1)")
    iters = opts.iters or int((flags.get("--train-iters") or ["0"])[0]) or None
    if not opts.from_logs and not (opts.megatron_lm and os.path.isfile(os.path.join(opts.megatron_lm, "pretrain_gpt.py"))):
        p.error("--megatron-lm: give a Megatron-LM tree with pretrain_gpt.py (or set MEGATRON_LM_DIR)")
    os.makedirs(opts.out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")

    summaries = {}
    for run in runs:
        log = os.path.join(opts.out, f"{run}.log")
        rc = None
        if not opts.from_logs:
            cmd = command(run, opts, D)
            print(f"[{run}] {shlex.join(cmd)}", flush=True)
            t0 = time.time()
            with open(log, "w") as f:
                f.write("# " + shlex.join(cmd) + "\n")
                f.flush()
                try:
                    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=opts.timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            print(f"[{run}] rc={rc} in {time.time() - t0:.0f} s, log {log}", flush=True)
        if not os.path.isfile(log):
            print(f"[{run}] no log {log}", file=sys.stderr)
            continue
        summaries[run] = summarize(run, parse_log(log), opts.warmup, rc)
        if rc not in (0, None):
            with open(log, errors="replace") as f:
                tail = [line for line in f if "rror" in line][-3:]
            print(f"[{run}] FAILED: " + "".join(tail).strip(), file=sys.stderr)

    comparisons = [compare(summaries[a], summaries[b], opts.tolerance, iters)
                   for a, b in PAIRS if a in summaries and b in summaries]
    rows = [("run", "iterations", "final loss", "median ms/iter", "tokens/s/GPU", "peak alloc GB")]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for name, s in summaries.items():
        rows.append((LABELS[name].format(D=D), str(s["iterations"]), fmt(s["final_loss"], ".4f"),
                     fmt(s["median_iteration_ms"], ".1f"), fmt(s["tokens_per_s_per_gpu"], ",.0f"),
                     fmt(s["peak_allocated_gb"], ".2f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    loss_rows = ["| iteration | " + " | ".join(summaries) + " |", "|---" * (len(summaries) + 1) + "|"]
    all_iters = sorted(set().union(*(s["losses"] for s in summaries.values()))) if summaries else []
    for k in all_iters:
        loss_rows.append(f"| {k} | " + " | ".join(fmt(s["losses"].get(k), ".6f") for s in summaries.values()) + " |")
    verdicts = [f"{c['runs'][0]} vs {c['runs'][1]}: max |loss diff| = {fmt(c['max_abs_loss_diff'], '.2e')} over "
                f"{c['iterations_compared']} iterations (tolerance {c['tolerance']:g}): {'OK' if c['ok'] else 'FAIL'}"
                for c in comparisons]
    print(table + "\n" + "\n".join(verdicts))

    report = {"recipe": opts.recipe, "size": D, "runs": summaries, "comparisons": comparisons,
              "extra_flags": opts.extra, "megatron_lm": opts.megatron_lm}
    with open(os.path.join(opts.out, "compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = [f"# TSP vs TP + SP: `{opts.recipe}`, D = {D}", "",
          "| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", *(f"- {v}" for v in verdicts), "", "## Loss per iteration", "", *loss_rows, ""]
    with open(os.path.join(opts.out, "compare.md"), "w") as f:
        f.write("\n".join(md))
    ok = len(summaries) == len(runs) and all(s["rc"] in (0, None) for s in summaries.values()) \
        and all(c["ok"] for c in comparisons) and (len(runs) < 2 or comparisons)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
