"""`megatron-tsp probe`: one rank of an N-GPU job, measured in this one process.

torch's fake process group (`torch.testing._internal.distributed.fake_pg`, backend "fake")
makes a world of N in one process as rank R: every collective returns at once and leaves its
output as it was. So every shape, kernel and allocation of rank R is real and no received
value is: the probe measures per-rank memory and compute time of any layout at any size on
one GPU (CPU for tiny models), without the communication. It runs the recipe through the
project's own driver (`training.loop`: groups, build, micro-batches, `train_step` with the
optimizer step), warm-up steps first (Adam allocates its moments in the first step), then the
measured steps, and puts the planner's prediction for the same configuration beside each
number.

What it does not measure: communication time, NCCL's own buffers (the planner's terms are
printed beside), and values (received tensors are whatever the buffer held: the loss can be
NaN, and nothing aborts on it).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import List, Optional, Sequence

from .. import patches
from ..config import TSPConfigError

GIB = 2**30


class ProbeError(TSPConfigError):
    """A probe request that cannot run (named flag or key)."""


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0):
    """torch.distributed as rank `rank` of a world of `world` through the fake backend, for
    the duration of the block. Megatron asks `new_group` for gloo groups and per-group NCCL
    options, which the fake backend cannot make: inside the block `torch.distributed.new_group`
    drops `backend=` / `pg_options=` (every group is a fake group). On exit the model-parallel
    groups and the world are destroyed and `new_group` is restored: nothing stays patched."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world < 1:
        raise ProbeError(f"--world {world} must be >= 1")
    if not 0 <= rank < world:
        raise ProbeError(f"--rank {rank} must be between 0 and --world - 1 = {world - 1}")
    if dist.is_initialized():
        raise ProbeError("torch.distributed is already initialized in this process: the probe makes its own "
                         "(fake) world; run it in a fresh process, not under torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        with contextlib.ExitStack() as replaced:
            replaced.enter_context(patches.applied(patches.FAKE_WORLD_NEW_GROUP, wrap=_without_backend))
            for patch in (patches.FAKE_WORLD_ALL_GATHER, patches.FAKE_WORLD_MAPPINGS_ALL_GATHER,
                          patches.FAKE_WORLD_UTILS_ALL_GATHER):
                replaced.enter_context(patches.applied(patch, wrap=_mirrored_all_gather))
            replaced.enter_context(patches.applied(patches.FAKE_WORLD_ALL_TO_ALL, wrap=_mirrored_all_to_all))
            yield
    finally:
        from megatron.core import parallel_state as mpu

        from .. import parallel_state as tsp_state

        if mpu.model_parallel_is_initialized():
            tsp_state.destroy_model_parallel()
        dist.destroy_process_group()


def _without_backend(new_group):
    def new_group_without_backend(*args, backend=None, pg_options=None, **kwargs):
        return new_group(*args, **kwargs)

    return new_group_without_backend


# All-gathers and all-to-alls of integer tensors (the MoE dispatcher's token counts, from which it
# sizes the tokens' all-to-all) filled as in a world symmetric under rotation of the ranks: peer
# j's tensor is this rank's with its blocks rotated by j - me (peer j sends to rank r's experts
# what this rank sends to rank r - j + me's). Every rank then receives as many tokens as it sends,
# whatever the routing. Left as the fake backend leaves them (uninitialized), the counts would
# size buffers at random. Floating tensors stay untouched (no copy, no time). Megatron keeps its
# own references to the all-gather (`dist_all_gather_func`), replaced too.

def _integer(t):
    import torch

    return torch.is_tensor(t) and not t.is_floating_point() and not t.is_complex()


def _peer(mine, me, j, n):
    """Peer j's tensor in the rotation-symmetric world (flat, n peers)."""
    flat = mine.reshape(-1)
    return flat.roll((j - me) * (flat.numel() // n)) if flat.numel() % n == 0 else flat


def _mirrored_all_gather(original):
    import torch.distributed as dist

    def all_gather_mirrored(output, input, *args, **kwargs):
        work = original(output, input, *args, **kwargs)
        if _integer(input) and input.numel():
            n, me = output.numel() // input.numel(), dist.get_rank(kwargs.get("group", args[0] if args else None))
            rows = output.view(n, input.numel())
            for j in range(n):
                rows[j].copy_(_peer(input, me, j, n))
        return work

    return all_gather_mirrored


def _mirrored_all_to_all(original):
    import torch.distributed as dist

    def all_to_all_mirrored(output, input, *args, **kwargs):
        work = original(output, input, *args, **kwargs)
        if _integer(input) and output.numel() == input.numel() and not args and not kwargs.get("input_split_sizes"):
            n = dist.get_world_size(kwargs.get("group"))
            me = dist.get_rank(kwargs.get("group"))
            if input.numel() % n == 0:  # block j = what peer j sends to this rank
                blocks = output.view(n, -1)
                for j in range(n):
                    blocks[j].copy_(_peer(input, me, j, n).view(n, -1)[me])
        return work

    return all_to_all_mirrored


def stage_rank(world: int, pipeline_size: int, stage: int) -> int:
    """The first rank of pipeline stage `stage` (Megatron's rank order tp-cp-ep-dp-pp: the
    pipeline axis is the outermost)."""
    if not 0 <= stage < pipeline_size:
        raise ProbeError(f"--stage {stage} must be between 0 and parallel.pipeline_size - 1 = {pipeline_size - 1}")
    return stage * (world // pipeline_size)


def measure(recipe, world: int, rank: int = 0, warmup: int = 1, steps: int = 1, memory_mode: Optional[str] = None,
            plant=None, profile: bool = False, capacity_gib: Optional[float] = None) -> dict:
    """Build the recipe's model as rank `rank` of `world` and run `warmup` + `steps` driver
    steps; per measured step: the memory allocated when it starts (model states: weights,
    gradient buffers, optimizer state), at the end of each forward (+ the activations kept for
    backward), the peak of forward + backward and of the optimizer step, and the step's time.
    `memory_mode`: "attention" (or "all": attention and GEMMs) kernels replaced by stand-ins that
    allocate what the real kernels allocate and skip the arithmetic (probe.standins), for contexts
    whose step takes hours; times then leave those kernels out. `plant(model)`: a test hook run after the build."""
    import torch

    from ..training import loop as driver
    from ..bench.profiling import StepProfile
    from ..training.cpu import install_cpu_shims
    from .meter import meter_for

    if warmup < 1:
        raise ProbeError(f"--warmup {warmup} must be >= 1: Adam allocates its moments in the first step, "
                         "so a first step's peak is not the steady state's")
    if steps < 1:
        raise ProbeError(f"--steps {steps} must be >= 1")
    recipe.check(world)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    install_cpu_shims()  # no-op with CUDA
    kernels = contextlib.nullcontext()
    if memory_mode not in (None, "attention", "all"):
        raise ProbeError(f"--memory-mode {memory_mode!r} is not one of attention, all")
    if memory_mode:
        from .standins import memory_mode as standins

        kernels = standins(gemms=memory_mode == "all")
    meter = meter_for(device)
    out = {"world": world, "rank": rank, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "warmup": warmup, "steps": steps, "memory_mode": memory_mode}
    with fake_world(world, rank):
        pgs = driver.init_groups(recipe)
        out["stage"] = pgs.pp.rank()
        out["groups"] = {"tp_or_tsp": pgs.tp.size(), "cp": pgs.cp.size(), "dp": pgs.dp.size(), "pp": pgs.pp.size()}
        model = ddp = optimizer = None
        try:
            meter.start()
            with kernels:
                model, ddp, optimizer = driver.build(recipe, pgs, host_processes=1)  # one rank runs here
                if plant is not None:
                    plant(model)
                meter.mark("built")
                dataset = driver.build_train_dataset(recipe)
                forward_ends: List[str] = []

                def end_of_forward(module, args, output):
                    name = f"forward_end_{len(forward_ends)}"
                    meter.mark(name)
                    forward_ends.append(name)

                hook = ddp.module.register_forward_hook(end_of_forward)
                step_of_optimizer = optimizer.step

                def optimizer_step(*a, **k):  # the optimizer step's own peak window
                    meter.close_peak()
                    meter.open_peak(f"optimizer_{current}")
                    return step_of_optimizer(*a, **k)

                optimizer.step = optimizer_step
                times, measured = [], []
                try:
                    for current in range(warmup + steps):
                        batches = list(driver.micro_batches(dataset, current, recipe, pgs.dp.rank(), pgs.dp.size(),
                                                            device, pgs.cp))
                        ends_before = len(forward_ends)
                        meter.mark(f"start_{current}")
                        meter.open_peak(f"fwd_bwd_{current}")
                        profiled = profile and current == warmup + steps - 1
                        tracer = StepProfile() if profiled else contextlib.nullcontext()
                        with tracer:
                            t0 = time.perf_counter()
                            driver.train_step(ddp, optimizer, batches, recipe, pgs)
                            if cuda:
                                torch.cuda.synchronize()
                            elapsed = time.perf_counter() - t0
                        if profiled:
                            out["profile"] = tracer.summary(elapsed, title=f"rank {rank} of {world}, one step")
                        meter.close_peak()
                        if current >= warmup:
                            times.append(elapsed)
                            measured.append((current, forward_ends[ends_before:]))
                finally:
                    hook.remove()
                    optimizer.step = step_of_optimizer
            meter.finish()
        except (torch.OutOfMemoryError, RuntimeError) as e:  # RuntimeError: pinned host memory for offload
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            out["oom"] = str(e).splitlines()[0][:300]
            return out
        finally:
            del model, ddp, optimizer
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    out["oom"] = None
    out["built_gib"] = meter.point("built")[0] / GIB
    rows = []
    for step, ends in measured:
        start = meter.point(f"start_{step}")
        fwd_bwd = meter.peak(f"fwd_bwd_{step}")
        opt = meter.peak(f"optimizer_{step}")
        at_end = max(meter.point(e)[0] for e in ends) if ends else None
        rows.append({
            "step": step, "model_states_gib": start[0] / GIB,
            "forward_end_gib": at_end / GIB if at_end is not None else None,
            "kept_activations_gib": (at_end - start[0]) / GIB if at_end is not None else None,
            "fwd_bwd_peak_gib": fwd_bwd[0] / GIB, "optimizer_peak_gib": opt[0] / GIB,
            "peak_allocated_gib": max(fwd_bwd[0], opt[0]) / GIB,
            "peak_reserved_gib": max(fwd_bwd[1], opt[1]) / GIB if fwd_bwd[1] is not None else None,
        })
    last = max(rows, key=lambda r: r["peak_allocated_gib"])
    out.update({k: v for k, v in last.items() if k != "step"})
    out["working_set_gib"] = (last["fwd_bwd_peak_gib"] - last["forward_end_gib"]
                              if last["forward_end_gib"] is not None else None)
    out["peak_in"] = "optimizer step" if last["optimizer_peak_gib"] > last["fwd_bwd_peak_gib"] else "forward + backward"
    out["step_time_s"] = statistics.median(times)
    out["steps_measured"] = rows
    if not cuda and capacity_gib is not None and out["peak_allocated_gib"] > capacity_gib:
        out["oom"] = f"peak {out['peak_allocated_gib']:.4f} GiB over the capacity {capacity_gib} GiB (CPU: checked after the step)"
    return out


def norm_kind() -> str:
    """How the code's TSPNorm saves (the planner's `norm`): TE's fused kernel when installed, else lean."""
    from ..tsp import norm

    return "fused" if norm._te_norm() is not None else "lean"


def predict(path: str, overrides: Sequence[str], world: int, gpus_per_node: int, capacity_gib: Optional[float],
            hardware: str) -> dict:
    """The planner's per-GPU prediction for the recipe on `world` GPUs: memory terms, the peak
    and where it is, step time split into compute and communication. {'error': ...} where the
    planner has no model for the recipe (it says why)."""
    from ..planner import Cluster, GIB as _GIB, ModelSpec, PlanError, TrainSpec, hardware as hw_mod, plan_layout
    from ..planner.model import recipe_layout, recipe_train_options

    try:
        model, seq = ModelSpec.from_recipe(path, list(overrides))
        opts = recipe_train_options(path, list(overrides))
        from ..planner.recipe_reader import read_recipe

        t = read_recipe(path, list(overrides))["train"]
        train = TrainSpec(seq_length=seq, global_batch_size=t["global_batch_size"], norm=norm_kind(), **opts)
        layout = recipe_layout(path, list(overrides))
        gpn = min(world, gpus_per_node)
        if world % gpn:
            raise PlanError(f"--world {world} is not a multiple of --gpus-per-node {gpn}")
        cluster = Cluster(gpus_per_node=gpn, nodes=world // gpn, gpu_memory_gib=capacity_gib)
        plan = plan_layout(model, train, layout, cluster, hw_mod.load(hardware))
    except PlanError as e:
        return {"error": str(e)}
    mem, tm = plan.memory, plan.time
    return {
        "layout": layout.label, "hardware": hardware,
        "model_states_gib": (mem.params + mem.grads + mem.optimizer) / _GIB,
        # what the measured `model_states_gib` is (the step's starting allocation): the states and
        # the buffers kept across steps (Megatron's all-gather buffer, the RoPE table)
        "step_start_gib": mem.step_start / _GIB,
        # like the measured one (the forward's end less the step's start): the saved activations and
        # what the LM head keeps (Megatron's: fp32 logits [B S / C, V / T]); FSDP over CP of a bf16
        # model less the previous step's fp32 main gradients, which zero_grad frees in between
        "kept_activations_gib": (mem.forward_end - mem.step_start) / _GIB,
        "saved_activations_gib": mem.activations / _GIB,
        "peak_gib": mem.peak / _GIB, "peak_point": mem.peak_point, "fits": plan.fits,
        "at_peak_gib": {k: v / _GIB for k, v in mem.at_peak.items()},
        "comm_buffers_gib": mem.comm_buffers / _GIB, "host_offload_gib": mem.host_offload / _GIB,
        # train.optimizer_cpu_offload's share on the host, and all this GPU's process pins there
        "host_optimizer_gib": mem.host_optimizer / _GIB, "host_gib": mem.host / _GIB,
        "compute_s": tm["matmul_s"] + tm["attention_s"] + tm["elementwise_s"] + tm["optimizer_s"],
        "comm_s": tm["comm_s"], "comm_exposed_s": tm["comm_exposed_s"], "dp_sync_s": tm["dp_sync_s"],
        "step_s": tm["as_implemented"],
    }


def measure_inference(recipe, world: int, rank: int = 0, prompt_tokens: Optional[int] = None, new_tokens: int = 2,
                      memory_mode: Optional[str] = None) -> dict:
    """TSP prefill of one prompt of `prompt_tokens` (default: the recipe's S) and `new_tokens` - 1
    decode steps at TP = D, as rank `rank` of `world` (inference.decode.generate: prefill, the
    cache all-to-all, decode): the weights resident, the peak, time to first token and decode time.
    The model is built with the recipe's initialization (no checkpoint: values do not matter)."""
    import torch

    from ..inference.cli import build_and_load
    from ..inference.decode import generate
    from ..training.cpu import install_cpu_shims
    from ..training.loop import init_groups
    from .meter import meter_for

    p = recipe.parallel
    if not recipe.layout().uses_tsp or p.pipeline_size != 1 or p.context_size != 1:
        raise ProbeError("--inference measures TSP prefill + TP decode: parallel.layout = tsp, one pipeline stage, "
                         f"no context parallelism (got {p.layout}, pipeline {p.pipeline_size}, context {p.context_size})")
    if world != p.size:
        raise ProbeError(f"--inference runs TSP over all ranks: --world {world} must equal parallel.size {p.size}")
    S = prompt_tokens or recipe.model.seq_length
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    install_cpu_shims()
    kernels = contextlib.nullcontext()
    if memory_mode:
        from .standins import memory_mode as standins

        kernels = standins(gemms=memory_mode == "all")
    meter = meter_for(device)
    out = {"world": world, "rank": rank, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "prompt_tokens": S, "new_tokens": new_tokens, "memory_mode": memory_mode, "inference": True}
    with fake_world(world, rank):
        model = None
        try:
            meter.start()
            with kernels, torch.no_grad():
                model = build_and_load(recipe, None, init_groups(recipe))
                meter.mark("built")
                meter.open_peak("generate")
                prompt = (torch.arange(S) % (recipe.model.vocab_size - 1)).tolist()
                result = generate(model, [prompt], new_tokens)
                meter.close_peak()
            meter.finish()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            out["oom"] = str(e).splitlines()[0][:300]
            return out
        finally:
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    out.update(oom=None, weights_gib=meter.point("built")[0] / GIB, peak_allocated_gib=meter.peak("generate")[0] / GIB,
               peak_reserved_gib=(meter.peak("generate")[1] / GIB if meter.peak("generate")[1] is not None else None),
               time_to_first_token_s=result.time_to_first_token, decode_s=result.decode_time)
    return out


def predict_inference(path: str, overrides: Sequence[str], world: int, gpus_per_node: int, prompt_tokens: int,
                      new_tokens: int, hardware: str) -> dict:
    """The planner's TSP prefill model (planner.prefill) for the same prompt."""
    from ..planner import Cluster, Layout, ModelSpec, PlanError, hardware as hw_mod
    from ..planner.prefill import prefill_plan

    try:
        model, _ = ModelSpec.from_recipe(path, list(overrides))
        gpn = min(world, gpus_per_node)
        cluster = Cluster(gpus_per_node=gpn, nodes=max(1, world // gpn))
        return prefill_plan(model, Layout("tsp", tsp_size=world), prompt_tokens, hw_mod.load(hardware), cluster,
                            new_tokens=new_tokens)
    except PlanError as e:
        return {"error": str(e)}
