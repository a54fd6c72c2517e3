"""`megatron-tsp train`: one training driver for TSP and its baselines, from megatron-core's
own parts (DDP, get_megatron_optimizer, get_forward_backward_func, dist_checkpointing,
MockGPTDataset / GPTDataset through BlendedMegatronDatasetBuilder).

    megatron-tsp train --nproc-per-node 2 configs/tiny.yaml parallel.size=2 train.steps=10
    torchrun --nproc-per-node 2 -m megatron_tsp.training.loop configs/tiny.yaml parallel.size=2 train.steps=10
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist

from .. import patches
from ..config import TSPConfigError
from ..output import hide_benign_output, print_user_error, rank, verbose_requested
from .checkpoint import _step_dir, prepare_resume, resume, save_checkpoint
from .checkpoint_files import check_resume
from .data import build_train_dataset, eod_id, micro_batches  # noqa: F401 (eod_id: the driver's API, as before)
from .command import parser, train_args  # noqa: F401 (parser: tests and scripts import it from here)
from .recipe import Recipe, RecipeError, load_recipe
from .signals import StopRequest

# -- model, optimizer, schedule ---------------------------------------------------------------

def init_groups(recipe: Recipe):
    """The process groups of `recipe` (TSP in Megatron's TP slot, or the baselines' TP / CP), rebuilt
    when groups exist; used by `run`, bench's worker, the probe and the tests. Returns them as one
    ProcessGroupCollection, which the caller keeps and hands to `build`, `train_step` and the
    checkpoint calls (nothing else holds it)."""
    from megatron.core import parallel_state as mpu

    from .. import parallel_state as tsp_state

    if mpu.model_parallel_is_initialized():
        tsp_state.destroy_model_parallel()
    p = recipe.parallel
    extra = {"high_priority_stream_groups": ["tp"]} if p.high_priority_comm else {}
    extra["distributed_timeout_minutes"] = recipe.train.collective_timeout_s / 60  # a timedelta's minutes
    if p.comm_max_ctas:  # Megatron reads per-group NCCL settings from a YAML file only
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(f"tp:\n  max_ctas: {p.comm_max_ctas}\n")
        extra["nccl_communicator_config_path"] = f.name
    if p.expert_size > 1:
        extra["expert_model_parallel_size"] = p.expert_size
    g = recipe.group_sizes()
    try:
        if recipe.layout().uses_tsp:  # the TSP axis in Megatron's TP slot
            return tsp_state.initialize_model_parallel(tsp_size=g.tsp, pipeline_model_parallel_size=g.pp, **extra)
        return tsp_state.initialize_native_model_parallel(tensor_model_parallel_size=g.tp,
                                                          pipeline_model_parallel_size=g.pp,
                                                          context_parallel_size=g.cp, **extra)
    finally:
        if "nccl_communicator_config_path" in extra:
            os.unlink(extra["nccl_communicator_config_path"])


def build(recipe: Recipe, pg_collection, host_processes: Optional[int] = None):
    """Model, DDP and optimizer of `recipe` on the groups `pg_collection` (required: the
    collection `init_groups` returned): the model, DDP, the optimizer and `finalize_model_grads`
    all get them, none reads Megatron's global groups.
    `host_processes`: the processes of this node that pin offloaded tensors in its host memory
    (default: torchrun's LOCAL_WORLD_SIZE, else the world; the probe's fake world runs one)."""
    from .. import compat
    from ..config import require_group, require_groups
    from .build import build_gpt, wrap_ddp_and_optimizer
    from .host_memory import check_host_memory

    pgs = require_group(pg_collection, "build", "pg_collection")
    m, p, t = recipe.model, recipe.parallel, recipe.train
    dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        raise RecipeError("model.dtype = bfloat16 needs GPUs; use float32 on CPU")
    if torch.cuda.is_available():  # process-wide: set (or reset to cuBLAS's default) per build
        torch._C._set_sm_carveout_experimental(p.gemm_sm_carveout or None)
    model = build_gpt(
        m.shape(), layout=p.layout, dtype=dtype, seed=t.seed,
        sequence_parallel=recipe.layout().sequence_parallel, core_attention=p.baseline_attention,
        tsp_options=recipe.tsp_options(),
        init_method_std=m.init_method_std,
        offload_activations=p.offload_activations, **recipe.recompute_config(),
        cp_comm_type=p.cp_comm_type if p.context_size > 1 else None,  # Megatron hands it to the core attention
        use_cpu_initialization=(not torch.cuda.is_available()) if m.cpu_init is None else m.cpu_init,
        pg_collection=pgs,
        **({"moe_token_dispatcher_type": p.moe_dispatcher} if m.num_experts else {}),
    )
    # the node's host memory against what the run offloads, before the optimizer pins its share
    if host_processes is None:
        host_processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    check_host_memory(recipe, sum(q.numel() for q in model.parameters()), pgs.dp_cp.size(), host_processes)
    ddp, optimizer = wrap_ddp_and_optimizer(model, lr=t.lr, clip_grad=t.clip_grad,
                                            use_distributed_optimizer=t.distributed_optimizer,
                                            weight_decay=t.weight_decay, fsdp=p.fsdp, pg_collection=pgs,
                                            optimizer_cpu_offload=t.optimizer_cpu_offload,
                                            optimizer_offload_fraction=t.optimizer_offload_fraction)
    config = model.config
    config.finalize_model_grads_func = compat.finalize_model_grads_func(
        require_groups(pgs, compat.FINALIZE_GROUPS, "finalize_model_grads"))
    config.no_sync_func = ddp.no_sync
    return model, ddp, optimizer


def _loss_func(cp_group, loss_mask, per_token_loss):
    """Mean loss over the micro-batch. Under context parallelism each rank holds some of the
    tokens (`cp_group`: the context-parallel group): its loss is its sum over the count of the
    whole CP group, so that Megatron's schedule (which multiplies by the CP size) and DDP (which
    averages over data x context) give the gradient of the global mean; the reported value is the
    global mean."""
    loss_mask = loss_mask.float()
    local = torch.stack([(per_token_loss.float() * loss_mask).sum(), loss_mask.sum()])
    total = local.detach().clone()
    if cp_group.size() > 1:
        dist.all_reduce(total, group=cp_group)
    loss = local[0] / total[1].clamp_min(1)
    return loss, {"lm loss": total[0] / total[1].clamp_min(1)}


def _forward_step(cp_group, data_iterator, model):
    batch = next(data_iterator)
    # document ids (packed sequences, data.reset_attention_mask) travel as the attention mask
    output = model(batch["tokens"], batch["position_ids"], batch.get("document_ids"), labels=batch["labels"])
    return output, partial(_loss_func, cp_group, batch["loss_mask"])


def train_step(ddp, optimizer, batches: List[dict], recipe: Recipe, pg_collection):
    """One optimizer step over this DP rank's micro-batches through Megatron's schedule, on the
    groups `pg_collection` (required: those `build` got).
    Returns (loss averaged over the global batch, grad norm); the loss is known on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .. import compat
    from ..config import require_groups

    pgs = require_groups(pg_collection, compat.SCHEDULE_GROUPS, "the forward-backward schedule")
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func(pp_size=pgs.pp.size(), vp_size=None)(
        forward_step_func=partial(_forward_step, pgs.cp),
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=len(batches),
        seq_length=recipe.model.seq_length,
        micro_batch_size=recipe.train.micro_batch_size,
        forward_only=False,
        **compat.schedule_group_kwargs(pgs, ddp.config),
    )
    _, grad_norm, _ = optimizer.step()
    device = batches[0]["tokens"].device
    loss = torch.zeros(1, device=device, dtype=torch.float64)
    if pgs.pp.rank() == pgs.pp.size() - 1:
        loss += sum(d["lm loss"].double() for d in losses) / len(losses)
        dist.all_reduce(loss, group=pgs.dp)
        loss /= pgs.dp.size()
    # The last stage knows the loss; give it to every rank (pipeline group broadcast).
    dist.broadcast(loss, src=dist.get_process_group_ranks(pgs.pp)[-1], group=pgs.pp)
    return loss.item(), float(grad_norm) if grad_norm is not None else float("nan")


