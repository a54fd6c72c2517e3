"""One rank of an N-rank job on CPU (torch's fake process group), its memory through one step.

    python benchmarks/fake_rank_memory.py WORLD [recipe overrides...] [--json OUT] [--top K]

Runs rank 0 of a WORLD-rank job in one process (DESIGN.md §11: collectives return at once,
allocations are real), one warm-up step (Adam's moments), then one step under torch's profiler
with memory events. Replaying the CPU allocator's events (pointer, size) gives, in bytes:
`start` (allocated at the start of the step: model states and what the warm-up step left),
`loss` (when the model's forward returns the loss: saved activations + the head), `step`
(when optimizer.step starts), `peak` (the step's highest allocated) and, at the peak, the live
blocks grouped by the op (and module) that allocated them, and the op running at the peak.

The attention kernels' CPU `math` backend materialises the [c, L] scores, which no GPU kernel
does: it is swapped here for torch's CPU flash kernel run like the cuDNN path (the unmasked
prefix and the square causal block, merged by log-sum-exp), so the transients are the GPU's.
"""

from __future__ import annotations

import collections
import json
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

MARK = 1_000_003  # marker allocations: MARK + i bytes, allocated and freed at once


def _cpu_flash_kernels():
    from megatron_tsp.tsp import kernels

    def fwd(q, k, v, scale, causal):
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out[0], out[1]

    def bwd(do, q, k, v, o, lse, scale, causal):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale)

    kernels._CALLS["math"] = (fwd, bwd)
    kernels._ONE_CALL.discard("math")


def _region(names) -> str:
    """attention or MLP: the innermost autograd node (backward) or module (forward) that names one."""
    for n in reversed(names):
        low = n.lower()
        if "attention" in low or "flash" in low or "linear_qkv" in low or "linear_proj" in low:
            return "attention"
        if "mlp" in low or "mulbackward" in low or "silu" in low or "linear_fc" in low:
            return "mlp"
    return "other"


def mark(i: int):
    t = torch.empty(MARK + i, dtype=torch.uint8)
    del t


def module_ranges(model):
    """record_function ranges named by module, forward and (layer recompute) its re-run."""
    stack = []

    def pre(mod, args, name=None):
        r = torch.profiler.record_function("module::" + name)
        r.__enter__()
        stack.append(r)

    def post(mod, args, out, name=None):
        stack.pop().__exit__(None, None, None)

    import functools
    for name, mod in model.named_modules():
        leafish = name.split(".")[-1]
        if leafish in ("self_attention", "mlp", "core_attention", "linear_qkv", "linear_proj", "linear_fc1",
                       "linear_fc2", "output_layer", "embedding", "input_layernorm", "pre_mlp_layernorm",
                       "final_layernorm") or (name.split(".")[-2:-1] == ["layers"]):
            mod.register_forward_pre_hook(functools.partial(pre, name=name))
            mod.register_forward_hook(functools.partial(post, name=name))


def main():
    args = sys.argv[1:]
    world = int(args.pop(0))
    out_json, top = None, 25
    if "--json" in args:
        i = args.index("--json"); out_json = args[i + 1]; del args[i:i + 2]
    if "--top" in args:
        i = args.index("--top"); top = int(args[i + 1]); del args[i:i + 2]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    orig = dist.new_group

    def new_group(*a, **k):
        k.pop("backend", None)
        k.pop("pg_options", None)
        return orig(*a, **k)

    dist.new_group = new_group
    from megatron_tsp.training.cpu import install_cpu_shims
    install_cpu_shims()
    _cpu_flash_kernels()
    from megatron_tsp.training import loop as driver
    from megatron_tsp.training.recipe import load_recipe

    r = load_recipe("configs/tiny.yaml", args)
    r.check(world)
    pgs = driver.init_groups(r)
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    prof.__enter__()
    model, ddp, opt = driver.build(r, pgs)
    module_ranges(ddp.module)
    ddp.module.register_forward_hook(lambda *a: mark(2))
    step0 = opt.step

    def step(*a, **k):
        mark(3)
        return step0(*a, **k)

    opt.step = step
    ds = driver.build_train_dataset(r)
    for i in range(2):
        b = list(driver.micro_batches(ds, i, r, pgs.dp.rank(), pgs.dp.size(), torch.device("cpu"), pgs.cp))
        mark(10 + i)
        driver.train_step(ddp, opt, b, r, pgs)
    mark(20)
    prof.__exit__(None, None, None)

    # allocation events with their enclosing op names
    allocs = []

    def walk(ev, names):
        f = ev.extra_fields
        if isinstance(f, torch._C._profiler._ExtraFields_Allocation):
            allocs.append((ev.start_time_ns, f.ptr, f.alloc_size, names))
            return
        nm = names + (ev.name,) if ev.name else names
        for c in ev.children:
            walk(c, nm)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, ())
    allocs.sort(key=lambda a: a[0])
    live, total, marks = {}, 0, {}
    phase, peak, peak_live, peak_where, peak_phase = None, 0, {}, (), None
    unknown_free = 0
    region_peaks = {}
    for t, ptr, size, names in allocs:
        if size > 0:
            if size >= MARK and size < MARK + 100:
                marks[size - MARK] = total
                if size - MARK == 11 or phase:
                    phase = {11: "fwd", 2: "bwd", 3: "step", 20: None}.get(size - MARK, phase)
                continue
            live[ptr] = (size, names)
            total += size
            if phase:
                reg = _region(names)
                if total > region_peaks.get((phase, reg), (0,))[0]:
                    region_peaks[(phase, reg)] = (total, names)
            if phase and total > peak:
                peak, peak_live, peak_where, peak_phase = total, dict(live), names, phase
        else:
            if ptr in live:
                total -= live.pop(ptr)[0]
            else:
                unknown_free += -size
    # group the live blocks at the peak by (module, innermost op)

    def label(names):
        mods = [n[8:] for n in names if n.startswith("module::")]
        nodes = [n for n in names if "autograd::engine::evaluate_function" in n]
        aten = [n for n in names if n.startswith("aten::")]
        return f"{mods[-1] if mods else '-'} | {nodes[-1].split(': ')[-1] if nodes else 'fwd'} | {aten[0] if aten else names[-1] if names else '?'}"

    groups = collections.defaultdict(lambda: [0, 0])
    for size, names in peak_live.values():
        g = groups[label(names)]
        g[0] += size
        g[1] += 1
    res = {"overrides": args, "world": world, "start": marks.get(11), "loss": marks.get(2), "opt_step": marks.get(3),
           "end": marks.get(20), "peak": peak, "peak_phase": peak_phase, "peak_op": label(peak_where),
           "unknown_free": unknown_free,
           "region_peaks": {f"{k[0]} {k[1]}": [v[0], label(v[1])] for k, v in region_peaks.items()},
           "params": sum(p.numel() * p.element_size() for p in ddp.module.parameters()),
           "live_at_peak": sorted(([k, v[0], v[1]] for k, v in groups.items()), key=lambda x: -x[1])}
    M = 2.0 ** 20
    print(f"start {res['start'] / M:.1f} MiB  loss {res['loss'] / M:.1f}  opt_step {res['opt_step'] / M:.1f}  "
          f"peak {peak / M:.1f} ({peak_phase}: {res['peak_op']})  params {res['params'] / M:.1f}")
    for k, (v, where) in sorted(res["region_peaks"].items()):
        print(f"  peak in {k}: {v / M:.1f} MiB ({where})")
    for k, v, n in res["live_at_peak"][:top]:
        print(f"  {v / M:9.2f} MiB {n:5d}  {k}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
