"""What is alive at a step's memory peak, grouped by where it was allocated (one GPU).

    python benchmarks/memory_at_peak.py --seq 128K --mode full_uniform [--top 30]

Builds and steps the model exactly as benchmarks/frontier_d1.py does (same recipe, same mode
overrides), one warm-up step, then one step under torch.cuda.memory._record_memory_history.
From the allocator's trace it replays every allocation and free, finds the moment of the
highest allocated total, and prints the blocks alive then, grouped by the innermost frame in
megatron_tsp / megatron (the code that asked for them): the evidence for the planner's
memory model (docs/frontier.md), where frontier_d1 only gives the peak.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(__file__))

import frontier_d1  # noqa: E402


def _site(frames) -> str:
    """The innermost frame of our code or Megatron's (else the innermost Python frame)."""
    for f in frames:
        name = f.get("filename", "")
        if "megatron_tsp" in name or "/megatron/" in name:
            short = name.split("megatron_tsp/")[-1] if "megatron_tsp" in name else "megatron/" + name.split("/megatron/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{os.path.basename(f['filename'])}:{f.get('line')} {f.get('name')}"
    return "?"


def live_at_peak(snapshot):
    """Replay the trace: (peak bytes, {site: (bytes, count)}) for the blocks alive at the peak."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in snapshot["device_traces"][0]:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, event.get("frames", []))
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in ("free_requested",) and addr in live:
            total -= live.pop(addr)[0]
    groups = collections.defaultdict(lambda: [0, 0])
    for size, frames in at_peak.values():
        g = groups[_site(frames)]
        g[0] += size
        g[1] += 1
    return peak, groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", default="128K")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mode", default="full_uniform", help="a frontier_d1 mode")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", help="write the groups as JSON here")
    args = p.parse_args(argv)
    import torch

    from megatron_tsp.training.build import init_distributed

    from megatron_tsp.training.cpu import install_cpu_shims

    init_distributed()

    install_cpu_shims()  # no-op with CUDA
    S = frontier_d1.parse_seq(args.seq)
    keys = dict(next(m[2] for m in frontier_d1.modes(args.layers) if m[0] == args.mode))
    base = {"model.num_layers": args.layers, "parallel.layout": "tsp", "parallel.size": 1,
            "train.micro_batch_size": 1, "train.global_batch_size": 1, "model.seq_length": S}
    over = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in dict(base, **keys).items()]
    # one warm-up step builds every persistent buffer (optimizer state, grad buffers)
    recorded = {}

    def record(step):
        if step == 1:
            recorded["base"] = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

    result = frontier_d1.measure(over, warmup=1, steps=1, before_step=record)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, groups = live_at_peak(snapshot)
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    print(f"[memory_at_peak] {args.mode} S={S}: step peak {result.get('peak_allocated_gib')} GiB (max_memory_allocated);"
          f" allocated before the traced step {recorded['base'] / 2**30:.2f} GiB (model states), plus at the traced"
          f" step's peak {peak / 2**30:.2f} GiB:")
    for site, (nbytes, count) in rows[:args.top]:
        print(f"  {nbytes / 2**30:8.3f} GiB  {count:5d} blocks  {site}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"mode": args.mode, "seq_len": S, "overrides": over, "measured": result,
                       "traced_peak_gib": peak / 2**30, "before_step_gib": recorded["base"] / 2**30,
                       "groups": [{"site": s, "gib": b / 2**30, "blocks": c} for s, (b, c) in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
