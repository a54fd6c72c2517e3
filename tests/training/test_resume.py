"""Checkpoints move between layouts and resume exactly (CPU, gloo, float32, the tiny recipe).

A TSP D=2 run on 2 processes trains 3 steps and saves, with the plain and with the distributed
optimizer; copies of each checkpoint resume for 3 more steps at TP+SP 2 (2 processes), and at
TSP D=4, TSP D=2 x data 2 and pipeline 2 x TSP D=2 (4 processes). Every resumed run's losses
equal an uninterrupted D=2 run's (<= 1e-5 relative); at the saving layout the distributed
optimizer's resume is bit-exact. Two torchrun launches (tests/training/train_jobs.py) run all the
jobs, once for the whole suite (these are not `distributed` tests, which run per world)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["train.log_interval=100", "model.cpu_init=true"]
OPTIMIZERS = {"plain": "train.distributed_optimizer=false", "distributed": "train.distributed_optimizer=true"}
RESHARD = {  # name: (world, overrides)
    "tp_sp2": (2, ["parallel.layout=tp_sp", "parallel.size=2"]),
    "tsp4": (4, ["parallel.size=4"]),
    "dp2_tsp2": (4, ["parallel.size=2"]),
    "pp2_tsp2": (4, ["parallel.size=2", "parallel.pipeline_size=2"]),
}
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _torchrun(world, jobs, tmp_path, tag):
    jobs_path, results_path = tmp_path / f"{tag}_jobs.json", tmp_path / f"{tag}_results.json"
    jobs_path.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith(("TORCHELASTIC", "ROLE_"))}
    env.update(PYTHONPATH=REPO, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           os.path.join(REPO, "tests", "training", "train_jobs.py"), str(jobs_path), str(results_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0 and results_path.exists(), (proc.stdout + proc.stderr)[-4000:]
    return json.loads(results_path.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    saved = {opt: str(tmp / f"ckpt_{opt}") for opt in OPTIMIZERS}
    two = []
    for opt, flag in OPTIMIZERS.items():
        base = COMMON + [flag, "parallel.size=2"]
        two += [{"name": f"straight_{opt}", "overrides": base + ["train.steps=6"]},
                {"name": f"first3_{opt}", "overrides": base + ["train.steps=3", f"train.save_dir={saved[opt]}"]},
                {"name": f"same_{opt}", "overrides": base + ["train.steps=6"], "resume_copy_of": saved[opt]}]
    four = []
    for opt, flag in OPTIMIZERS.items():
        for name, (world, overrides) in RESHARD.items():
            job = {"name": f"{name}_{opt}", "overrides": COMMON + [flag, "train.steps=6"] + overrides,
                   "resume_copy_of": saved[opt]}
            (two if world == 2 else four).append(job)
    out = _torchrun(2, two, tmp, "world2")
    out.update(_torchrun(4, four, tmp, "world4"))
    return out


def _close(got, want, tol=1e-5):
    return len(got) == len(want) and all(abs(a - b) <= tol * abs(b) for a, b in zip(got, want))


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_resume_at_the_same_layout_is_bit_exact(results, opt):
    straight, first, resumed = results[f"straight_{opt}"], results[f"first3_{opt}"], results[f"same_{opt}"]
    assert isinstance(resumed, list), resumed
    assert first + resumed == straight, (first, resumed, straight)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("layout", RESHARD)
def test_resume_at_another_layout_continues_the_run(results, layout, opt):
    straight, resumed = results[f"straight_{opt}"], results[f"{layout}_{opt}"]
    assert isinstance(resumed, list), resumed
    assert _close(resumed, straight[3:]), (layout, opt, resumed, straight[3:])


def test_only_real_mismatches_are_refused_and_all_are_listed(tmp_path):
    from megatron_tsp.training.recipe import RecipeError, load_recipe
    from megatron_tsp.training.checkpoint import CHECKPOINT_META, _checkpoint_identity, check_checkpoint_matches

    written = _checkpoint_identity(load_recipe(None, ["parallel.size=2"]))
    written["world_size"] = 2
    (tmp_path / CHECKPOINT_META).write_text(json.dumps(written))
    # Another layout, world size, pipeline split or sequence length (RoPE): fine.
    for overrides in (["parallel.size=4"], ["parallel.layout=tp_sp"], ["parallel.layout=dp", "parallel.pipeline_size=2"],
                      ["model.seq_length=128"]):
        check_checkpoint_matches(load_recipe(None, overrides), str(tmp_path))
    with pytest.raises(RecipeError) as e:
        check_checkpoint_matches(load_recipe(None, ["model.vocab_size=256", "model.num_layers=4", "parallel.size=4",
                                                    "train.distributed_optimizer=true"]), str(tmp_path))
    lines = str(e.value).splitlines()
    assert "does not match this run (it is left untouched)" in lines[0]
    with pytest.raises(RecipeError, match=r"model.num_experts: checkpoint None, recipe 4\n.*model.moe_ffn_hidden_size"):
        check_checkpoint_matches(load_recipe(None, ["parallel.size=2", "model.num_experts=4", "model.moe_ffn_hidden_size=64"]),
                                 str(tmp_path))
    assert [line.strip().split(":")[0] for line in lines[1:]] == ["model.num_layers", "model.vocab_size",
                                                                   "train.distributed_optimizer"], lines
    # A distributed-optimizer checkpoint in the older per-rank format loads at its own layout only.
    written.update(distributed_optimizer=True, world_size=1)
    del written["optimizer_format"]
    (tmp_path / CHECKPOINT_META).write_text(json.dumps(written))
    check_checkpoint_matches(load_recipe(None, ["parallel.size=2", "train.distributed_optimizer=true"]), str(tmp_path))
    with pytest.raises(RecipeError, match=r"parallel.size: checkpoint 2, recipe 4 \(a dp_reshardable"):
        check_checkpoint_matches(load_recipe(None, ["parallel.size=4", "train.distributed_optimizer=true"]), str(tmp_path))
