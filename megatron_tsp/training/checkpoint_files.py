"""What a checkpoint directory holds, read without torch: the launcher checks `--resume DIR`
before any worker starts, and every worker checks it again before its first collective.

    save_dir/step_NNNNNNN/                 one checkpoint (Megatron's distributed checkpoint format)
    save_dir/step_NNNNNNN/megatron_tsp_files.json   its files and their sizes, written last
    save_dir/latest                        the step of the newest complete one
    save_dir/megatron_tsp_run.json         the model, layout and optimizer format that wrote it

A step directory's file list (MANIFEST) is written once every rank's shards are on disk, before
the directory is renamed from step_NNNNNNN.incomplete: a file that is missing or whose size
differs from the list (a truncated copy, a disk that filled up, a sync that stopped) marks the
checkpoint corrupt. A resume of a corrupt latest checkpoint is an error naming the file and the
last complete earlier checkpoint; megatron-tsp never falls back to it silently.

train.keep_checkpoints = K (0: all) keeps the K newest complete checkpoints: once a save is
complete and `latest` names it, older complete step directories beyond K are removed
(`prune_checkpoints`); the one `latest` names, newer ones and corrupt ones are never touched.
"""

from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Tuple

from .recipe import RecipeError, TrainRecipe

CHECKPOINT_META = "megatron_tsp_run.json"
MANIFEST = "megatron_tsp_files.json"
INCOMPLETE = ".incomplete"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step_{step:07d}")


def latest_step(save_dir: Optional[str]) -> Optional[int]:
    """The step in save_dir/latest, None without one; an unreadable `latest` is a RecipeError."""
    path = os.path.join(save_dir, "latest") if save_dir else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise RecipeError(f"{path} should hold the step of the latest checkpoint, holds {text[:40]!r}: "
                          f"corrupt; write the step of a complete step_NNNNNNN directory into it")
    return int(text)


def write_manifest(path: str) -> None:
    """List the files of the checkpoint directory `path` with their sizes (after every shard is written)."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            if name == MANIFEST:
                continue
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the checkpoint directory `path` cannot be loaded, from its file list; None when every
    listed file is there at its size (or the checkpoint predates file lists: not checked)."""
    if not os.path.isdir(path):
        return f"{path} does not exist"
    listing = os.path.join(path, MANIFEST)
    if not os.path.isfile(listing):
        return None
    try:
        with open(listing) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its file list {listing} is unreadable"
    for name, size in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{full} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{full} has {actual} bytes, {size} were written (truncated or overwritten)"
    return None


def step_dirs(save_dir: str) -> List[int]:
    """The steps of save_dir's step_NNNNNNN directories (not the *.incomplete ones), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(save_dir))
                  if m and os.path.isdir(os.path.join(save_dir, m.group(0))))


def earlier_complete(save_dir: str, before: int) -> Optional[Tuple[int, bool]]:
    """(step, verified) of the newest checkpoint before step `before` that looks complete
    (verified: it has a file list and matches it), or None."""
    for step in reversed([s for s in step_dirs(save_dir) if s < before]):
        path = step_dir(save_dir, step)
        if checkpoint_problem(path) is None:
            return step, os.path.isfile(os.path.join(path, MANIFEST))
    return None


def corrupt_checkpoint_error(save_dir: str, step: int, problem: str) -> RecipeError:
    """The one line that says the checkpoint of `step` is corrupt, and which earlier one is complete."""
    path = step_dir(save_dir, step)
    earlier = earlier_complete(save_dir, step)
    if earlier is None:
        fix = "no earlier complete checkpoint is in the directory: restore it from a copy or start afresh elsewhere"
    else:
        ok, verified = earlier
        fix = (f"the last complete checkpoint is {step_dir(save_dir, ok)}" + ("" if verified else " (not verified: it "
               "predates file lists)") + f"; to resume from it, write {ok} into {os.path.join(save_dir, 'latest')} "
               f"(and move {os.path.basename(path)} aside)")
    return RecipeError(f"checkpoint {path} (the latest, step {step}) is corrupt: {problem}; nothing was loaded or "
                       f"changed; {fix}")


def check_resume(train: TrainRecipe) -> Optional[int]:
    """The step a run of `train` resumes from (None: it starts at step 1), torch-free, before any
    collective. train.resume with a save_dir that is missing or holds no checkpoint, a `latest`
    naming a missing step, or a latest checkpoint that fails its file list: a RecipeError."""
    if not (train.resume or train.resume_if_present) or not train.save_dir:
        return None
    save_dir = train.save_dir
    key = "--resume / train.resume" if not train.resume_if_present else "train.resume_if_present"
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise RecipeError(f"{key}: {save_dir!r} is not a directory")
    step = latest_step(save_dir) if os.path.isdir(save_dir) else None
    if step is None:
        if train.resume_if_present:
            return None
        what = "does not exist" if not os.path.isdir(save_dir) else "holds no checkpoint (no 'latest' file)"
        raise RecipeError(f"{key}: checkpoint directory {save_dir!r} {what}; check the path, or use "
                          "--resume-if-present DIR (train.resume_if_present=true) to start at step 1 when there "
                          "is none yet (jobs a scheduler requeues)")
    problem = checkpoint_problem(step_dir(save_dir, step))
    if problem is not None:
        raise corrupt_checkpoint_error(save_dir, step, problem)
    return step


def prune_checkpoints(save_dir: str, keep: int) -> List[str]:
    """Remove the complete checkpoints older than the `keep` newest complete ones up to the one
    `latest` names (call after `latest` moved to a complete one; keep = 0: remove nothing).
    Never the one `latest` names, never a newer one (not ours to judge), never a corrupt one
    (kept for inspection; it does not count). Returns the removed directories."""
    import shutil

    latest = latest_step(save_dir)
    if keep <= 0 or latest is None:
        return []
    kept, removed = 0, []
    for step in reversed([s for s in step_dirs(save_dir) if s <= latest]):
        path = step_dir(save_dir, step)
        if checkpoint_problem(path) is not None:
            continue
        kept += 1
        if kept > keep and step != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed
