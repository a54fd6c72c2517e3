"""What a resume meets on disk (megatron_tsp.training.checkpoint_files, torch-free): `--resume DIR`
of a missing or empty DIR is an error naming it, before any worker starts (never a silent start
at step 1); `--resume-if-present DIR` starts at step 1 there and says so; a corrupt latest
checkpoint (a truncated file) is one line naming the file and the last complete checkpoint, exit
2, no traceback (never a silent fallback)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from megatron_tsp import output
from megatron_tsp.training.checkpoint_files import MANIFEST, check_resume, step_dir, write_manifest
from megatron_tsp.training.recipe import RecipeError, TrainRecipe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID")


def _train(*args, nproc=2, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("TORCHELASTIC", "ROLE_", "PYTHONWARNINGS"))}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop(output.VERBOSE_ENV, None)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "megatron_tsp.cli", "train", "--nproc-per-node", str(nproc),
                          "parallel.size=2", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    res.seconds = time.time() - t0
    return res


def _one_error(res, *needles):
    """Exit 2, exactly one line on stderr (the error), naming every needle, no traceback."""
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-tsp train: error: "), res.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _fake_checkpoint(save_dir, step, files=None):
    path = step_dir(str(save_dir), step)
    os.makedirs(path)
    for name, size in (files or {"__0_0.distcp": 100, "common.pt": 10}).items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * size)
    write_manifest(path)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(str(step))
    return path


# -- the checks, torch-free ---------------------------------------------------------------------

def test_resume_of_a_missing_or_empty_dir_is_an_error(tmp_path):
    missing = str(tmp_path / "typo")
    with pytest.raises(RecipeError, match=rf"checkpoint directory '{missing}' does not exist.*--resume-if-present"):
        check_resume(TrainRecipe(save_dir=missing, resume=True))
    with pytest.raises(RecipeError, match=r"holds no checkpoint \(no 'latest' file\)"):
        check_resume(TrainRecipe(save_dir=str(tmp_path), resume=True))
    # the opt-in for requeued jobs: nothing there yet is a fresh start
    assert check_resume(TrainRecipe(save_dir=missing, resume_if_present=True)) is None
    assert check_resume(TrainRecipe(save_dir=str(tmp_path), resume=True, resume_if_present=True)) is None
    assert check_resume(TrainRecipe(save_dir=missing)) is None  # not resuming: nothing to check


def test_corrupt_latest_names_the_file_and_the_last_complete_one(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    assert check_resume(TrainRecipe(save_dir=str(tmp_path), resume=True)) == 2
    latest = _fake_checkpoint(tmp_path, 4)
    with open(os.path.join(latest, "__0_0.distcp"), "r+b") as f:
        f.truncate(7)
    for train in (TrainRecipe(save_dir=str(tmp_path), resume=True),
                  TrainRecipe(save_dir=str(tmp_path), resume_if_present=True)):  # never a silent fallback
        with pytest.raises(RecipeError) as e:
            check_resume(train)
        text = str(e.value)
        assert "\n" not in text
        assert f"{latest}/__0_0.distcp has 7 bytes, 100 were written" in text, text
        assert f"the last complete checkpoint is {step_dir(str(tmp_path), 2)};" in text, text
        assert f"write 2 into {tmp_path}/latest" in text, text
    os.unlink(os.path.join(latest, "__0_0.distcp"))
    shutil.rmtree(step_dir(str(tmp_path), 2))
    with pytest.raises(RecipeError, match=r"__0_0.distcp is missing; .*no earlier complete checkpoint"):
        check_resume(TrainRecipe(save_dir=str(tmp_path), resume=True))


def test_latest_naming_a_missing_step_or_garbage(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    with open(tmp_path / "latest", "w") as f:
        f.write("6")
    with pytest.raises(RecipeError, match=r"step_0000006 \(the latest, step 6\) is corrupt: .* does not exist; .*"
                                          r"the last complete checkpoint is .*step_0000002"):
        check_resume(TrainRecipe(save_dir=str(tmp_path), resume=True))
    with open(tmp_path / "latest", "w") as f:
        f.write("\x00\x00")
    with pytest.raises(RecipeError, match=r"latest should hold the step of the latest checkpoint"):
        check_resume(TrainRecipe(save_dir=str(tmp_path), resume=True))


def test_manifest_lists_every_file_but_itself(tmp_path):
    path = _fake_checkpoint(tmp_path, 3, {"a.distcp": 5, ".metadata": 2})
    assert json.load(open(os.path.join(path, MANIFEST)))["files"] == {"a.distcp": 5, ".metadata": 2}


# -- the command line: before any worker starts --------------------------------------------------

@pytest.mark.parametrize("make,needle", [
    (lambda d: str(d / "no_such_dir"), "does not exist"),
    (lambda d: str(d), "holds no checkpoint"),
])
def test_resume_without_a_checkpoint_fails_before_the_workers(tmp_path, make, needle):
    where = make(tmp_path)
    res = _train("train.steps=2", "--resume", where)
    _one_error(res, f"'{where}'", needle, "--resume-if-present")
    assert output.INFO_LINE not in res.stdout  # no worker started (they print it first)
    assert res.seconds < 10, res.seconds  # the launcher alone: well under a second unloaded
    assert not os.path.exists(os.path.join(where, "latest"))


@pytest.mark.slow
def test_corrupt_checkpoint_resume_if_present_and_overrides_after_resume(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    # --resume-if-present on nothing: a fresh start that says so; overrides may follow the option
    res = _train("--resume-if-present", ckpt, "train.steps=4", "train.save_interval=2", "train.progress_bar=false")
    assert res.returncode == 0, res.stderr
    assert f"steps 1..4 (no checkpoint in {ckpt} yet: a fresh start, train.resume_if_present)" in res.stdout
    pristine = str(tmp_path / "pristine")
    shutil.copytree(ckpt, pristine)

    # a truncated shard of the latest checkpoint: named, with the last complete one, before the workers
    with open(os.path.join(ckpt, "step_0000004", "__0_0.distcp"), "r+b") as f:
        f.truncate(1000)
    res = _train("--resume", ckpt, "train.steps=6", "train.progress_bar=false")
    _one_error(res, f"{ckpt}/step_0000004/__0_0.distcp has 1000 bytes", f"{ckpt}/step_0000002",
               f"write 2 into {ckpt}/latest")
    assert output.INFO_LINE not in res.stdout
    assert open(os.path.join(ckpt, "latest")).read() == "4"  # nothing changed
    # a checkpoint without a file list (written before them): the load's failure, one line from rank 0
    os.unlink(os.path.join(ckpt, "step_0000004", MANIFEST))
    res = _train("--resume", ckpt, "train.steps=6", "train.progress_bar=false")
    _one_error(res, f"checkpoint {ckpt}/step_0000004 (the latest, step 4) is corrupt: reading it failed with "
                    "EOFError", f"{ckpt}/step_0000002")

    # the intact copy resumes, overrides after --resume DIR included
    res = _train("--resume", pristine, "train.steps=5", "train.progress_bar=false")
    assert res.returncode == 0, res.stderr
    assert f"steps 5..5 (resumed from {pristine})" in res.stdout


# -- train.keep_checkpoints (torch-free) --------------------------------------------------------

def test_prune_keeps_the_newest_complete_ones_and_never_latest(tmp_path):
    from megatron_tsp.training.checkpoint_files import prune_checkpoints, step_dirs

    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    assert prune_checkpoints(str(tmp_path), 0) == [] and step_dirs(str(tmp_path)) == [2, 4, 6, 8]  # 0: keep all
    with open(os.path.join(step_dir(str(tmp_path), 6), "__0_0.distcp"), "r+b") as f:
        f.truncate(3)  # a corrupt one is neither counted nor removed
    removed = prune_checkpoints(str(tmp_path), 2)
    assert removed == [step_dir(str(tmp_path), 2)] and step_dirs(str(tmp_path)) == [4, 6, 8], removed
    # `latest` moved back to 4 by hand (resume from an earlier one): 8 is newer, not ours; 4 stays
    with open(tmp_path / "latest", "w") as f:
        f.write("4")
    assert prune_checkpoints(str(tmp_path), 1) == [] and step_dirs(str(tmp_path)) == [4, 6, 8]
    with pytest.raises(RecipeError, match=r"train.keep_checkpoints = -1 must be >= 0"):
        from megatron_tsp.training.recipe import Recipe

        Recipe(train=TrainRecipe(keep_checkpoints=-1)).check(1, devices=False)
