"""`megatron-tsp probe RECIPE [key=value ...] --world N`: measure rank R of an N-GPU job of the
recipe's layout on this one GPU (CPU for tiny models), beside the planner's prediction.

    megatron-tsp probe configs/7b_16k.yaml parallel.size=4 model.num_layers=4 model.seq_length=524288 \\
        train.global_batch_size=1 train.micro_batch_size=1 parallel.recompute=full --world 4
    megatron-tsp probe configs/tiny.yaml parallel.layout=tp_sp parallel.size=4 --world 4 --json

Measured per rank (torch's fake process group: collectives are no-ops, allocations and kernels
real): peak allocated and reserved memory of a step after warm-up, the model states resident
when the step starts, the activations kept at the end of the forward, the backward's working set
above them, and the compute-only step time. Not measured: communication time, NCCL's buffers,
values (the loss can be NaN).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

PROG = "megatron-tsp probe"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("recipe", help="a training recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    p.add_argument("--world", type=int, required=True, help="GPUs of the job whose rank is measured")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--rank", type=int, default=None, help="the rank measured (default 0)")
    where.add_argument("--stage", type=int, default=None,
                       help="with parallel.pipeline_size > 1: measure the first rank of this pipeline stage")
    p.add_argument("--warmup", type=int, default=1, help="steps before measuring (>= 1: Adam allocates its moments "
                                                         "in the first step)")
    p.add_argument("--steps", type=int, default=1, help="measured steps (the peak is their largest, the time their median)")
    p.add_argument("--memory-mode", choices=("attention", "all"), default=None,
                   help="kernels replaced by stand-ins that allocate what the real kernels allocate and skip the "
                        "arithmetic: attention's (step time = the rest of the step), or all: attention's and the GEMMs' "
                        "(step time meaningless); for contexts whose step takes hours")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="capacity per GPU (GiB) for the planner's fits and, on a GPU, the allocator's limit (at most "
                        "the device's; default: the device's)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="the planner's node size (default 8)")
    p.add_argument("--hardware", default="h200x4", help="the planner's hardware profile for times (default h200x4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--inference", action="store_true",
                   help="TSP prefill of one prompt (--prompt-tokens, default the recipe's S) and the first decode step "
                        "at TP = D, instead of a training step (parallel.layout = tsp, --world = parallel.size)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="--inference: the prompt's length (default: the recipe's S less the two generated tokens)")
    f = p.add_argument_group("--frontier: the longest context per layout whose measured peak fits (memory mode, "
                             "the recipe's model at its depth)")
    f.add_argument("--frontier", action="store_true", help="search the longest context per layout")
    f.add_argument("--layouts", default=None, help="comma-separated bench layouts (megatron-tsp bench's names, "
                                                   "sized by --world; default tsp,tp_sp,cp4,tp2_cp2,fsdp_cp4)")
    f.add_argument("--start-seq", default=None,
                   help="first context tried: tokens, or auto: the planner's frontier for the layout, then steps of 6%% "
                        "(default: the recipe's S, then doubling)")
    f.add_argument("--max-seq", type=int, default=16 * 2**20, help="largest context searched (default 16M)")
    f.add_argument("--host-memory-gb", type=float, default=512.0,
                   help="host memory per node (GiB) for offloaded inputs and optimizer state, shared by "
                        "--gpus-per-node GPUs (default 512)")
    f.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="the optimizer state on the host too (train.optimizer_cpu_offload, with the distributed "
                        "optimizer; bf16 models; not the FSDP layouts) where the host memory holds it")
    f.add_argument("--time-at", type=int, default=None,
                   help="context of the real step the frontier's step time is extrapolated from (default: none)")
    f.add_argument("--mlp-chunk-tokens", type=int, default=0,
                   help="the token-tiled MLP (parallel.mlp_chunk_tokens) in every layout's lean options (default 0: off)")
    f.add_argument("--tsp-attention-kv", choices=("gathered", "streamed"), default="gathered",
                   help="TSP's attention K/V (parallel.tsp_attention_kv) in its lean options (default gathered)")
    f.add_argument("--cp-comm-type", choices=("all_gather", "p2p"), default="all_gather",
                   help="the CP layouts' attention K/V (parallel.cp_comm_type) in their lean options: all_gather "
                        "(default) or p2p (ring attention)")
    f.add_argument("--in-process", action="store_true",
                   help="run every probe in this process (default: each in a fresh one, so nothing of an earlier "
                        "probe stays allocated)")
    f.add_argument("--out", default=None, help="append every probe as a JSON line here (a rerun skips those present)")
    return p


def _fmt(x, unit=""):
    return "-" if x is None else f"{x:.2f}{unit}"


def _scaled(x, scale):
    return None if x is None else x * scale


def render(result: dict) -> str:
    m, p = result["measured"], result["predicted"]
    lines = [f"{PROG}: rank {m['rank']} (pipeline stage {m.get('stage', 0)}) of {m['world']} on {m['device']}, "
             f"{result['layout']}, S = {result['seq_length']}, {result['num_layers']} layers"
             + (f", memory mode ({m['memory_mode']} kernels stood in)" if m["memory_mode"] else "")]
    if m.get("oom"):
        lines.append(f"  out of memory: {m['oom']}")
    else:
        rows = [("model states + kept buffers (step start)", m["model_states_gib"],
                 p.get("step_start_gib", p.get("model_states_gib"))),
                ("activations kept at the end of forward *", m["kept_activations_gib"], p.get("kept_activations_gib")),
                ("working set above them (backward)", m["working_set_gib"], None),
                ("peak allocated", m["peak_allocated_gib"], p.get("peak_gib")),
                ("peak reserved", m["peak_reserved_gib"], None)]
        unit, scale = ("GiB", 1) if m["peak_allocated_gib"] >= 1 else ("MiB", 1024)
        lines.append(f"  {unit + ' per rank':44s} {'measured':>9s} {'planner':>9s} {'ratio':>6s}")
        for name, meas, pred in rows:
            ratio = f"{meas / pred:.3f}" if meas is not None and pred else "-"
            lines.append(f"  {name:44s} {_fmt(_scaled(meas, scale)):>9s} {_fmt(_scaled(pred, scale)):>9s} {ratio:>6s}")
        lines.append("  * the forward's end less the step's start: the layers' saved activations and the LM head's "
                     "(Megatron's head keeps [S, V/T] float32)")
        lines.append(f"  peak in: {m['peak_in']} (planner: {p.get('peak_point', '-')})")
        if p.get("at_peak_gib"):
            lines.append(f"  planner's peak, by term ({unit}): " + ", ".join(
                f"{k} {v * scale:.2f}" for k, v in p["at_peak_gib"].items() if v))
        t = {"all": "meaningless in memory mode (all)", "attention": f"{m['step_time_s']:.3f} s without attention",
             None: f"{m['step_time_s']:.3f} s"}[m["memory_mode"]]
        lines.append(f"  compute-only step time: {t} (planner's compute: {_fmt(p.get('compute_s'), ' s')})")
    if "error" in p:
        lines.append(f"  planner: no prediction: {p['error']}")
    else:
        lines.append(f"  not measured (planner's, {p['hardware']}): communication {p['comm_s']:.3f} s per step, "
                     f"{p['comm_exposed_s']:.3f} s exposed; communication buffers {p['comm_buffers_gib']:.2f} GiB (in its peak), "
                     "NCCL's own; "
                     "values (received tensors are garbage; the loss may be NaN)")
        if p.get("host_gib"):
            lines.append(f"  host memory per rank (planner's): {p['host_gib']:.2f} GiB (offloaded inputs "
                         f"{p['host_offload_gib']:.2f}, optimizer state {p['host_optimizer_gib']:.2f}), times the "
                         "node's GPUs against its host memory")
    return "\n".join(lines)


def check_request(args, recipe) -> int:
    """The flags against the recipe, before torch is imported; returns the rank to measure."""
    from . import ProbeError, stage_rank

    p = recipe.parallel
    if args.world < 1:
        raise ProbeError(f"--world {args.world} must be >= 1")
    replica = recipe.axis_size * p.pipeline_size * p.context_size
    if args.world % replica:
        raise ProbeError(f"--world {args.world} does not fit the recipe's layout: parallel.size ({recipe.axis_size}) x "
                         f"parallel.pipeline_size ({p.pipeline_size}) x parallel.context_size ({p.context_size}) = "
                         f"{replica} must divide it")
    for flag, value, least in (("--warmup", args.warmup, 1), ("--steps", args.steps, 1)):
        if value < least:
            raise ProbeError(f"{flag} {value} must be >= {least}" + (
                " (Adam allocates its moments in the first step: a first step's peak is not the steady state's)"
                if flag == "--warmup" else ""))
    if args.gpus_per_node < 1:
        raise ProbeError(f"--gpus-per-node {args.gpus_per_node} must be >= 1")
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        raise ProbeError(f"--gpu-memory-gb {args.gpu_memory_gb} must be positive")
    if args.stage is not None:
        if p.pipeline_size == 1:
            raise ProbeError(f"--stage {args.stage} needs parallel.pipeline_size > 1 (the recipe has one stage)")
        return stage_rank(args.world, p.pipeline_size, args.stage)
    rank = args.rank or 0
    if not 0 <= rank < args.world:
        raise ProbeError(f"--rank {rank} must be between 0 and --world - 1 = {args.world - 1}")
    return rank


def capacity_of(args) -> Optional[float]:
    """--gpu-memory-gb, applied to the allocator on a GPU (the device's memory when not given)."""
    import torch

    from . import ProbeError

    capacity = args.gpu_memory_gb
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        if capacity is not None:
            if capacity > total:
                raise ProbeError(f"--gpu-memory-gb {capacity} is more than this GPU's {total:.1f} GiB")
            torch.cuda.set_per_process_memory_fraction(capacity / total, 0)
        else:
            capacity = total
    return capacity


def run(args) -> dict:
    from ..training.recipe import load_recipe
    from . import measure, predict

    recipe = load_recipe(args.recipe, args.overrides)
    rank = check_request(args, recipe)
    recipe.check(args.world)
    capacity = capacity_of(args)
    measured = measure(recipe, args.world, rank, warmup=args.warmup, steps=args.steps, memory_mode=args.memory_mode,
                       capacity_gib=capacity)
    predicted = predict(args.recipe, args.overrides, args.world, args.gpus_per_node, capacity, args.hardware)
    p = recipe.parallel
    layout = predicted.get("layout") or f"{p.layout} {recipe.axis_size}" + (
        f" x CP {p.context_size}" if p.context_size > 1 else "") + (" (fsdp)" if p.fsdp else "")
    return {"recipe": args.recipe, "overrides": list(args.overrides), "layout": layout,
            "seq_length": recipe.model.seq_length, "num_layers": recipe.model.num_layers,
            "capacity_gib": capacity, "measured": measured, "predicted": predicted,
            "ratio_peak": (measured["peak_allocated_gib"] / predicted["peak_gib"]
                           if not measured.get("oom") and predicted.get("peak_gib") else None)}


def measure_in_child(recipe: str, overrides, world: int, warmup: int, mode: Optional[str],
                     capacity: Optional[float]) -> dict:
    """One probe in a fresh process (`megatron-tsp probe ... --json`): nothing of an earlier probe
    stays allocated (on a GPU a built model was seen to outlive `measure` in the same process,
    5-17 GiB per earlier probe), and an out-of-memory leaves no allocator state behind."""
    import subprocess

    from . import ProbeError

    argv = [sys.executable, "-m", "megatron_tsp.cli", "probe", recipe, *overrides, "--world", str(world),
            "--warmup", str(warmup), "--json"]
    if mode:
        argv += ["--memory-mode", mode]
    if capacity:
        argv += ["--gpu-memory-gb", str(capacity)]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode not in (0, 3):  # 3: out of memory, reported in the JSON
        last = [line for line in out.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ProbeError(f"a probe of {' '.join(overrides)} failed (exit {out.returncode}): {last[0]}")
    return json.loads(out.stdout)["measured"]


def planner_guess(args, layout_overrides, capacity) -> int:
    """The planner's longest context for the layout at this capacity (its own option search);
    None when nothing fits by the planner."""
    import dataclasses

    from ..planner import Cluster, ModelSpec, TrainSpec, hardware as hw_mod
    from ..planner.frontier import layout_frontier
    from ..planner.model import recipe_layout
    from . import norm_kind

    over = list(args.overrides) + layout_overrides
    model, seq = ModelSpec.from_recipe(args.recipe, over)
    gpn = min(args.world, args.gpus_per_node)
    cluster = Cluster(gpus_per_node=gpn, nodes=args.world // gpn, gpu_memory_gib=capacity,
                      host_memory_gib=args.host_memory_gb)
    train = TrainSpec(seq_length=seq, norm=norm_kind())
    row = layout_frontier(model, dataclasses.replace(train, global_batch_size=None), recipe_layout(args.recipe, over),
                          cluster, hw_mod.load(args.hardware), max_seq=args.max_seq)
    return row["max_seq_len"]  # None: nothing fits by the planner


def run_frontier(args) -> dict:
    from ..training.recipe import load_recipe
    from . import measure, predict
    from .frontier import (DEFAULT_LAYOUTS, OPTIMIZER_ON_HOST, ProbeLog, Search, extrapolated_time, granularity,
                           host_optimizer, layout_overrides, summary_line)

    names = (args.layouts or DEFAULT_LAYOUTS).split(",")
    layouts = {name: layout_overrides(name, args.world) for name in names}
    for name, lay in layouts.items():  # every layout's flags and keys checked before the first probe
        host_adam = OPTIMIZER_ON_HOST if args.optimizer_cpu_offload and host_optimizer(name) else []
        recipe = load_recipe(args.recipe, list(args.overrides) + lay + host_adam)
        check_request(args, recipe)
        recipe.check(args.world)
    capacity = capacity_of(args)
    log = ProbeLog(args.out)
    host = args.host_memory_gb / min(args.world, args.gpus_per_node)  # 0: no offload
    rows = []
    for name, lay in layouts.items():
        def overrides(S, opts, lay=lay):
            return list(args.overrides) + lay + opts + [f"model.seq_length={S}"]

        def probe(S, opts, mode="all", warmup=1, name=name):
            key = json.dumps([args.recipe, overrides(S, opts), args.world, round(capacity or 0, 2), mode, warmup])
            hit = log.get(key)
            if hit is None:
                if args.in_process:
                    m = measure(load_recipe(args.recipe, overrides(S, opts)), args.world, 0, warmup=warmup, steps=1,
                                memory_mode=mode, capacity_gib=capacity)
                else:
                    m = measure_in_child(args.recipe, overrides(S, opts), args.world, warmup, mode, capacity)
                hit = {"layout": name, "seq_len": S, "measured": m}
                log.put(key, hit)
            return hit["measured"]

        def offload_gib(S, opts):
            p = predict(args.recipe, overrides(S, opts), args.world, args.gpus_per_node, capacity, args.hardware)
            return p.get("host_gib")  # offloaded inputs + optimizer state, per GPU

        recipe = load_recipe(args.recipe, list(args.overrides) + lay)
        growth = 2.0
        guess = planner_guess(args, lay, capacity) if args.start_seq == "auto" else None
        if guess:
            start, growth = guess, 1.06
        else:  # the recipe's S (or the one given), doubling
            start = int(args.start_seq) if args.start_seq not in (None, "auto") else recipe.model.seq_length
        row = Search(name, args.world, host, probe, offload_gib, layers=recipe.model.num_layers,
                     mlp_chunk_tokens=args.mlp_chunk_tokens, attention_kv=args.tsp_attention_kv,
                     cp_comm_type=args.cp_comm_type,
                     optimizer_offload=args.optimizer_cpu_offload).run(
            start, args.max_seq, granularity(start, args.world), growth)
        row["growth"] = growth
        row["world"] = args.world
        if row["max_seq_len"] and args.time_at:
            opts = row["at_max"]["options"]
            real = probe(args.time_at, opts, mode=None)
            stood_in = probe(args.time_at, opts, mode="attention")
            if not real.get("oom") and not stood_in.get("oom"):
                row["time"] = extrapolated_time(real["step_time_s"], stood_in["step_time_s"], args.time_at,
                                                row["max_seq_len"])
        S = row["max_seq_len"]
        if S:
            row["predicted"] = predict(args.recipe, overrides(S, row["at_max"]["options"]), args.world,
                                       args.gpus_per_node, capacity, args.hardware)
        print(summary_line(row), file=sys.stderr if args.json else sys.stdout, flush=True)
        rows.append(row)
    return {"recipe": args.recipe, "overrides": list(args.overrides), "world": args.world, "capacity_gib": capacity,
            "host_memory_gb_per_node": args.host_memory_gb, "layouts": rows}


def run_inference(args) -> dict:
    from ..training.recipe import load_recipe
    from . import ProbeError, measure_inference, predict_inference

    recipe = load_recipe(args.recipe, args.overrides)
    rank = check_request(args, recipe)
    recipe.check(args.world)
    new_tokens = 2  # the prefill's token, then one decode step
    S = args.prompt_tokens or recipe.model.seq_length - new_tokens
    if not 1 <= S <= recipe.model.seq_length - new_tokens:
        raise ProbeError(f"--prompt-tokens {S} must be between 1 and model.seq_length - 2 = "
                         f"{recipe.model.seq_length - new_tokens} (room for the first decode step)")
    capacity_of(args)
    measured = measure_inference(recipe, args.world, rank, S, new_tokens, memory_mode=args.memory_mode)
    predicted = predict_inference(args.recipe, args.overrides, args.world, args.gpus_per_node, S, new_tokens,
                                  args.hardware)
    return {"recipe": args.recipe, "overrides": list(args.overrides), "measured": measured, "predicted": predicted,
            "ratio_peak": (measured["peak_allocated_gib"] / predicted["peak_gib"]
                           if not measured.get("oom") and predicted.get("peak_gib") else None)}


def render_inference(result: dict) -> str:
    m, p = result["measured"], result["predicted"]
    lines = [f"{PROG} --inference: rank {m['rank']} of {m['world']} on {m['device']}, TSP prefill of "
             f"{m['prompt_tokens']} tokens + the first decode step (TP = {m['world']})"]
    if m.get("oom"):
        return "\n".join(lines + [f"  out of memory: {m['oom']}"])
    unit, scale = ("GiB", 1) if m["peak_allocated_gib"] >= 1 else ("MiB", 1024)
    lines.append(f"  {unit + ' per rank':44s} {'measured':>9s} {'planner':>9s} {'ratio':>6s}")
    for name, meas, pred in (("weights", m["weights_gib"], p.get("weights_gib")),
                             ("peak allocated (prefill, hand-over, decode)", m["peak_allocated_gib"], p.get("peak_gib"))):
        ratio = f"{meas / pred:.3f}" if pred else "-"
        lines.append(f"  {name:44s} {_fmt(_scaled(meas, scale)):>9s} {_fmt(_scaled(pred, scale)):>9s} {ratio:>6s}")
    lines.append(f"  time to first token (compute only): {m['time_to_first_token_s']:.3f} s (planner's prefill "
                 f"{_fmt(p.get('prefill_s'), ' s')}, its exposed communication {_fmt(p.get('prefill_comm_exposed_s'), ' s')} "
                 "not measured)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from ..config import TSPConfigError
    from ..output import hide_benign_output, print_user_error

    hide_benign_output(announce=False)
    try:
        if args.inference:
            result = run_inference(args)
            print(json.dumps(result, indent=1) if args.json else render_inference(result), flush=True)
            return 3 if result["measured"].get("oom") else 0
        if args.frontier:
            result = run_frontier(args)
            if args.json:
                print(json.dumps(result, indent=1), flush=True)
            return 0
        result = run(args)
    except TSPConfigError as e:
        return print_user_error(PROG, e)
    print(json.dumps(result, indent=1) if args.json else render(result), flush=True)
    return 3 if result["measured"].get("oom") else 0


if __name__ == "__main__":
    sys.exit(main())
