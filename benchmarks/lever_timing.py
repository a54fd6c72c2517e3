"""What each memory lever costs in compute time (issue 26): one rank of a D-rank job of the 7B
(`configs/7b_16k.yaml`) on this GPU through the probe (torch's fake process group: kernels and
allocations real, communication not run), each configuration in a fresh process, one warm-up step
and one measured step.

    python benchmarks/lever_timing.py --world 4 --seq 512K --layers 2 --out rows.jsonl

Every row starts from the frontier's lean options (Megatron's full recompute, uniform, one layer
per checkpoint; for TSP its in-layer recompute and sequence-local LM head) and adds one lever:
the token-tiled MLP at several chunk sizes, TSP's streamed K/V, the optimizer state on the host
(distributed optimizer + megatron-core's CPU offload). The MLP chunk rows also run with attention
stood in (`--memory-mode attention`), so the MLP's own cost is not lost in attention's S^2 time.
Not measured: communication (so streamed K/V's overlap is not seen here, only its extra kernels).
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


def configs(layout: str, chunks):
    """(name, overrides, memory modes) per lever for one bench layout."""
    from megatron_tsp.probe.frontier import OPTIMIZER_ON_HOST
    tsp = layout == "tsp"
    out = [("base", [], (None, "attention"))]
    out += [(f"mlp_chunk_{c}", [f"parallel.mlp_chunk_tokens={c}"], (None, "attention") if c == chunks[0]
             else ("attention",)) for c in chunks]
    if tsp:
        out.append(("kv_streamed", ["parallel.tsp_attention_kv=streamed"], (None,)))
    out.append(("optimizer_on_host", OPTIMIZER_ON_HOST, ("attention",)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq", default="512K")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--layouts", default="tsp")
    p.add_argument("--chunks", default="8192,4096,16384,32768", help="MLP chunk sizes (tokens); the first also "
                   "runs with real attention")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from megatron_tsp.probe import ProbeError
    from megatron_tsp.probe.cli import measure_in_child
    from megatron_tsp.bench.rows import parse_seq
    from megatron_tsp.probe.frontier import LEAN, LEAN_TSP, layout_overrides

    S = parse_seq(args.seq)
    chunks = [int(c) for c in args.chunks.split(",")]
    done = set()
    if os.path.exists(args.out):  # resume: a later run with the same file skips what it holds
        with open(args.out) as f:
            done = {(r["layout"], r["config"], r["mode"]) for r in map(json.loads, f)}
    for layout in args.layouts.split(","):
        lay = layout_overrides(layout, args.world)
        lean = LEAN + (LEAN_TSP if layout == "tsp" else [])
        for name, extra, modes in configs(layout, chunks):
            for mode in modes:
                if (layout, name, mode) in done:
                    continue
                over = ["train.global_batch_size=1", "train.micro_batch_size=1", f"model.num_layers={args.layers}",
                        f"model.seq_length={S}"] + lay + lean + extra
                t0 = time.time()
                try:
                    m = measure_in_child(args.recipe, over, args.world, 1, mode, None)
                except ProbeError as e:
                    m = {"error": str(e)}
                row = {"layout": layout, "config": name, "mode": mode, "seq_len": S, "world": args.world,
                       "layers": args.layers, "overrides": over, "measured": m, "wall_s": time.time() - t0,
                       "commit": os.environ.get("TSP_COMMIT", "unknown")}
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                what = m.get("error") or ("OOM" if m.get("oom") else
                                          f"step {m.get('step_time_s', float('nan')):.3f} s, "
                                          f"peak {m.get('peak_allocated_gib', float('nan')):.2f} GiB")
                print(f"[lever_timing] {layout} {name} ({mode or 'real'}): {what}, {time.time() - t0:.0f} s",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
