"""Issue 25 on one GPU: the probe's rows for the memory-mode check, the compute-time profile and
the planner recalibration, many configurations in one process (one import, one device lease).

    python benchmarks/probe_gpu.py --jobs check --seq 256K --layers 4 --world 4 --out $OUT/check.jsonl
    python benchmarks/probe_gpu.py --jobs profile --seq 256K --layers 2 --world 4 --out $OUT/profile.jsonl

Jobs (7B width: configs/7b_16k.yaml, micro-batch 1, Megatron's full recompute, uniform, N = 1;
layouts by their bench names, sized by --world):
    check    per layout: a real step, memory mode "attention", memory mode "all" (peaks compared)
    profile  per layout: one real step under torch.profiler (kernel time by category)
    rows     per layout x --world x --layers x --seq: one step in --mode (the recalibration rows;
             default memory mode "all", checked against real steps by `check`)
Each result is a JSON line in --out, written as it comes (a timed-out call keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
RECIPE = os.path.join(ROOT, "configs", "7b_16k.yaml")
LEAN = ["parallel.recompute=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=1"]


def parse_seq(text: str) -> int:
    t = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", choices=("check", "profile", "rows"), required=True)
    p.add_argument("--seq", default="256K", help="contexts (comma-separated, K / M suffixes)")
    p.add_argument("--layers", default="4", help="layer counts (comma-separated)")
    p.add_argument("--world", default="4", help="world sizes (comma-separated)")
    p.add_argument("--mode", default="all", help="rows: memory mode (attention, all, or real)")
    p.add_argument("--layouts", default="tsp,tp_sp,cp4,tp2_cp2,fsdp_cp4")
    p.add_argument("--extra", default="", help="more recipe overrides (comma-separated)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from megatron_tsp.output import hide_benign_output

    hide_benign_output(announce=False)
    from megatron_tsp.probe import measure, predict
    from megatron_tsp.probe.frontier import layout_overrides
    from megatron_tsp.training.recipe import load_recipe

    rows_mode = None if args.mode == "real" else args.mode
    modes = {"check": [None, "attention", "all"], "profile": [None], "rows": [rows_mode]}[args.jobs]
    extra = [e for e in args.extra.split(",") if e]
    combos = [(S, name, layers, world) for world in map(int, args.world.split(","))
              for layers in map(int, args.layers.split(",")) for S in [parse_seq(s) for s in args.seq.split(",")]
              for name in args.layouts.split(",")]
    for S, name, layers, world in combos:
        over = (["train.global_batch_size=1", "train.micro_batch_size=1", f"model.num_layers={layers}",
                 f"model.seq_length={S}"] + layout_overrides(name, world) + LEAN + extra)
        pred = predict(RECIPE, over, world, 8, None, "h200x4")
        for mode in modes:
            t0 = time.time()
            m = measure(load_recipe(RECIPE, over), world, 0, warmup=1, steps=1, memory_mode=mode,
                        profile=args.jobs == "profile")
            row = {"job": args.jobs, "layout": name, "seq_len": S, "layers": layers, "world": world,
                   "overrides": over, "memory_mode": mode, "measured": m, "predicted": pred,
                   "wall_s": time.time() - t0, "commit": os.environ.get("TSP_COMMIT", "unknown")}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            peak = "OOM" if m.get("oom") else f"{m['peak_allocated_gib']:.2f} GiB"
            ratio = (f"{m['peak_allocated_gib'] / pred['peak_gib']:.3f}" if not m.get("oom") and pred.get("peak_gib")
                     else "-")
            print(f"[probe_gpu] {args.jobs} {name} W={world} S={S // 1024}K L={layers} mode={mode}: peak {peak} "
                  f"(planner {pred.get('peak_gib', float('nan')):.2f}, ratio {ratio}), step "
                  f"{m.get('step_time_s', float('nan')):.2f} s, wall {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
