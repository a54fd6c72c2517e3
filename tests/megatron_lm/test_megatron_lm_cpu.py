"""Megatron-LM's pretrain_gpt.py end to end on the CPU (gloo, 2 processes, tiny recipe, mock data):
TSP D=2 through megatron_tsp.megatron_lm.run, Megatron's TP=2 + sequence parallelism, and TSP through the
patched script give the same losses; packed documents (--reset-attention-mask) under TSP D=2 give
the losses of Megatron's own masked attention; the runner refuses a run whose built model is not
TSP's; the patch script refuses what it must. Needs MEGATRON_LM_DIR: a Megatron-LM tree at one of the
supported tags (core_v0.16.1, core_v0.17.1, core_v0.18.2, core_v0.19.0; recognised by its files'
hashes, patches/<tag>/pinned.sha256), run with the Python whose megatron-core goes with it
(docs/megatron_lm.md lists the pairs); about 5-10 minutes on 2 cores."""

import hashlib
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
    reason="set MEGATRON_LM_DIR to a Megatron-LM tree at a supported tag (docs/megatron_lm.md) to run pretrain_gpt.py on CPU",
)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           PYTHONWARNINGS="ignore")
TINY = os.path.join(REPO, "configs", "megatron_lm", "tiny.yaml")
LAUNCHER = os.path.join(REPO, "tests", "megatron_lm", "cpu_launcher.py")


def _tag(tree) -> str:
    """The supported tag whose pinned files `tree` holds unchanged."""
    for tag in sorted(os.listdir(os.path.join(REPO, "patches"))):
        pinned = os.path.join(REPO, "patches", tag, "pinned.sha256")
        if not os.path.isfile(pinned):
            continue
        entries = [line.split() for line in open(pinned) if line.strip()]
        if all(os.path.isfile(os.path.join(tree, name)) and
               hashlib.sha256(open(os.path.join(tree, name), "rb").read()).hexdigest() == digest
               for digest, name in entries):
            return tag
    pytest.fail(f"MEGATRON_LM_DIR={tree} is at no supported Megatron-LM tag (patches/*/pinned.sha256)")


def _apply(tree):
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "apply_patches.sh"), str(tree)],
                          capture_output=True, text=True)


def _copy(tree):
    shutil.copytree(MLM, tree, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    return tree


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    tree = _copy(tmp_path_factory.mktemp("mlm") / "patched")
    result = _apply(tree)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"applied {_tag(MLM)}/0001-pretrain_gpt-tsp-size.patch"
    return tree


def test_apply_patches_refuses_a_patched_tree_and_other_files(patched, tmp_path):
    tag = _tag(MLM)
    again = _apply(patched)
    assert again.returncode == 2 and "already patched" in again.stderr
    changed = _copy(tmp_path / "changed")
    with open(changed / "pretrain_gpt.py", "a") as f:
        f.write("# local change\n")
    refused = _apply(changed)
    assert refused.returncode == 2, refused.stderr
    assert f"matches no supported Megatron-LM tag (pretrain_gpt.py differs from {tag}, the closest" in refused.stderr
    assert refused.stderr.count("\n") == 1
    other = _copy(tmp_path / "other_commit")
    git = ["git", "-C", str(other), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "not a supported tag"], check=True)
    refused = _apply(other)
    assert refused.returncode == 2 and "not a supported Megatron-LM tag: core_v0.16.1 (55ac7082)" in refused.stderr
    assert open(other / "pretrain_gpt.py").read() == open(os.path.join(MLM, "pretrain_gpt.py")).read()


def test_conflicting_flags_stop_pretrain_gpt_with_one_error():
    result = subprocess.run(
        [sys.executable, LAUNCHER, os.path.join(MLM, "pretrain_gpt.py"), "--tsp-recipe", TINY,
         "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pretrain_gpt.py: error: --tensor-model-parallel-size = 2 cannot be combined with --tsp-size" in result.stderr


def test_runner_refuses_a_model_that_is_not_tsp(tmp_path):
    """The launcher's --native-model makes the builder build Megatron's native GPTModel (TP=2 +
    SP, which trains) under --tsp-size 2, as a pretrain_gpt.py whose model path bypasses the TSP
    builder would: every rank stops with the runner's error before the first iteration."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", LAUNCHER,
         "--native-model", os.path.join(MLM, "pretrain_gpt.py"), "--tsp-recipe", TINY, "--train-iters", "2",
         "--distributed-backend", "gloo"],
        capture_output=True, text=True, env=ENV, timeout=1500)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    error = ("megatron_tsp.megatron_lm.run: error: --tsp-size 2 asks for megatron_tsp's TSPGPTModel with TSP attention, "
             "but this pretrain_gpt.py built GPTModel (attention SelfAttention)")
    assert out.count(error) == 2, out[-3000:]  # one line on each rank
    assert "building GPT model with --tsp-native-spec sp_norm" in out and " iteration " not in out


def test_tsp_matches_tp_sp_and_the_patched_script(patched, tmp_path):
    out = tmp_path / "compare"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "compare_tsp_vs_tpsp.py"), "--cpu", "--megatron-lm", MLM,
         "--recipe", TINY, "--iters", "4", "--runs", "tsp,tp_sp,patched", "--patched-dir", str(patched),
         "--out", str(out), "--tolerance", "1e-5", "--timeout", "1500"],
        capture_output=True, text=True, env=ENV, timeout=4600)
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


MOE_FLAGS = ["--num-experts", "4", "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
             "--moe-ffn-hidden-size", "64", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01",
             "--moe-shared-expert-intermediate-size", "64"]


def test_tsp_moe_trains(tmp_path):
    """`pretrain_gpt.py --tsp-size 2 --num-experts 4 --expert-model-parallel-size 2` (EP = D: the
    expert group is the TSP group; alltoall dispatcher, top-2, aux loss, a shared expert) builds
    the TSP model with Megatron's MoELayer, logs the aux loss, and its loss falls."""
    out = tmp_path / "moe"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "compare_tsp_vs_tpsp.py"), "--cpu", "--megatron-lm", MLM,
         "--recipe", TINY, "--iters", "4", "--runs", "tsp", "--out", str(out), "--timeout", "1500", "--"] + MOE_FLAGS,
        capture_output=True, text=True, env=ENV, timeout=1600)
    assert result.returncode == 0, result.stdout + result.stderr
    log = open(out / "tsp.log").read()
    assert "building TSP GPT model (--tsp-size 2)" in log
    assert "load_balancing_loss" in log, "the MoE layers ran (Megatron logs their aux loss)"
    run = json.load(open(out / "compare.json"))["runs"]["tsp"]
    import re

    for name, value in (("expert_model_parallel_size", "2"), ("expert_tensor_parallel_size", "1"),
                        ("tensor_model_parallel_size", "2"), ("moe_token_dispatcher_type", "alltoall")):
        assert re.search(rf"^\s*{name} \.+ {value}\s*$", log, re.M), f"{name} is not {value} in the arguments"
    losses = run["losses"]
    assert sorted(losses, key=int) == ["1", "2", "3", "4"] and losses["4"] < losses["1"], losses


