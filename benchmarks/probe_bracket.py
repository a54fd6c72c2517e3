"""The measured frontier, bracketed cheaply: per layout, the planner's longest context and one step
of 6% beyond it (or before it, when the guess does not fit), each one probe of full depth in memory
mode in a fresh process, layouts interleaved so that a short lease measures every layout's first
point. `megatron-tsp probe --frontier` then narrows a bracket to 2% when there is time.

    python benchmarks/probe_bracket.py --world 4 --layouts tsp,fsdp_cp4 --host-memory-gb 400 --out b.jsonl
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--layouts", default="tsp,fsdp_cp4")
    p.add_argument("--host-memory-gb", type=float, default=400.0)
    p.add_argument("--gpu-memory-gb", type=float, default=None)
    p.add_argument("--step", type=float, default=1.06)
    # the levers of issue 26, as `megatron-tsp probe --frontier` takes them
    p.add_argument("--mlp-chunk-tokens", type=int, default=0)
    p.add_argument("--tsp-attention-kv", default="gathered", choices=("gathered", "streamed"))
    p.add_argument("--cp-comm-type", default="all_gather", choices=("all_gather", "p2p"))
    p.add_argument("--optimizer-cpu-offload", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch

    from megatron_tsp.probe import predict
    from megatron_tsp.probe.cli import measure_in_child, planner_guess
    from megatron_tsp.probe.frontier import Search, granularity, layout_overrides

    capacity = args.gpu_memory_gb or torch.cuda.get_device_properties(0).total_memory / 2**30
    base = ["train.global_batch_size=1", "train.micro_batch_size=1"]
    if args.mlp_chunk_tokens:  # the planner's guess then counts the tiled MLP too
        base.append(f"parallel.mlp_chunk_tokens={args.mlp_chunk_tokens}")
    ns = argparse.Namespace(recipe=RECIPE, overrides=base, world=args.world, gpus_per_node=args.world,
                            host_memory_gb=args.host_memory_gb, max_seq=16 * 2**20, hardware="h200x4")
    host = args.host_memory_gb / args.world
    plans = {}
    for name in args.layouts.split(","):
        lay = layout_overrides(name, args.world)
        guess = planner_guess(ns, lay, capacity)
        if not guess:
            print(f"[probe_bracket] {name}: the planner finds no context that fits; skipped", flush=True)
            continue

        def offload_gib(S, opts, lay=lay):
            return predict(RECIPE, base + lay + opts + [f"model.seq_length={S}"], args.world, args.world, capacity,
                           "h200x4").get("host_gib")  # offloaded inputs + optimizer state

        unit = granularity(guess, args.world)
        plans[name] = {"lay": lay, "search": Search(name, args.world, host, None, offload_gib, mlp_chunk_tokens=args.mlp_chunk_tokens,
                                         attention_kv=args.tsp_attention_kv, cp_comm_type=args.cp_comm_type,
                                         optimizer_offload=args.optimizer_cpu_offload), "unit": unit,
                       "points": [guess // unit * unit]}
    prior = {}  # resume: a later run with the same --out re-reads the points it measured
    if os.path.exists(args.out):
        with open(args.out) as f:
            for r in map(json.loads, f):
                prior.setdefault(r["layout"], []).append(r)
    for round_ in range(2):
        for name, plan in plans.items():
            if round_ == 1:
                first = plan["result"][0]
                k = first["seq_len"] // plan["unit"]
                nxt = int(k * args.step) if first["oom"] is None else int(k / args.step)
                plan["points"].append(max(1, nxt) * plan["unit"])
            S = plan["points"][round_]
            done = prior.get(name, [])
            if round_ < len(done):  # measured by an earlier run
                plan.setdefault("result", []).append({"seq_len": done[round_]["seq_len"],
                                                      "oom": done[round_]["measured"].get("oom")})
                plan["points"][round_] = done[round_]["seq_len"]
                continue
            opts = plan["search"].options(S)
            t0 = time.time()
            m = measure_in_child(RECIPE, base + plan["lay"] + opts + [f"model.seq_length={S}"], args.world, 1, "all",
                                 capacity)
            row = {"layout": name, "seq_len": S, "world": args.world, "options": opts, "capacity_gib": capacity,
                   "host_memory_gb_per_node": args.host_memory_gb, "planner_guess": plan["points"][0],
                   "measured": m, "wall_s": time.time() - t0, "commit": os.environ.get("TSP_COMMIT", "unknown")}
            plan.setdefault("result", []).append({"seq_len": S, "oom": m.get("oom")})
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            peak = "OOM" if m.get("oom") else f"{m['peak_allocated_gib']:.2f} GiB"
            print(f"[probe_bracket] {name} S={S} ({S // 1024}K): {peak}, {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
