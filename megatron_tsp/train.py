"""`megatron-tsp train`: one training driver for TSP and its baselines, from megatron-core's
own parts (DDP, get_megatron_optimizer, get_forward_backward_func, dist_checkpointing,
MockGPTDataset / GPTDataset through BlendedMegatronDatasetBuilder).

    torchrun --nproc-per-node 2 -m megatron_tsp.train configs/tiny.yaml parallel.size=2 train.steps=10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist

from .config import TSPConfigError
from .recipe import Recipe, RecipeError, load_recipe, valid_keys
from .signals import StopRequest

CHECKPOINT_META = "megatron_tsp_run.json"


# -- data ----------------------------------------------------------------------------------

class _VocabTokenizer:
    """What Megatron's GPT datasets read of a tokenizer: the vocabulary size and the EOD id."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.eos = vocab_size - 1
        self.unique_identifiers = {"class": "megatron_tsp.VocabTokenizer", "vocab_size": vocab_size}


def build_train_dataset(recipe: Recipe):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    data, m, t = recipe.data, recipe.model, recipe.train
    if data.path is not None:
        missing = [data.path + ext for ext in (".bin", ".idx") if not os.path.isfile(data.path + ext)]
        if missing:
            raise RecipeError(f"data.path = {data.path!r}: missing {', '.join(missing)} "
                              "(a Megatron indexed dataset prefix: PATH.bin and PATH.idx)")
        for f in (data.path + ".bin", data.path + ".idx"):
            if not os.access(f, os.R_OK):
                raise RecipeError(f"data.path = {data.path!r}: {f} is not readable")
    config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=m.seq_length,
        blend=([data.path], None) if data.path else None,
        split=data.split,
        path_to_cache=data.cache_dir,
        tokenizer=_VocabTokenizer(m.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    cls = MockGPTDataset if data.path is None else GPTDataset
    try:
        train, _, _ = BlendedMegatronDatasetBuilder(cls, [t.steps * t.global_batch_size, 0, 0], lambda: True, config).build()
    except (OSError, ValueError, AssertionError) as e:
        raise RecipeError(f"data.path = {data.path!r} could not be read as a Megatron indexed dataset: {e}") from e
    if train is None:
        raise RecipeError(f"data.split = {data.split!r} leaves no training samples")
    return train


def micro_batches(dataset, step: int, recipe: Recipe, dp_rank: int, dp_size: int, device, cp_group=None):
    """This DP rank's micro-batches of global step `step`: samples [step*G, (step+1)*G) split
    contiguously over DP ranks; under context parallelism, this CP rank's tokens of them
    (`cp_group`; Megatron's get_batch_on_this_cp_rank). Deterministic, so a resumed run sees
    the same data."""
    from .baselines.context_parallel import cp_slice_batch

    if recipe.parallel.context_size > 1 and (cp_group is None or cp_group.size() != recipe.parallel.context_size):
        raise RecipeError(f"parallel.context_size = {recipe.parallel.context_size}: micro_batches needs the "
                          "context-parallel group (cp_group) to hand each CP rank its tokens")
    t = recipe.train
    per_rank = t.global_batch_size // dp_size
    first = step * t.global_batch_size + dp_rank * per_rank
    for mb in range(per_rank // t.micro_batch_size):
        idx = range(first + mb * t.micro_batch_size, first + (mb + 1) * t.micro_batch_size)
        samples = [dataset[i % len(dataset)] for i in idx]
        yield cp_slice_batch({k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
                              for k in ("tokens", "labels", "loss_mask", "position_ids")}, cp_group)


# -- model, optimizer, schedule ---------------------------------------------------------------

def _init_groups(recipe: Recipe):
    from megatron.core import parallel_state as mpu

    from . import parallel_state as tsp_state

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
    try:
        if p.layout == "tsp":
            tsp_state.initialize_model_parallel(tsp_size=p.size, pipeline_model_parallel_size=p.pipeline_size, **extra)
        else:
            mpu.initialize_model_parallel(tensor_model_parallel_size=recipe.axis_size,
                                          pipeline_model_parallel_size=p.pipeline_size,
                                          context_parallel_size=p.context_size, **extra)
    finally:
        if "nccl_communicator_config_path" in extra:
            os.unlink(extra["nccl_communicator_config_path"])


def build(recipe: Recipe):
    from megatron.core.distributed import finalize_model_grads

    from .training import build_gpt, wrap_ddp_and_optimizer

    m, p, t = recipe.model, recipe.parallel, recipe.train
    dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        raise RecipeError("model.dtype = bfloat16 needs GPUs; use float32 on CPU")
    if torch.cuda.is_available():  # process-wide: set (or reset to cuBLAS's default) per build
        torch._C._set_sm_carveout_experimental(p.gemm_sm_carveout or None)
    model = build_gpt(
        m.shape(), layout="tsp" if p.layout == "tsp" else "native", dtype=dtype, seed=t.seed,
        sequence_parallel=p.layout in ("tsp", "tp_sp"), core_attention=p.baseline_attention,
        tsp_options=recipe.tsp_options(),
        init_method_std=m.init_method_std,
        offload_activations=p.offload_activations, **recipe.recompute_config(),
        use_cpu_initialization=(not torch.cuda.is_available()) if m.cpu_init is None else m.cpu_init,
    )
    ddp, optimizer = wrap_ddp_and_optimizer(model, lr=t.lr, clip_grad=t.clip_grad,
                                            use_distributed_optimizer=t.distributed_optimizer,
                                            weight_decay=t.weight_decay, fsdp=p.fsdp)
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return model, ddp, optimizer


def _loss_func(loss_mask, per_token_loss):
    """Mean loss over the micro-batch. Under context parallelism each rank holds some of the
    tokens: its loss is its sum over the count of the whole CP group, so that Megatron's schedule
    (which multiplies by the CP size) and DDP (which averages over data x context) give the
    gradient of the global mean; the reported value is the global mean."""
    from megatron.core import parallel_state as mpu

    loss_mask = loss_mask.float()
    local = torch.stack([(per_token_loss.float() * loss_mask).sum(), loss_mask.sum()])
    total = local.detach().clone()
    cp_group = mpu.get_context_parallel_group()
    if cp_group.size() > 1:
        dist.all_reduce(total, group=cp_group)
    loss = local[0] / total[1].clamp_min(1)
    return loss, {"lm loss": total[0] / total[1].clamp_min(1)}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def train_step(ddp, optimizer, batches: List[dict], recipe: Recipe):
    """One optimizer step over this DP rank's micro-batches through Megatron's schedule.
    Returns (loss averaged over the global batch, grad norm); the loss is known on every rank."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=len(batches),
        seq_length=recipe.model.seq_length,
        micro_batch_size=recipe.train.micro_batch_size,
        forward_only=False,
    )
    _, grad_norm, _ = optimizer.step()
    device = batches[0]["tokens"].device
    loss = torch.zeros(1, device=device, dtype=torch.float64)
    if mpu.is_pipeline_last_stage():
        loss += sum(d["lm loss"].double() for d in losses) / len(losses)
        dist.all_reduce(loss, group=mpu.get_data_parallel_group())
        loss /= mpu.get_data_parallel_world_size()
    # The last stage knows the loss; give it to every rank (pipeline group broadcast).
    dist.broadcast(loss, src=mpu.get_pipeline_model_parallel_last_rank(), group=mpu.get_pipeline_model_parallel_group())
    return loss.item(), float(grad_norm) if grad_norm is not None else float("nan")


# -- checkpoints -----------------------------------------------------------------------------
#
# save_dir/step_NNNNNNN/   one checkpoint (Megatron's distributed checkpoint format, torch_dist)
# save_dir/latest          the step of the newest complete one
# save_dir/megatron_tsp_run.json   the model, layout and optimizer format that wrote it
#
# A checkpoint is written as step_NNNNNNN.incomplete and renamed once every rank has finished;
# `latest` moves after the rename. A run killed mid-save leaves only a *.incomplete directory,
# never `latest` pointing at it; the next run in that directory removes it.

INCOMPLETE = ".incomplete"
# The distributed optimizer's format: `fully_reshardable` stores its state per model parameter,
# in the model's own (TP/TSP-sliced, global-layer) keys, so it loads at any TSP / TP / pipeline /
# data-parallel layout; `dp_reshardable` (what megatron-tsp wrote before) stores each rank's
# flat buffer shard and loads only at the layout that wrote it.
DISTRIBUTED_OPTIMIZER_FORMAT = "fully_reshardable"
# What must match to resume: the parameters' shapes (ModelShape) and their dtype. seq_length
# changes no parameter under RoPE.
_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "seq_length", "swiglu", "add_bias_linear", "normalization",
               "position_embedding_type", "share_embeddings_and_output_weights", "dtype")


def _step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step_{step:07d}")


def latest_step(save_dir: Optional[str]) -> Optional[int]:
    path = os.path.join(save_dir, "latest") if save_dir else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def remove_incomplete_checkpoints(save_dir: Optional[str]) -> List[str]:
    """Remove what a run killed mid-save left in save_dir (rank 0 only): *.incomplete
    checkpoint directories and half-written `latest` / metadata files. Returns their names."""
    if not save_dir or not os.path.isdir(save_dir) or dist.get_rank() != 0:
        return []
    import shutil

    removed = []
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith("step_") and name.endswith(INCOMPLETE) and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
        elif name in ("latest.tmp", CHECKPOINT_META + ".tmp"):
            os.unlink(path)
    return removed


def _checkpoint_identity(recipe: Recipe) -> dict:
    """What a checkpoint records about the run that wrote it: the model, the layout (any layout
    may resume it), the optimizer and its checkpoint format."""
    ident = recipe.to_dict()
    dist_opt = recipe.train.distributed_optimizer
    return {"model": ident["model"], "parallel": ident["parallel"], "world_size": dist.get_world_size(),
            "distributed_optimizer": dist_opt,
            "optimizer_format": DISTRIBUTED_OPTIMIZER_FORMAT if dist_opt else "plain"}


def _saved_optimizer_format(saved: dict) -> str:
    if "optimizer_format" in saved:
        return saved["optimizer_format"]
    return "dp_reshardable" if saved.get("distributed_optimizer") else "plain"  # written before the key


def check_checkpoint_matches(recipe: Recipe, save_dir: str) -> dict:
    """Refuse a checkpoint whose parameters do not fit this model (shapes, vocabulary, dtype)
    or whose optimizer state cannot be read by this run's optimizer, listing every difference;
    a different layout (TSP / TP / TP+SP size, pipeline, data parallel, world size) is fine.
    Returns what the checkpoint records."""
    meta_path = os.path.join(save_dir, CHECKPOINT_META)
    if not os.path.isfile(meta_path):
        raise RecipeError(f"train.save_dir = {save_dir!r} has a checkpoint but no {CHECKPOINT_META}: "
                          "not written by megatron-tsp train; refusing to resume or overwrite it")
    with open(meta_path) as f:
        saved = json.load(f)
    mine = _checkpoint_identity(recipe)
    defaults = Recipe().to_dict()  # a key added after the checkpoint was written has its default there
    diffs = []
    for key in _SHAPE_KEYS:
        if key == "seq_length" and recipe.model.position_embedding_type == "rope":
            continue
        theirs = saved.get("model", {}).get(key, defaults["model"].get(key))
        if theirs != mine["model"][key]:
            diffs.append(f"model.{key}: checkpoint {theirs!r}, recipe {mine['model'][key]!r}")
    if saved.get("distributed_optimizer") != mine["distributed_optimizer"]:
        diffs.append(f"train.distributed_optimizer: checkpoint {saved.get('distributed_optimizer')!r}, "
                     f"recipe {mine['distributed_optimizer']!r} (their optimizer states are stored differently)")
    elif _saved_optimizer_format(saved) == "dp_reshardable":
        # An older distributed-optimizer checkpoint: flat buffer shards, readable at its own layout only.
        for key in ("layout", "size", "pipeline_size", "context_size"):
            theirs = saved.get("parallel", {}).get(key, defaults["parallel"].get(key))
            if theirs != mine["parallel"][key]:
                diffs.append(f"parallel.{key}: checkpoint {theirs!r}, recipe {mine['parallel'][key]!r} (a "
                             "dp_reshardable distributed-optimizer checkpoint loads only at the layout that wrote it)")
        if saved.get("world_size") != mine["world_size"]:
            diffs.append(f"world_size: checkpoint {saved.get('world_size')!r}, run {mine['world_size']!r} (a "
                         "dp_reshardable distributed-optimizer checkpoint loads only at the layout that wrote it)")
    if diffs:
        raise RecipeError(f"the checkpoint in {save_dir!r} does not match this run (it is left untouched):\n  "
                          + "\n  ".join(diffs))
    return saved


def _layout_text(parallel: dict, world_size: int) -> str:
    p = parallel
    size = 1 if p.get("layout") == "dp" else p.get("size", 1)
    model = size * p.get("pipeline_size", 1) * p.get("context_size", 1)
    cp = f" x context {p['context_size']}" if p.get("context_size", 1) > 1 else ""
    return (f"{p.get('layout')} {size} x pipeline {p.get('pipeline_size', 1)}{cp} x data "
            f"{world_size // model if world_size else '?'}")


def _sharded_state(model, optimizer, is_loading: bool, optimizer_format: str = DISTRIBUTED_OPTIMIZER_FORMAT):
    model_sd = model.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": optimizer_format}  # the plain optimizer ignores it
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)}


def save_checkpoint(model, optimizer, recipe: Recipe, step: int) -> str:
    """Save step `step` to save_dir/step_NNNNNNN atomically (see above); a collective."""
    import shutil

    from megatron.core import dist_checkpointing

    save_dir = recipe.train.save_dir
    path = _step_dir(save_dir, step)
    partial_path = path + INCOMPLETE
    rank0 = dist.get_rank() == 0
    if rank0:
        if os.path.isdir(partial_path):
            shutil.rmtree(partial_path)
        os.makedirs(partial_path)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state["step"] = step
    dist_checkpointing.save(state, partial_path)
    dist.barrier()  # every rank's shards are on disk
    if rank0:
        if os.path.isdir(path):  # a complete step_N that never became `latest` (killed in between)
            shutil.rmtree(path)
        os.rename(partial_path, path)
        _write_atomically(os.path.join(save_dir, CHECKPOINT_META), json.dumps(_checkpoint_identity(recipe), indent=1))
        _write_atomically(os.path.join(save_dir, "latest"), str(step))
    dist.barrier()
    return path


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state (no 'step'), which Megatron's DistributedOptimizer
    state_dict requires without TE/apex; take one zero-gradient step (no parameter change with
    zero gradients), as Megatron itself does before loading FSDP checkpoints. The loaded
    checkpoint then overwrites every state tensor and the step."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            with torch.no_grad():
                opt._init_optimizer_states_with_dummy_values()


_PARAM_STATE_LOADERS = {"fully_reshardable": "load_parameter_state_from_fully_reshardable",
                        "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
                        "dp_reshardable": "load_parameter_state_from_dp_reshardable"}


def _load_optimizer_state(optimizer, state_dict) -> None:
    """optimizer.load_state_dict, with two fixes for megatron-core 0.16.1's DistributedOptimizer
    on torch Adam (no TE/apex):
    - its load_state_dict gives every parameter's Adam state one shared `step` tensor, which
      torch Adam increments in place once per parameter: from the second resumed step on the
      bias corrections were wrong (the ~0.3% drift a resumed run showed). Each parameter gets
      its own copy here, as torch Adam keeps them.
    - the model-space formats (fully_reshardable) store no per-parameter `step` (it is in the
      param groups), but their loaders copy every key of the live state, `step` included
      (KeyError): the step is set aside while they run."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chained) == 1:
        pairs = [(chained[0], state_dict)]
    else:
        items = state_dict.values() if isinstance(state_dict, dict) else state_dict
        pairs = list(zip(chained, [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else items))
    for opt, sd in pairs:
        if not isinstance(opt, DistributedOptimizer) or "param_state" not in sd:
            opt.load_state_dict(sd)
            continue
        sd = dict(sd)
        param_state, kind = sd.pop("param_state"), sd.pop("param_state_sharding_type")
        if kind not in _PARAM_STATE_LOADERS:
            raise RecipeError(f"distributed-optimizer checkpoint format {kind!r} is not one megatron-tsp reads "
                              f"({', '.join(_PARAM_STATE_LOADERS)})")
        opt.load_state_dict(sd)  # param groups and the step
        inner = opt.optimizer.state
        steps = {p: st.pop("step") for p, st in inner.items() if "step" in st} if kind != "dp_reshardable" else {}
        getattr(opt, _PARAM_STATE_LOADERS[kind])(param_state)
        for p, step in steps.items():
            inner[p]["step"] = step
        for st in inner.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].detach().clone()


def load_checkpoint(model, optimizer, recipe: Recipe, optimizer_format: str = DISTRIBUTED_OPTIMIZER_FORMAT) -> int:
    """Load the latest checkpoint of save_dir into this run's model and optimizer, at whatever
    layout this run has (the checkpoint's keys are layout-free: global layer numbers, full
    tensors sliced per TP/TSP rank). Returns its step."""
    from megatron.core import dist_checkpointing

    _materialize_optimizer_state(optimizer)
    step = latest_step(recipe.train.save_dir)
    path = _step_dir(recipe.train.save_dir, step)
    state = _sharded_state(model, optimizer, is_loading=True, optimizer_format=optimizer_format)
    state["step"] = step
    try:
        loaded = dist_checkpointing.load(state, path)
    except Exception as e:  # shapes or keys that do not fit this model
        raise RecipeError(f"checkpoint {path!r} does not fit this model: {e}") from e
    with torch.no_grad():  # float32 main params are views of the (grad-requiring) model params
        model.load_state_dict(loaded["model"])
        _load_optimizer_state(optimizer, loaded["optimizer"])
    return int(loaded["step"])


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
            self.print(f"step {record['step']:5d}/{t.steps} | loss {record['loss']:.4f} | grad norm {record['grad_norm']:.3f}"
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
    stop it after the current step (see megatron_tsp.signals): it saves (train.save_on_signal)
    and returns normally, with summary["stopped_by"] naming the signal."""
    with StopRequest() as stop:
        return _run(recipe, stop, out)


def _run(recipe: Recipe, stop: StopRequest, out=None) -> dict:
    from megatron.core import parallel_state as mpu

    from .training import init_distributed

    backend = init_distributed(recipe.train.collective_timeout_s)
    world = dist.get_world_size()
    recipe.check(world)
    t = recipe.train
    start = 0
    saved = None
    if t.save_dir:
        found = latest_step(t.save_dir)
        if t.resume and found is not None:
            saved = check_checkpoint_matches(recipe, t.save_dir)
        elif not t.resume and (found is not None or os.path.isfile(os.path.join(t.save_dir, CHECKPOINT_META))):
            raise RecipeError(f"train.save_dir = {t.save_dir!r} already holds checkpoints: set train.resume=true "
                              "to continue them, or choose another directory (they are never overwritten)")
        for name in remove_incomplete_checkpoints(t.save_dir):
            print(f"megatron-tsp train: removed {os.path.join(t.save_dir, name)}, an incomplete checkpoint "
                  "left by an interrupted run", flush=True)
    _init_groups(recipe)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, ddp, optimizer = build(recipe)
    resumed_from = ""
    if saved is not None:
        start = load_checkpoint(model, optimizer, recipe, _saved_optimizer_format(saved))
        theirs, mine = _layout_text(saved["parallel"], saved.get("world_size")), _layout_text(recipe.to_dict()["parallel"], world)
        resumed_from = f" (resumed from {t.save_dir}" + (f", written by {theirs}" if theirs != mine else "") + ")"
    dataset = build_train_dataset(recipe)
    progress = Progress(recipe, world, out)
    p = recipe.parallel
    with_cp = f" x context {p.context_size}" if p.context_size > 1 else ""
    with_fsdp = " (FSDP over data x context)" if p.fsdp else ""
    progress.print(f"megatron-tsp train: layout {p.layout} size {recipe.axis_size} x pipeline "
                   f"{p.pipeline_size}{with_cp} x data {mpu.get_data_parallel_world_size()}{with_fsdp} on {world} "
                   f"{'GPUs' if backend == 'nccl' else 'CPU processes'} ({backend}); S={recipe.model.seq_length}, "
                   f"global batch {t.global_batch_size}; steps {start + 1}..{t.steps}" + resumed_from)
    tokens = t.global_batch_size * recipe.model.seq_length
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
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
        batches = list(micro_batches(dataset, step, recipe, dp_rank, dp_size, device, mpu.get_context_parallel_group()))
        loss, grad_norm = train_step(ddp, optimizer, batches, recipe)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "grad_norm": grad_norm, "step_time_s": dt,
                  "tokens_per_s": tokens / dt, "tokens_per_s_per_gpu": tokens / dt / world,
                  "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        progress.step(record)
        if t.save_dir and ((t.save_interval and (step + 1) % t.save_interval == 0) or step + 1 == t.steps):
            path = save_checkpoint(model, optimizer, recipe, step + 1)
            saved_step = step + 1
            progress.print(f"saved checkpoint {path}")
    if stopped_after is not None:
        if t.save_dir and t.save_on_signal and saved_step is None and stopped_after == 0:
            where = "nothing saved (no step ran)"
        elif t.save_dir and t.save_on_signal and saved_step != stopped_after:
            where = f"checkpoint saved in {save_checkpoint(model, optimizer, recipe, stopped_after)}"
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
    return (f"megatron-tsp train: rank {dist.get_rank()} of {dist.get_world_size()} on host {socket.gethostname()} "
            f"(node rank {node}) failed: {first} -- a peer rank died or did not answer within "
            f"train.collective_timeout_s = {timeout_s:g} s; the job ends, resubmit to resume from the last checkpoint")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-tsp train",
        description="Train a GPT with TSP (or a baseline layout) from a YAML recipe; launch with torchrun.",
        epilog="Recipe keys (section.key=value):\n" + valid_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", default=None, help="YAML recipe (default: the embedded tiny recipe, = configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.size=4 model.seq_length=32768")
    p.add_argument("--resume", metavar="DIR", help="resume from the latest checkpoint in DIR (sets train.save_dir=DIR train.resume=true)")
    p.add_argument("--summary-json", metavar="FILE", help="write the final summary (rank 0) to FILE")
    return p


def main(argv=None):
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|deprecated).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parser().parse_args(argv)
    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path is not None and "=" in recipe_path:  # only overrides were given
        overrides.insert(0, recipe_path)
        recipe_path = None
    if args.resume:
        overrides += [f"train.save_dir={args.resume}", "train.resume=true"]
    try:
        recipe = load_recipe(recipe_path, overrides)
        result = run(recipe)
    except TSPConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    except RuntimeError as e:  # gloo / NCCL: a peer died or stopped answering; say who and where first
        if dist.is_initialized():
            print(collective_failure(e, recipe.train.collective_timeout_s), file=sys.stderr, flush=True)
        raise
    if args.summary_json and dist.get_rank() == 0:
        with open(args.summary_json, "w") as f:
            json.dump(result["summary"], f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