PACKED_FLAGS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]


def _packed_run(out, runs, recipe, spec="sp_norm", broken=False, patched=None):
    """compare_tsp_vs_tpsp.py on the packed recipe (TP + SP on --tsp-native-spec `spec`), Megatron's
    mock documents 1..23 tokens long (about five EODs in each 64-token sequence)."""
    env = dict(ENV, TSP_TEST_MOCK_DOCUMENT_MAX_LENGTH="24", TSP_TEST_BROKEN_DOCUMENTS="1" if broken else "0")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "compare_tsp_vs_tpsp.py"), "--cpu", "--megatron-lm", MLM,
         "--recipe", str(recipe), "--iters", "4", "--runs", runs, "--out", str(out), "--tolerance", "1e-5",
         "--timeout", "1500"] + (["--patched-dir", str(patched)] if patched else [])
        + ["--"] + PACKED_FLAGS + ["--tsp-native-spec", spec],
        capture_output=True, text=True, env=env, timeout=4600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.load(open(out / "compare.json"))


def test_packed_documents_match_megatrons_own_mask(patched, tmp_path):
    """`--reset-attention-mask --reset-position-ids --eod-mask-loss` (issue 27): TSP D=2, whose model
    reads the document ids from the EOD tokens (no S x S mask: the runner turns the dataset's off),
    through the runner and the patched script, against TP=2 + SP on Megatron's own local attention
    applying the [b, 1, S, S] mask its dataset builds (`--tsp-native-spec sp_norm`, the mask created
    in the dataloader), and TP=2 + SP on SDPA (`--tsp-native-spec sdpa`, document ids from the EOD
    tokens as TSP's): the same losses. The conversion made off by one (cpu_launcher.py's
    TSP_TEST_BROKEN_DOCUMENTS) is caught."""
    import re

    recipe = tmp_path / "tiny_packed.yaml"
    with open(TINY) as f:  # tiny.yaml with the dataset's mask (the TP + SP run's reference)
        recipe.write_text("".join(line for line in f if "--no-create-attention-mask-in-dataloader" not in line))
    report = _packed_run(tmp_path / "packed", "tsp,tp_sp,patched", recipe, patched=patched)
    logs = {run: open(tmp_path / "packed" / f"{run}.log").read() for run in ("tsp", "tp_sp", "patched")}
    # the null tokenizer's EOD: 127 (core_v0.19.0), 128 (core_v0.16.1's, one past --vocab-size)
    for run in ("tsp", "patched"):
        assert re.search(r"--reset-attention-mask: document ids from the EOD tokens \(id 12[78]\), no S x S mask",
                         logs[run])
    assert "building GPT model with --tsp-native-spec sp_norm" in logs["tp_sp"]
    for run, mask in (("tsp", "False"), ("patched", "False"), ("tp_sp", "True")):
        for name, value in (("reset_attention_mask", "True"), ("reset_position_ids", "True"), ("eod_mask_loss", "True"),
                            ("create_attention_mask_in_dataloader", mask)):
            assert re.search(rf"^\s*{name} \.+ {value}\s*$", logs[run], re.M), f"{run}: {name} is not {value}"
    assert len(report["comparisons"]) == 2  # tsp vs tp_sp, patched vs tsp
    for comparison in report["comparisons"]:
        assert comparison["ok"] and comparison["iterations_compared"] == 4, comparison
    ref = report["runs"]["tp_sp"]["losses"]
    sdpa = _packed_run(tmp_path / "sdpa", "tp_sp", recipe, spec="sdpa")["runs"]["tp_sp"]["losses"]
    assert "SDPA's S x S mask" in open(tmp_path / "sdpa" / "tp_sp.log").read()
    assert sorted(sdpa) == sorted(ref) and max(abs(sdpa[k] - ref[k]) for k in ref) <= 1e-5, (sdpa, ref)
    broken = _packed_run(tmp_path / "broken", "tsp", recipe, broken=True)
    assert "document ids off by one" in open(tmp_path / "broken" / "tsp.log").read()
    off = broken["runs"]["tsp"]["losses"]
    assert sorted(off) == sorted(ref) and max(abs(off[k] - ref[k]) for k in ref) > 1e-3, (off, ref)