# -- progress --------------------------------------------------------------------------------

class Progress:
    """Rank-0 reporting: a progress bar on terminals, log lines, a JSON-lines metrics file."""

    def __init__(self, recipe: Recipe, world: int, out=None):
        self.recipe, self.world = recipe, world
        self.out = out or sys.stdout
        self.rank0 = dist.get_rank() == 0
        self.bar = recipe.train.progress_bar and self.out.isatty()
        self.metrics = open(recipe.train.metrics_file, "a") if (recipe.train.metrics_file and self.rank0) else None
        self.history: List[dict] = []
        self.unit = "GPU" if torch.cuda.is_available() else "process"

    def print(self, text: str):
        if self.rank0:
            if self.bar:
                self.out.write("\r\033[K")
            print(text, file=self.out, flush=True)

    def step(self, record: dict):
        self.history.append(record)
        if not self.rank0:
            return
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        t = self.recipe.train
        last = record["step"] == t.steps
        if record["step"] % t.log_interval == 0 or last:
            mem = f" | peak mem {record['peak_mem_gb']:.2f} GB" if record.get("peak_mem_gb") is not None else ""
            aux = "".join(f" | {name} {record[key]:.4f}" for key, name in (("aux_loss", "aux loss"), ("z_loss", "z loss"))
                          if record.get(key) is not None)
            self.print(f"step {record['step']:5d}/{t.steps} | loss {record['loss']:.4f}{aux} | grad norm {record['grad_norm']:.3f}"
                       f" | {record['tokens_per_s']:.0f} tok/s | {record['tokens_per_s_per_gpu']:.0f} tok/s/{self.unit}"
                       f" | step {record['step_time_s'] * 1e3:.0f} ms{mem}")
        if self.bar:
            done = int(30 * record["step"] / t.steps)
            self.out.write(f"\r[{'#' * done}{'.' * (30 - done)}] {record['step']}/{t.steps}")
            self.out.flush()

    def close(self):
        if self.metrics:
            self.metrics.close()
        if self.bar and self.rank0:
            self.out.write("\n")


