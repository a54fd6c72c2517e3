"""The training driver: the tiny recipe trains, resume is exact, pipeline x TSP and tsp vs
tp_sp agree with their references, and bad recipes / data / world sizes are clear errors."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch.distributed as dist

from megatron_tsp.training.recipe import RecipeError, load_recipe
from megatron_tsp.training.loop import run

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DISTOPT = "false"
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def losses(result):
    return [h["loss"] for h in result["history"]]


def _shared_dir(tmp_root):
    path = [tempfile.mkdtemp(prefix="tsp_run_", dir=tmp_root) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def test_tiny_recipe_loss_falls(world):
    if world != 2:
        pytest.skip("the README's command runs on 2 processes")
    result = run(load_recipe(TINY, ["train.steps=12", "train.log_interval=100"]))
    ls = losses(result)
    assert len(ls) == 12 and ls[-1] < 0.8 * ls[0]
    assert result["summary"]["tokens_per_s_per_gpu"] > 0


def test_resume_is_exact(world, shared_tmp_path):
    if world != 2:
        pytest.skip("tsp at D = 2 on 2 processes")
    common = ["parallel.size=2", "train.log_interval=100", "train.save_interval=3", f"train.distributed_optimizer={DISTOPT}"]
    straight = losses(run(load_recipe(TINY, common + ["train.steps=6"])))
    ckpt = _shared_dir(shared_tmp_path)
    first = losses(run(load_recipe(TINY, common + ["train.steps=3", f"train.save_dir={ckpt}"])))
    resumed = run(load_recipe(TINY, common + ["train.steps=6", f"train.save_dir={ckpt}", "train.resume=true"]))
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    assert first + losses(resumed) == straight  # bit-for-bit

    # A run that does not match the checkpoint is refused, and the checkpoint is untouched.
    before = sorted(os.listdir(ckpt))
    with pytest.raises(RecipeError, match=r"does not match this run.*\n.*model.hidden_size: checkpoint 64, recipe 32"):
        run(load_recipe(TINY, common + ["train.steps=9", f"train.save_dir={ckpt}", "train.resume=true", "model.hidden_size=32"]))
    with pytest.raises(RecipeError, match=r"already holds checkpoints: set train.resume=true"):
        run(load_recipe(TINY, common + ["train.steps=9", f"train.save_dir={ckpt}"]))
    assert sorted(os.listdir(ckpt)) == before


def test_tsp_matches_tp_sp(world):
    base = ["train.steps=3", "train.log_interval=100", f"parallel.size={world}", "model.num_query_groups=2" if world == 2 else "model.num_query_groups=4",
            "model.num_attention_heads=8"]
    if world == 1:
        pytest.skip("needs 2 or more processes")
    tsp = losses(run(load_recipe(TINY, base + ["parallel.layout=tsp"])))
    tp_sp = losses(run(load_recipe(TINY, base + ["parallel.layout=tp_sp"])))
    for a, b in zip(tsp, tp_sp):
        assert abs(a - b) <= 1e-5 * abs(b), (tsp, tp_sp)


def _single_process_losses(overrides, recipe=TINY):
    """The recipe file `recipe` with `overrides` in a fresh single-process world (rank 0 runs it;
    every rank gets its losses per step)."""
    result = [None]
    if dist.get_rank() == 0:
        metrics = tempfile.mktemp(suffix=".jsonl")
        torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in torchrun_vars and not k.startswith(("TORCHELASTIC", "ROLE_", "GROUP_"))}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "megatron_tsp.training.loop", recipe, *overrides, f"train.metrics_file={metrics}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        result = [[json.loads(line)["loss"] for line in open(metrics)] if proc.returncode == 0 else proc.stderr[-3000:]]
    dist.broadcast_object_list(result, src=0)
    assert isinstance(result[0], list), result[0]
    return result[0]


def test_pipeline_x_tsp_matches_single_process(world):
    """Pipeline 2 x TSP 2 on 4 processes against one process with the same (layout-invariant)
    initial weights and data."""
    if world != 4:
        pytest.skip("pipeline 2 x TSP 2 needs 4 processes")
    common = ["train.steps=3", "train.log_interval=100", "model.num_layers=4", "train.micro_batch_size=1",
              "model.cpu_init=true"]
    ref = _single_process_losses(common + ["parallel.layout=dp", "parallel.size=1"])
    got = losses(run(load_recipe(TINY, common + ["parallel.size=2", "parallel.pipeline_size=2"])))
    assert len(got) == 3 and got[-1] < got[0]
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (got, ref)


def test_bad_runs_are_clear_errors(world, shared_tmp_path):
    with pytest.raises(RecipeError, match=r"data.path = '/nonexistent/corpus': missing /nonexistent/corpus.bin, /nonexistent/corpus.idx"):
        run(load_recipe(TINY, ["data.path=/nonexistent/corpus", f"parallel.size={world}"]))
    size = 2 * world  # a layout that needs more processes than there are
    with pytest.raises(RecipeError, match=r"world size %d does not fit the layout: parallel.size \(%d\)" % (world, size)):
        run(load_recipe(TINY, [f"parallel.size={size}", "model.num_attention_heads=16", "model.ffn_hidden_size=256",
                               "model.seq_length=64"]))
