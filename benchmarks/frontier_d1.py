"""Issue 14, "On one H200 GPU": peak memory and step time of TSP's memory options at D = 1,
measured beside the planner's prediction for the same configuration.

    python benchmarks/frontier_d1.py --seq 256K,512K,1M --layers 4 \\
        --out benchmarks/results/frontier_d1_h200.jsonl           # one GPU, world 1
    python benchmarks/frontier_d1.py --smoke                      # CPU, a tiny float32 model

The model is configs/7b_16k.yaml's (h 4096, 32 heads, SwiGLU f 16384, vocab 32000, bf16) with
`--layers` layers at context S, layout tsp with parallel.size = 1, built and stepped by the
project's own driver (megatron_tsp.training.loop: build, build_train_dataset, micro_batches,
train_step), one micro-batch per step, the Adam step included (train_step runs it; the
planner is asked with the optimizer too). Per (mode, S): a fresh build, `--warmup` steps, then
`--steps` timed steps; torch.cuda.max_memory_allocated over the steps (model states included,
the build's transients not) and the median step time. An out-of-memory row is recorded as such.

Modes (recipe overrides; one whose keys this checkout's recipe does not have yet is skipped and
listed, so the script runs on whatever has been merged):

    save            parallel.tsp_recompute=none (TSP keeps per-shard activations)
    tsp_full        parallel.tsp_recompute=full (block recompute inside the layer)
    full_uniform    parallel.recompute=full, uniform, N=1 (Megatron's checkpoint around TSP layers)
    full_uniform_tsp_full   the same with tsp_recompute=full inside
    full_block      parallel.recompute=full, block, N = layers/2
    offload         full uniform N=1 + parallel.offload_activations=true
    head_megatron   tsp_full with parallel.tsp_lm_head=megatron (Megatron's S x V logits); every
                    other mode runs the recipe's default head (local where it exists)

Each JSONL row: the mode, S, the overrides, what was measured, the planner's prediction
(megatron_tsp.planner at this commit, hardware profile `--hardware`, norms as the code builds
them: lean when megatron_tsp.tsp.norm has them, else torch's composite) and measured / predicted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

RECIPE = os.path.join(ROOT, "configs", "7b_16k.yaml")
SMOKE = {"model.hidden_size": 64, "model.num_attention_heads": 4, "model.ffn_hidden_size": 128,
         "model.vocab_size": 256, "model.dtype": "float32"}


def modes(layers: int):
    full = {"parallel.recompute": "full", "parallel.recompute_method": "uniform", "parallel.recompute_num_layers": 1}
    return [
        ("save", "TSP save activations", {"parallel.tsp_recompute": "none"}),
        ("tsp_full", "TSP block recompute", {"parallel.tsp_recompute": "full"}),
        ("full_uniform", "Megatron full uniform N=1 around TSP save", dict(full, **{"parallel.tsp_recompute": "none"})),
        ("full_uniform_tsp_full", "Megatron full uniform N=1 around TSP block",
         dict(full, **{"parallel.tsp_recompute": "full"})),
        ("full_block", f"Megatron full block N={max(1, layers // 2)}",
         {"parallel.recompute": "full", "parallel.recompute_method": "block",
          "parallel.recompute_num_layers": max(1, layers // 2), "parallel.tsp_recompute": "none"}),
        ("offload", "Megatron full uniform N=1 + offload", dict(full, **{"parallel.offload_activations": True})),
        ("head_megatron", "TSP block recompute, Megatron's LM head (compare tsp_full: the default head)",
         {"parallel.tsp_recompute": "full", "parallel.tsp_lm_head": "megatron"}),
    ]


def parse_seq(text: str) -> int:
    t = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2}.get(t[-1:], 1)
    return int(t[:-1] if scale > 1 else t) * scale


def recipe_keys() -> set:
    """`section.key` of every recipe field this checkout has."""
    from megatron_tsp.training import recipe as r

    return {f"{section}.{f.name}" for section, cls in (("model", r.ModelRecipe), ("parallel", r.ParallelRecipe),
                                                       ("train", r.TrainRecipe), ("data", r.DataRecipe))
            for f in dataclasses.fields(cls)}


def norm_kind() -> str:
    """How the code's TSPNorm saves (the planner's --norm): lean norms when present, TE's fused."""
    from megatron_tsp.tsp import norm

    if norm._te_norm() is not None:
        return "fused"
    return "lean" if hasattr(norm, "LeanRMSNorm") else "torch"


def predict(overrides: list, hardware: str, capacity_gib: float) -> dict:
    from megatron_tsp.planner import Cluster, Layout, ModelSpec, TrainSpec, hardware as hw_mod, plan_layout
    from megatron_tsp.planner.model import recipe_train_options

    model, seq = ModelSpec.from_recipe(RECIPE, overrides)
    opts = recipe_train_options(RECIPE, overrides)
    train = TrainSpec(seq_length=seq, global_batch_size=1, norm=norm_kind(), **opts)
    p = plan_layout(model, train, Layout("tsp", tsp_size=1), Cluster(gpus_per_node=1, gpu_memory_gib=capacity_gib),
                    hw_mod.load(hardware))
    return {"peak_gib": p.memory.peak / 2**30, "peak_point": p.memory.peak_point, "fits": p.fits,
            "step_time_s": p.time["as_implemented"], "norm": train.norm,
            "peak_breakdown_gib": {k: v / 2**30 for k, v in p.memory.at_peak.items()}}