def summarize(history: List[dict], recipe: Recipe, world: int) -> dict:
    times = [h["step_time_s"] for h in history[1:]] or [h["step_time_s"] for h in history]
    times = sorted(times)
    median = times[len(times) // 2] if times else float("nan")
    tokens = recipe.train.global_batch_size * recipe.model.seq_length
    peaks = [h["peak_mem_gb"] for h in history if h.get("peak_mem_gb") is not None]
    return {
        "layout": recipe.parallel.layout, "size": recipe.axis_size, "pipeline_size": recipe.parallel.pipeline_size,
        "context_size": recipe.parallel.context_size, "fsdp": recipe.parallel.fsdp,
        "world_size": world, "seq_length": recipe.model.seq_length, "steps_run": len(history),
        "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
        "median_step_time_s": median, "tokens_per_s": tokens / median if median else None,
        "tokens_per_s_per_gpu": tokens / median / world if median else None,
        "peak_mem_gb": max(peaks) if peaks else None,
    }


# -- the run ---------------------------------------------------------------------------------

def run(recipe: Recipe, out=None) -> dict:
    """Train as the recipe says, in the current torch.distributed world. Returns
    {"history": [per-step records], "summary": {...}} on every rank. SIGINT / SIGTERM / SIGUSR1
    stop it after the current step (see megatron_tsp.training.signals): it saves (train.save_on_signal)
    and returns normally, with summary["stopped_by"] naming the signal."""
    with StopRequest() as stop:
        return _run(recipe, stop, out)


def _run(recipe: Recipe, stop: StopRequest, out=None) -> dict:
    from .build import init_distributed
    from .cpu import install_cpu_shims

    check_resume(recipe.train)  # torch-free, before any collective: a missing or corrupt checkpoint
    backend = init_distributed(recipe.train.collective_timeout_s)
    install_cpu_shims()  # the training run's entry: megatron-core on CPU needs them (no-op with CUDA)
    world = dist.get_world_size()
    recipe.check(world)
    t = recipe.train
    saved, resumed_from = prepare_resume(recipe)
    pgs = init_groups(recipe)  # the groups built once: the model, DDP, optimizer, step and checkpoints run on them
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, ddp, optimizer = build(recipe, pgs)
    start = 0
    if saved is not None:
        start, resumed_from = resume(model, optimizer, recipe, saved, world, pgs)
    dataset = build_train_dataset(recipe)
    progress = Progress(recipe, world, out)
    p = recipe.parallel
    with_cp = f" x context {p.context_size}" if p.context_size > 1 else ""
    with_fsdp = " (FSDP over data x context)" if p.fsdp else ""
    progress.print(f"megatron-tsp train: layout {p.layout} size {recipe.axis_size} x pipeline "
                   f"{p.pipeline_size}{with_cp} x data {pgs.dp.size()}{with_fsdp} on {world} "
                   f"{'GPUs' if backend == 'nccl' else 'CPU processes'} ({backend}); S={recipe.model.seq_length}, "
                   f"global batch {t.global_batch_size}; steps {start + 1}..{t.steps}" + resumed_from)
    tokens = t.global_batch_size * recipe.model.seq_length
    dp_rank, dp_size = pgs.dp.rank(), pgs.dp.size()
    saved_step = start if saved is not None else None  # the step whose checkpoint is on disk
    stopped_after = None
    for step in range(start, t.steps):
        # Every rank learns whether any rank was asked to stop, before this step's collectives.
        if stop.agreed(device):
            stopped_after = step
            break
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batches = list(micro_batches(dataset, step, recipe, dp_rank, dp_size, device, pgs.cp))
        loss, grad_norm = train_step(ddp, optimizer, batches, recipe, pgs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "grad_norm": grad_norm, "step_time_s": dt,
                  "tokens_per_s": tokens / dt, "tokens_per_s_per_gpu": tokens / dt / world,
                  "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        if recipe.model.num_experts:
            from ..tsp.moe import moe_step_metrics

            record.update(moe_step_metrics(model, len(batches), pgs))
        progress.step(record)
        if t.save_dir and ((t.save_interval and (step + 1) % t.save_interval == 0) or step + 1 == t.steps):
            path = save_checkpoint(model, optimizer, recipe, step + 1, pg_collection=pgs)
            saved_step = step + 1
            progress.print(f"saved checkpoint {path}")
    if stopped_after is not None:
        if t.save_dir and t.save_on_signal and saved_step is None and stopped_after == 0:
            where = "nothing saved (no step ran)"
        elif t.save_dir and t.save_on_signal and saved_step != stopped_after:
            where = f"checkpoint saved in {save_checkpoint(model, optimizer, recipe, stopped_after, pg_collection=pgs)}"
        elif t.save_dir and t.save_on_signal:
            where = f"its checkpoint is {_step_dir(t.save_dir, stopped_after)}"
        else:
            where = "nothing saved (" + ("train.save_on_signal=false" if t.save_dir else "train.save_dir is not set") + ")"
        progress.print(f"stopped by {stop.name} after step {stopped_after}: {where}")
    progress.close()
    summary = summarize(progress.history, recipe, world)
    summary["stopped_by"] = stop.name if stopped_after is not None else None
    if summary["steps_run"]:
        mem = f", peak mem {summary['peak_mem_gb']:.2f} GB/GPU" if summary["peak_mem_gb"] is not None else ""
        progress.print(f"summary: {summary['steps_run']} steps, loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, "
                       f"median step {summary['median_step_time_s'] * 1e3:.0f} ms, {summary['tokens_per_s']:.0f} tok/s, "
                       f"{summary['tokens_per_s_per_gpu']:.0f} tok/s/{progress.unit}{mem}")
    return {"history": progress.history, "summary": summary}


def collective_failure(error: BaseException, timeout_s: float) -> str:
    """The one line a rank prints when training fails with a communication error (before the
    traceback): this rank, its host and node, and the error's first line, which for gloo names
    the peer's address ("Connection closed by peer [10.0.0.2]:...", "Timed out waiting ...")."""
    import socket

    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    node = os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "?"))
    where = (f"megatron-tsp train: rank {dist.get_rank()} of {dist.get_world_size()} on host {socket.gethostname()} "
             f"(node rank {node}) failed: {first}")
    if not _is_communication_error(error):  # a bug or a device error on this rank: no peer to blame
        return where
    return (f"{where} -- a peer rank died or did not answer within "
            f"train.collective_timeout_s = {timeout_s:g} s; the job ends, resubmit to resume from the last checkpoint")


