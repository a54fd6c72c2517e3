"""The driver's checkpoints: Megatron dist-checkpointing of the model and the optimizer, one
folder per step, written under a temporary name and renamed when complete, with a JSON file of
what the run was (model shape, layout, optimizer format) that a resume checks before loading.
A TSP checkpoint is a Megatron TP one (docs/design.md §9): it loads at another D or into TP."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
import traceback
import warnings
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ..layouts import LAYOUTS
from ..output import verbose_requested
from .recipe import Recipe, RecipeError

from .checkpoint_files import (CHECKPOINT_META, INCOMPLETE, MANIFEST, corrupt_checkpoint_error,  # noqa: F401
                               latest_step, step_dir, write_manifest)


#
# save_dir/step_NNNNNNN/   one checkpoint (Megatron's distributed checkpoint format, torch_dist)
# save_dir/latest          the step of the newest complete one
# save_dir/megatron_tsp_run.json   the model, layout and optimizer format that wrote it
#
# A checkpoint is written as step_NNNNNNN.incomplete and renamed once every rank has finished;
# `latest` moves after the rename. A run killed mid-save leaves only a *.incomplete directory,
# never `latest` pointing at it; the next run in that directory removes it. Before the rename
# rank 0 lists the files and their sizes (checkpoint_files.MANIFEST), which a resume checks.
# The distributed optimizer's format: `fully_reshardable` stores its state per model parameter,
# in the model's own (TP/TSP-sliced, global-layer) keys, so it loads at any TSP / TP / pipeline /
# data-parallel layout; `dp_reshardable` (what megatron-tsp wrote before) stores each rank's
# flat buffer shard and loads only at the layout that wrote it.
DISTRIBUTED_OPTIMIZER_FORMAT = "fully_reshardable"
# What must match to resume: the parameters' shapes (ModelShape, the MoE layers' included) and
# their dtype. seq_length changes no parameter under RoPE.
_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "vocab_size", "seq_length", "swiglu", "add_bias_linear", "normalization",
               "position_embedding_type", "share_embeddings_and_output_weights", "num_experts",
               "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
               "moe_layer_freq", "dtype")


_step_dir = step_dir


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
    record = LAYOUTS.get(p.get("layout"))  # a layout this version does not know: its size as written
    size = record.group_sizes(p.get("size", 1)).axis if record else p.get("size", 1)
    model = size * p.get("pipeline_size", 1) * p.get("context_size", 1)
    cp = f" x context {p['context_size']}" if p.get("context_size", 1) > 1 else ""
    return (f"{p.get('layout')} {size} x pipeline {p.get('pipeline_size', 1)}{cp} x data "
            f"{world_size // model if world_size else '?'}")


def _sharded_state(model, optimizer, is_loading: bool, pg_collection,
                   optimizer_format: str = DISTRIBUTED_OPTIMIZER_FORMAT):
    pgs = pg_collection
    # The data x context group that sets each tensor's replica id: Megatron's way to take it is
    # the metadata (it reads the global group when the key is missing).
    model_sd = model.sharded_state_dict(metadata={"dp_cp_group": pgs.dp_cp})
    metadata = {"distrib_optim_sharding_type": optimizer_format}  # the plain optimizer ignores it
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)}


class CheckpointSaveError(RecipeError):
    """A save that failed (a full disk, a quota, a lost mount): raised on every rank, printed once."""


def _any_failed(failed: bool) -> bool:
    """Whether any rank failed (a collective: every rank calls it at the same point)."""
    flag = torch.tensor([int(failed)], dtype=torch.int32)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^\n;]*)")
_WRITER_LOG = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_WORKER_ERROR = re.compile(r"encountered an error: ([^\n]+)")


def _free_space(path: str) -> str:
    try:
        st = os.statvfs(path)
    except OSError:
        return "unknown"
    free = st.f_bavail * st.f_frsize
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.0f} MiB"


class _HeldLog(logging.Handler):
    """Holds what megatron-core's checkpoint writer logs while a save runs: its errors name the
    failing write's errno ("[Errno 28] No space left on device"), which the exception it raises
    does not; printed only with --verbose, the failure's one line quotes them."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.logger = logging.getLogger(_WRITER_LOG)
        self.logger.addHandler(self)
        self.propagate, self.logger.propagate = self.logger.propagate, False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


