"""Megatron-LM's pretrain_gpt.py end to end on the CPU (gloo, 2 processes, tiny recipe, mock data):
TSP D=2 through megatron_tsp.run, Megatron's TP=2 + sequence parallelism, and TSP through the
patched script give the same losses; the patch script refuses what it must. Needs a Megatron-LM
tree at core_v0.16.1 in MEGATRON_LM_DIR (e.g. `bash scripts/prune_megatron_lm.sh <checkout>`
makes .megatron-lm); about 3-4 minutes on 2 cores."""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLM = os.environ.get("MEGATRON_LM_DIR")
pytestmark = pytest.mark.skipif(
    not (MLM and os.path.isfile(os.path.join(MLM, "pretrain_gpt.py"))),
    reason="set MEGATRON_LM_DIR to a Megatron-LM tree at core_v0.16.1 (scripts/prune_megatron_lm.sh) to run pretrain_gpt.py on CPU",
)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])), PYTHONWARNINGS="ignore")


def _apply(tree):
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "apply_patches.sh"), str(tree)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    tree = tmp_path_factory.mktemp("mlm") / "patched"
    shutil.copytree(MLM, tree, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    result = _apply(tree)
    assert result.returncode == 0, result.stderr
    return tree


def test_apply_patches_refuses_a_patched_tree_and_other_files(patched, tmp_path):
    again = _apply(patched)
    assert again.returncode == 2 and "already patched" in again.stderr
    changed = tmp_path / "changed"
    shutil.copytree(MLM, changed, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    with open(changed / "pretrain_gpt.py", "a") as f:
        f.write("# local change\n")
    refused = _apply(changed)
    assert refused.returncode == 2 and "pretrain_gpt.py differs from Megatron-LM core_v0.16.1" in refused.stderr
    other = tmp_path / "other_commit"
    shutil.copytree(MLM, other, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    git = ["git", "-C", str(other), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "not the pinned commit"], check=True)
    refused = _apply(other)
    assert refused.returncode == 2 and "the patches are for Megatron-LM core_v0.16.1" in refused.stderr
    assert open(other / "pretrain_gpt.py").read() == open(os.path.join(MLM, "pretrain_gpt.py")).read()


def test_conflicting_flags_stop_pretrain_gpt_with_one_error():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "megatron_lm", "cpu_launcher.py"), os.path.join(MLM, "pretrain_gpt.py"),
         "--tsp-recipe", os.path.join(REPO, "configs", "megatron_lm", "tiny.yaml"), "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pretrain_gpt.py: error: --tensor-model-parallel-size = 2 cannot be combined with --tsp-size" in result.stderr


def test_tsp_matches_tp_sp_and_the_patched_script(patched, tmp_path):
    out = tmp_path / "compare"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "compare_tsp_vs_tpsp.py"), "--cpu", "--megatron-lm", MLM,
         "--recipe", os.path.join(REPO, "configs", "megatron_lm", "tiny.yaml"), "--iters", "4",
         "--runs", "tsp,tp_sp,patched", "--patched-dir", str(patched), "--out", str(out), "--tolerance", "1e-5",
         "--timeout", "400"],
        capture_output=True, text=True, env=ENV, timeout=1300)
    report = json.load(open(out / "compare.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    runs = report["runs"]
    assert runs["tsp"]["tsp_size"] == "2" and runs["tsp"]["tensor_model_parallel_size"] == "2"
    assert runs["tp_sp"]["tsp_size"] == "1" and runs["tp_sp"]["sequence_parallel"] == "True"
    assert "building TSP GPT model (--tsp-size 2)" in open(out / "tsp.log").read()
    assert "building TSP GPT model (--tsp-size 2)" in open(out / "patched.log").read()
    assert "building GPT model with --tsp-native-spec sdpa" in open(out / "tp_sp.log").read()
    for comparison in report["comparisons"]:
        assert comparison["ok"] and comparison["iterations_compared"] == 4, comparison
    losses = runs["tsp"]["losses"]
    assert losses["4"] < losses["1"], "the tiny model learns"
