"""One torchrun of `megatron-tsp bench` (`--worker SPEC`): walks its rows, each on the driver's own
model, DDP, optimizer and train step, and appends one record per row (OOM, timeout and errors are
records too). Also the attention-kernel probe and the peak-memory counters."""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Optional

from .rows import (ERROR_EXIT, FAKE_HANG_ENV, FAKE_OOM_ENV, OOM_EXIT, append_record, causal_area, git_commit, model_flops,
                   parse_seq, row_base)


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
    (one layer's attention on one rank). With data.reset_attention_mask and
    data.mock_document_length = N: packed documents of N tokens each (the last one cut) under
    document masks, and `pairs` counts only the pairs inside documents."""
    import torch

    from ..tsp.zigzag import local_chunk_starts

    m = recipe.model
    a, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d, S = m.hidden_size // a, m.seq_length
    D = recipe.axis_size
    heads, groups = a // D, max(g // D, 1)
    dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(rank)
    N = recipe.data.mock_document_length if recipe.data.reset_attention_mask else 0
    docs = (torch.arange(S, device=device) // N).unsqueeze(0) if N else None

    def area(c, start):  # the (query, key) pairs of queries [start, start + c)
        if docs is None:
            return causal_area(c, start)
        return sum(p % N + 1 for p in range(start, start + c))

    if kind == "tsp":
        from ..tsp.attention import AttentionShard

        c = S // (2 * D)
        starts = local_chunk_starts(S, D, rank)
        masks = {}
        if docs is not None:
            from ..tsp.documents import key_starts

            masks = {"doc_ids": docs, "key_starts": key_starts(docs, starts)}
        shard = AttentionShard(config=None, group=None, heads=heads, groups=groups, head_dim=d,
                               softmax_scale=1 / math.sqrt(d), chunk_starts=starts, chunk_len=c,
                               backend=recipe.parallel.tsp_attention_backend, **masks)
        q = torch.randn(2 * c, 1, heads, d, device=device, dtype=dtype, generator=gen)
        kv = torch.randn(S, 1, groups, 2 * d, device=device, dtype=dtype, generator=gen)
        do = torch.randn(2 * c, 1, heads * d, device=device, dtype=dtype, generator=gen)
        pairs = sum(area(c, s) for s in starts)

        def step():  # the kernels' forward and their explicit backward, as TSPAttentionFunction runs them
            o, lses = shard.attend(q, kv)
            shard.attend_backward(do, q, kv, o, lses)
    elif kind == "sdpa":
        import torch.nn.functional as F

        q = torch.randn(S, 1, heads, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        k = torch.randn(S, 1, groups, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        v = torch.randn(S, 1, groups, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        grad = torch.randn(1, heads, S, d, device=device, dtype=dtype, generator=gen)
        pairs = area(S, 0)
        mask = None
        if docs is not None:  # as SDPACoreAttention with document ids: the S x S mask
            from ..tsp.documents import full_mask

            mask = ~full_mask(docs)

        def step():  # as SDPACoreAttention: [s, b, n, d] permuted to [b, n, s, d] views
            F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=mask is None,
                                           attn_mask=mask, scale=1 / math.sqrt(d),
                                           enable_gqa=heads != groups).backward(grad)
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
    from .. import patches

    patches.install(patches.BENCH_WORKER_WARNINGS)
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
    from ..training.cpu import install_cpu_shims

    backend = init_distributed()
    install_cpu_shims()  # a worker process's entry (no-op with CUDA)
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
        append_record(jsonl, {"kind": "device", "device": props.name if cuda else "cpu", "world": world, "backend": backend,
                        "total_memory_gb": props.total_memory / 2**30 if cuda else None,
                        "torch": torch.__version__, "cuda": torch.version.cuda,
                        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                        "peak_tflops": peak / 1e12, "peak_tflops_per_rank": [p / 1e12 for p in peaks],
                        "peak_what": peak_what})
    groups_key = pgs = None
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
                append_record(jsonl, row_base(row, status="unavailable", note=str(e).splitlines()[0]))
            continue
        t_row = time.perf_counter()
        key = json.dumps(recipe.to_dict()["parallel"], sort_keys=True)
        if key != groups_key:
            if cuda:
                torch.cuda.synchronize()
            if groups_key is not None:
                dist.barrier()
            pgs = driver.init_groups(recipe)  # the groups the rows run on, handed to build and every step
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
        model, ddp, optimizer = driver.build(recipe, pgs)
        dataset = driver.build_train_dataset(recipe)
        build_s = time.perf_counter() - t_build
        if cuda:  # the peak of training (model states included), not of the build's transients
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        dp_rank, dp_size = pgs.dp.rank(), pgs.dp.size()
        times, losses = [], []
        n_steps = spec["warmup"] + spec["steps"]
        for step in range(n_steps):
            batches = list(driver.micro_batches(dataset, step, recipe, dp_rank, dp_size, device,
                                                 pgs.cp))
            if step == 1 and _fake(FAKE_OOM_ENV, row["layout"], row["seq"], rank):
                raise torch.OutOfMemoryError(f"simulated out of memory ({FAKE_OOM_ENV})")
            if step == 1 and _fake(FAKE_HANG_ENV, row["layout"], row["seq"], rank):
                time.sleep(1e6)
            with _Timer(device) as t:
                loss, _ = driver.train_step(ddp, optimizer, batches, recipe, pgs)
            if step >= spec["warmup"]:
                times.append(t.seconds)
                losses.append(loss)
        if spec.get("profile"):  # one extra step, after the timed ones and outside their statistics
            from .profiling import StepProfile

            batches = list(driver.micro_batches(dataset, n_steps, recipe, dp_rank, dp_size, device,
                                                 pgs.cp))
            with StepProfile() as prof, _Timer(device) as t:
                driver.train_step(ddp, optimizer, batches, recipe, pgs)
            if rank == 0:
                name = row["id"].replace("/", "_")
                with open(os.path.join(os.path.dirname(jsonl), f"profile_{name}.md"), "w") as f:
                    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
                    f.write(prof.summary(t.seconds, title=f"{row['label']} {row['variant']} S={row['seq']}, "
                                                         f"{row['layers']} layers, rank 0 of {world} x {device_name}, "
                                                         f"commit {git_commit()}"))
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
                probe = attention_probe(row["probe"], recipe, pgs.tp.rank(), device,
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
            append_record(jsonl, _result_record(row, recipe, world, per_rank, step_times.tolist(), losses, peak, build_s, probe))
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
    rec = row_base(row, status="ok")
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