def measure(overrides: list, warmup: int, steps: int, before_step=None) -> dict:
    """`before_step(i)`, when given, runs before step i (benchmarks/memory_at_peak.py traces one)."""
    import torch

    from megatron_tsp.training import loop as driver
    from megatron_tsp.training.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides)
    recipe.check(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    pgs = driver.init_groups(recipe)
    model = ddp = optimizer = None
    try:
        model, ddp, optimizer = driver.build(recipe, pgs)
        dataset = driver.build_train_dataset(recipe)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(warmup + steps):
            batches = list(driver.micro_batches(dataset, step, recipe, 0, 1, device, pgs.cp))
            if cuda:
                torch.cuda.synchronize()
            if before_step is not None:
                before_step(step)
            t0 = time.perf_counter()
            loss, _ = driver.train_step(ddp, optimizer, batches, recipe, pgs)
            if cuda:
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "step_time_s": statistics.median(times), "loss": loss, "oom": False}
    except torch.OutOfMemoryError as e:
        return {"oom": True, "error": str(e).splitlines()[0][:200]}
    except torch.distributed.DistBackendError as e:
        # NCCL reports a failed allocation of its own buffers as an unhandled CUDA error
        return {"oom": True, "error": "NCCL: " + str(e).splitlines()[0][:200]}
    finally:
        del model, ddp, optimizer
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _commit() -> str:
    if os.environ.get("TSP_COMMIT"):  # the GPU machine gets a copy of the tree without .git
        return os.environ["TSP_COMMIT"]
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="256K,512K,1M", help="contexts S (comma-separated; K, M suffixes)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--modes", help="comma-separated subset of the modes (default: all)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--hardware", default="h200x4", help="planner hardware profile for the predictions")
    p.add_argument("--out", help="append one JSON line per row here")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny float32 model (h 64, S 128 and 256, 2 layers)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import torch

    from megatron_tsp.training.build import init_distributed

    from megatron_tsp.training.cpu import install_cpu_shims

    init_distributed()

    install_cpu_shims()  # no-op with CUDA
    seqs = [128, 256] if args.smoke else [parse_seq(s) for s in args.seq.split(",")]
    layers = 2 if args.smoke else args.layers
    known = recipe_keys()
    chosen = modes(layers)
    if args.modes:
        names = args.modes.split(",")
        unknown = sorted(set(names) - {m[0] for m in chosen})
        if unknown:
            print(f"error: --modes: unknown {unknown}; modes: {', '.join(m[0] for m in chosen)}", file=sys.stderr)
            return 2
        chosen = [m for m in chosen if m[0] in names]
    run, skipped = [], []
    for name, label, keys in chosen:
        missing = sorted(k for k in keys if k not in known)
        if missing:
            skipped.append(f"{name}: {', '.join(missing)} not in this checkout's recipe (branch not merged)")
        else:
            run.append((name, label, keys))
    cuda = torch.cuda.is_available()
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 139.8
    meta = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "commit": _commit(), "torch": torch.__version__,
            "optimizer": "adam step included (megatron_tsp.training.loop.train_step)", "layers": layers}
    base = dict(SMOKE if args.smoke else {}, **{"model.num_layers": layers, "parallel.layout": "tsp",
                                                "parallel.size": 1, "train.micro_batch_size": 1,
                                                "train.global_batch_size": 1})
    if args.smoke and "parallel.lm_head_chunk_tokens" in known:
        base["parallel.lm_head_chunk_tokens"] = 32
    rows = []
    for S in seqs:
        for name, label, keys in run:
            over = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in
                    dict(base, **{"model.seq_length": S}, **keys).items()]
            row = dict(meta, mode=name, label=label, seq_len=S, overrides=over)
            row["predicted"] = predict(over, args.hardware, capacity)
            row["measured"] = measure(over, args.warmup, args.steps)
            m, p = row["measured"], row["predicted"]
            row["ratio_peak"] = m["peak_allocated_gib"] / p["peak_gib"] if m.get("peak_allocated_gib") else None
            # the prediction is for the profiled GPU: no time ratio on CPU (--smoke)
            row["ratio_time"] = m["step_time_s"] / p["step_time_s"] if m.get("step_time_s") and cuda else None
            rows.append(row)
            if m["oom"]:
                meas = "OOM"
            else:
                peak = f"{m['peak_allocated_gib']:.2f} GiB" if m["peak_allocated_gib"] is not None else "- GiB (CPU)"
                meas = f"{peak}, {m['step_time_s']:.3f} s"
            ratios = [f"{what} x{row[key]:.2f}" for what, key in (("memory", "ratio_peak"), ("time", "ratio_time"))
                      if row[key] is not None]
            print(f"[frontier_d1] S={S} {name:22s} measured {meas}; predicted {p['peak_gib']:.2f} GiB "
                  f"({p['peak_point']}), {p['step_time_s']:.3f} s; measured/predicted: {', '.join(ratios)}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    for s in skipped:
        print(f"[frontier_d1] skipped {s}", flush=True)
    if args.out and skipped:
        with open(args.out, "a") as f:
            f.write(json.dumps(dict(meta, skipped=skipped)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