def _save_failure(error: Optional[BaseException], log: str) -> Optional[str]:
    """This rank's own failing write in one line (the errno's text: No space left on device), or
    None when this rank's writes did not fail (megatron-core raises its CheckpointException on
    every rank, the others' failures listed on the coordinator: those ranks say theirs)."""
    if error is None:
        return None
    cause = error
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.strerror:  # rank 0's own files (the list, `latest`)
        return f"{cause.strerror} [errno {cause.errno}]" + (f" ({cause.filename})" if cause.filename else "")
    found = _ERRNO_TEXT.search(log)  # this rank's shard writer logged it
    if found:
        return f"{found.group(2).strip()} [errno {found.group(1)}]"
    worker = _WORKER_ERROR.search(log)  # torch.save's own words (it drops the errno): "file write failed"
    if worker:
        return worker.group(1).strip()[:300]
    if isinstance(error, CheckpointException):
        own = (getattr(error, "failures", None) or {}).get(dist.get_rank())
        if own is None:
            return None
        own = own[0] if isinstance(own, tuple) and own else own
        found = _ERRNO_TEXT.search(str(own))
        return f"{found.group(2).strip()} [errno {found.group(1)}]" if found else _first_line(own)
    return _first_line(error)


# megatron-core's save has steps where the coordinator (rank 0) writes alone, then meets the others in
# a collective: (caller, callee) -> the collective rank 0 skips when the write raises. 0.16.1-0.19.2:
# state_dict_saver.save_state_dict_async_finalize writes `.metadata` (storage_writer.finish), then
# broadcasts whether the save failed; serialization.save's finalize steps write metadata.json
# (save_config) and the integrity manifest, then meet in a barrier.
_COORDINATOR_WRITES = {("save_state_dict_async_finalize", "finish"): "broadcast",
                       ("metadata_finalize_fn", "save_config"): "barrier",
                       ("integrity_finalize_fn", "save_integrity_manifest"): "barrier"}


def _release_waiting_ranks(error: BaseException) -> None:
    """A write that failed on rank 0 inside one of megatron-core's coordinator-only steps leaves the
    other ranks waiting in the collective after it until the collective timeout: rank 0 takes its part
    in that collective ("the save failed", for the broadcast), so every rank reaches the agreement on
    the failure at once."""
    frames = list(traceback.walk_tb(error.__traceback__))
    for (caller, _), (callee, _) in zip(frames, frames[1:]):
        step = _COORDINATOR_WRITES.get((caller.f_code.co_name, callee.f_code.co_name))
        if step == "broadcast":
            wrapper = caller.f_locals["dist_wrapper"]
            failed = torch.tensor([1], dtype=torch.int, device=torch.cuda.current_device())  # as megatron-core's
            dist.broadcast(failed, src=wrapper.coordinator_rank, group=wrapper.group)
            return
        if step == "barrier":
            dist.barrier()
            return