_COMMUNICATION_WORDS = ("connection", "peer", "timed out", "timeout", "gloo", "nccl", "socket", "broken pipe",
                        "processgroup", "watchdog")


def _is_communication_error(error: BaseException) -> bool:
    """torch's distributed errors, and the RuntimeErrors gloo / NCCL raise when a peer is gone."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(word in text for word in _COMMUNICATION_WORDS)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if rank() == 0:
        args, recipe_path, overrides = train_args(argv)
    else:  # argparse's own errors: rank 0 prints them
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            args, recipe_path, overrides = train_args(argv)
    if args.nproc_per_node is not None:  # `python -m megatron_tsp.training.loop --nproc-per-node N`
        from ..cli import main as cli_main  # -> training.launch, which starts the workers

        return cli_main(["train", *argv])
    patches.install(patches.TRAIN_DEPRECATION_WARNINGS)
    hide_benign_output(verbose_requested(argv))
    try:
        recipe = load_recipe(recipe_path, overrides)
        result = run(recipe)
    except TSPConfigError as e:  # raised on every rank before any collective: rank 0 says it
        if dist.is_initialized():
            dist.destroy_process_group()
        if e.__cause__ is not None and verbose_requested(argv) and rank() == 0:  # e.g. a checkpoint's load failure
            import traceback

            traceback.print_exception(e.__cause__, file=sys.stderr)
        return print_user_error("megatron-tsp train", e)
    except Exception as e:  # gloo / NCCL: a peer died or stopped answering; or a bug: say who and where first
        line = collective_failure(e, recipe.train.collective_timeout_s) if dist.is_initialized() else None
        if line is not None and not verbose_requested(argv):
            import traceback

            from ..output import write_failure_report

            # Under megatron-tsp's launcher: it prints the rank at fault once, not every rank's traceback.
            if write_failure_report(line, "".join(traceback.format_exception(e)), _is_communication_error(e)):
                return 1
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        raise
    if args.summary_json and dist.get_rank() == 0:
        with open(args.summary_json, "w") as f:
            json.dump(result["summary"], f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