def save_checkpoint(model, optimizer, recipe: Recipe, step: int, pg_collection) -> str:
    """Save step `step` to save_dir/step_NNNNNNN atomically (see above); a collective.
    `pg_collection`: the groups the model was built on (required).
    A write that fails on any rank (ENOSPC: the disk filled up) is a CheckpointSaveError on every
    rank naming the directory; the partial step is removed, `latest` and the checkpoint it names
    are untouched. After a complete save, train.keep_checkpoints prunes older ones."""
    import shutil

    from megatron.core import dist_checkpointing

    from ..config import require_group
    from .checkpoint_files import prune_checkpoints

    require_group(pg_collection, "save_checkpoint", "pg_collection")  # before the directory is made
    save_dir = recipe.train.save_dir
    path = _step_dir(save_dir, step)
    partial_path = path + INCOMPLETE
    rank0 = dist.get_rank() == 0
    error = None
    if rank0:
        try:
            if os.path.isdir(partial_path):
                shutil.rmtree(partial_path)
            os.makedirs(partial_path)
        except OSError as e:
            error = e
    held = _HeldLog()
    if not _any_failed(error is not None):
        state = _sharded_state(model, optimizer, False, pg_collection)
        state["step"] = step
        try:
            with held:
                dist_checkpointing.save(state, partial_path)  # raises on every rank when a rank's write failed
        except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
            error = e
            _release_waiting_ranks(e)  # a coordinator-only write failed: the others wait for rank 0
        # every rank's shards are on disk, or the save failed on every rank
        if error is None and rank0:
            try:
                write_manifest(partial_path)
                if os.path.isdir(path):  # a complete step_N that never became `latest` (killed in between)
                    shutil.rmtree(path)
                os.rename(partial_path, path)
                _write_atomically(os.path.join(save_dir, CHECKPOINT_META),
                                  json.dumps(_checkpoint_identity(recipe), indent=1))
                _write_atomically(os.path.join(save_dir, "latest"), str(step))  # the commit point
            except OSError as e:
                error = e
    if _any_failed(error is not None):
        if held.records and verbose_requested(sys.argv):
            print(held.text(), file=sys.stderr, flush=True)
        texts = [None] * dist.get_world_size()
        dist.all_gather_object(texts, _save_failure(error, held.text()))
        why = next((f"rank {r}: {t}" for r, t in enumerate(texts) if t), "a write failed")
        previous = latest_step(save_dir)
        if rank0:  # free what the failed save took; `latest` (an atomic replace) was not moved
            for leftover in (partial_path, path):
                if os.path.isdir(leftover) and previous != step:
                    shutil.rmtree(leftover, ignore_errors=True)
            for name in ("latest.tmp", CHECKPOINT_META + ".tmp"):
                if os.path.exists(os.path.join(save_dir, name)):
                    os.unlink(os.path.join(save_dir, name))
        dist.barrier()  # every rank raises once the partial step is gone
        kept = (f"{os.path.join(save_dir, 'latest')} still names step {previous} ({_step_dir(save_dir, previous)}, "
                "untouched)" if previous is not None else "no earlier checkpoint is there")
        raise CheckpointSaveError(f"saving the checkpoint of step {step} in {save_dir} failed ({why}); the partial "
                                  f"{os.path.basename(partial_path)} was removed and {kept}; "
                                  f"{_free_space(save_dir)} free there: free space, then "
                                  f"resume with --resume {save_dir}") from error
    if rank0:
        prune_checkpoints(save_dir, recipe.train.keep_checkpoints)  # after `latest` names the new one
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


def _optimizer_classes(optimizer) -> list:
    """The classes an offloading optimizer's saved param groups name: megatron-core's
    HybridDeviceOptimizer keeps its sub-optimizers' classes (torch's AdamW on the host, megatron's
    Adam on the GPU) in its defaults, so they are pickled with the checkpoint's common state, which
    0.16.1 reads with torch.load's weights_only (refusing any class not allowed). Allowed: those
    megatron-core's offload can write (whether this run offloads or not: the offload may be switched
    at a resume) and this optimizer's own."""
    from megatron.core import optimizer as moptimizer
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    out = [torch.optim.AdamW, torch.optim.SGD]
    out += [c for c in (getattr(moptimizer, "Adam", None), getattr(moptimizer, "SGD", None))
            if isinstance(c, type) and c not in out]
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, HybridDeviceOptimizer):
            out += [c for c in (inner.defaults.get("cpu_optimizer_cls"), inner.defaults.get("gpu_optimizer_cls"))
                    if isinstance(c, type) and c not in out]
    return out


def _first_failure(error: BaseException) -> BaseException:
    """The first rank's own exception inside torch's CheckpointException (which gathers every
    rank's failure), or the error itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[sorted(failures)[0]]  # (exception, its stack summary)
        first = first[0] if isinstance(first, tuple) and first else first
        return first if isinstance(first, BaseException) else error
    return error


def _first_line(error: BaseException) -> str:
    """`Type: first line of the message` (EOFError: a file ends early)."""
    text = (str(error).strip().splitlines() or [""])[0][:300]
    if isinstance(error, EOFError) and not text:
        text = "a file ends early (truncated)"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_shape_error(error: BaseException) -> bool:
    text = str(error).lower()
    return any(w in text for w in ("shape", "size mismatch", "missing key", "unexpected key"))


def load_checkpoint(model, optimizer, recipe: Recipe, optimizer_format: str = DISTRIBUTED_OPTIMIZER_FORMAT, *,
                    pg_collection) -> int:
    """Load the latest checkpoint of save_dir into this run's model and optimizer, at whatever
    layout this run has (the checkpoint's keys are layout-free: global layer numbers, full
    tensors sliced per TP/TSP rank). Returns its step. `pg_collection`: the groups the model was
    built on (required)."""
    from megatron.core import dist_checkpointing

    from ..config import require_group

    require_group(pg_collection, "load_checkpoint", "pg_collection")
    _materialize_optimizer_state(optimizer)
    step = latest_step(recipe.train.save_dir)
    path = _step_dir(recipe.train.save_dir, step)
    state = _sharded_state(model, optimizer, True, pg_collection, optimizer_format=optimizer_format)
    state["step"] = step
    # What torch warns while a load fails (torch 2.13: "torch.distributed is disabled, unavailable
    # or uninitialized" from each rank's failing read) is part of that failure: held back, shown
    # again only when the load succeeds or with --verbose, so a corrupt checkpoint stays one line.
    with warnings.catch_warnings(record=True) as held, torch.serialization.safe_globals(_optimizer_classes(optimizer)):
        try:
            loaded = dist_checkpointing.load(state, path)
            failed = None
        except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
            failed = e
    if failed is None or verbose_requested(sys.argv):
        for w in held:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if failed is not None:
        e = failed
        cause = _first_failure(e)
        if isinstance(cause, (EOFError, OSError, RuntimeError, pickle.UnpicklingError)) and not _is_shape_error(cause):
            # Unreadable bytes (a checkpoint without a file list, or damaged at its sizes). Every rank
            # got the same CheckpointException (torch gathers the failures): each raises this.
            raise corrupt_checkpoint_error(recipe.train.save_dir, step, f"reading it failed with "
                                           f"{_first_line(cause)}") from e
        raise RecipeError(f"checkpoint {path!r} does not fit this model: {_first_line(cause)}") from e
    with torch.no_grad():  # float32 main params are views of the (grad-requiring) model params
        model.load_state_dict(loaded["model"])
        _load_optimizer_state(optimizer, loaded["optimizer"])
    return int(loaded["step"])


# -- the driver's resume, before and after the model is built -----------------------------------

def prepare_resume(recipe: Recipe, print_fn=print):
    """Before any group or model: the checkpoint this run continues (its metadata, checked against
    the recipe: `check_checkpoint_matches`), or None, and a note for the start line; refuses a
    train.save_dir that holds checkpoints when the recipe does not resume (never overwritten);
    removes what an interrupted save left (said with `print_fn`)."""
    t = recipe.train
    saved, note = None, ""
    if not t.save_dir:
        return saved, note
    resuming = t.resume or t.resume_if_present
    found = latest_step(t.save_dir)
    if resuming and found is not None:
        saved = check_checkpoint_matches(recipe, t.save_dir)
    elif resuming:  # check_resume let it through: train.resume_if_present
        note = f" (no checkpoint in {t.save_dir} yet: a fresh start, train.resume_if_present)"
    elif found is not None or os.path.isfile(os.path.join(t.save_dir, CHECKPOINT_META)):
        raise RecipeError(f"train.save_dir = {t.save_dir!r} already holds checkpoints: set train.resume=true "
                          "to continue them, or choose another directory (they are never overwritten)")
    for name in remove_incomplete_checkpoints(t.save_dir):
        print_fn(f"megatron-tsp train: removed {os.path.join(t.save_dir, name)}, an incomplete checkpoint "
                 "left by an interrupted run", flush=True)
    return saved, note


def resume(model, optimizer, recipe: Recipe, saved: dict, world_size: int, pg_collection):
    """Load `saved` (prepare_resume's) into the built model and optimizer: (the step it holds, the
    start line's note, naming the layout that wrote it when it is not this run's)."""
    start = load_checkpoint(model, optimizer, recipe, _saved_optimizer_format(saved), pg_collection=pg_collection)
    theirs = _layout_text(saved["parallel"], saved.get("world_size"))
    mine = _layout_text(recipe.to_dict()["parallel"], world_size)
    return start, f" (resumed from {recipe.train.save_dir}" + (f", written by {theirs}" if theirs != mine else "") + ")"
