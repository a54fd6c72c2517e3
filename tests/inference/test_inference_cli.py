"""`megatron-tsp generate` on a checkpoint the tiny recipe writes (CPU, world of one in-process;
the torchrun job at TSP size 2 is slow-marked)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from megatron_tsp.config import TSPConfigError
from megatron_tsp.inference import cli
from megatron_tsp.training.loop import init_groups
from megatron_tsp.training.recipe import RecipeError, load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
PROMPTS = [[5, 9, 14, 3, 7, 21, 2], [100, 4, 77]]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Two training steps of the tiny recipe at TSP size 1, saved."""
    from megatron_tsp.training.loop import run

    save = str(tmp_path_factory.mktemp("gen_ckpt"))
    run(load_recipe(TINY, ["parallel.size=1", "train.steps=2", f"train.save_dir={save}", "train.progress_bar=false",
                           "train.log_interval=100"]))
    prompts = tmp_path_factory.mktemp("gen_prompts") / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return save, str(prompts)


def _args(*argv):
    return cli.parser().parse_args([TINY, *argv])


def test_generate_loads_the_checkpoint_and_continues_greedily(checkpoint):
    save, prompts = checkpoint
    result = cli.run(_args("--load", save, "--prompt-tokens", prompts, "--max-new-tokens", "4"))
    tokens = [r["tokens"] for r in result["records"]]
    assert [len(t) for t in tokens] == [4, 4] and all(r["finish_reason"] == "length" for r in result["records"])
    s = result["summary"]
    assert s["prompt_tokens"] == 10 and s["new_tokens"] == 8 and s["time_to_first_token_s"] > 0
    assert s["decode_tokens_per_s"] > 0 and ("peak_host_rss_gb" in s or "peak_mem_gb_per_gpu" in s)

    # the loaded weights are the checkpoint's (not the seed's), and greedy = recomputing the whole sequence
    recipe = load_recipe(TINY, ["parallel.size=1"])
    pgs = init_groups(recipe)
    model, fresh = cli.build_and_load(recipe, save, pgs), cli.build_and_load(recipe, None, pgs)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    for prompt, got in zip(PROMPTS, tokens):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(4):
                n = len(seq)
                n_pad = -(-n // 2) * 2  # TSPGPTModel takes multiples of 2D; right padding is causal-safe
                ids = torch.tensor([seq + [0] * (n_pad - n)])
                logits = model(ids, torch.arange(n_pad).unsqueeze(0), None)
                seq.append(int(logits[0, n - 1].argmax()))
        assert got == seq[len(prompt):]

    lp = cli.run(_args("--load", save, "--prompt-tokens", prompts, "--logprobs", "--continuation-tokens", prompts))
    assert [r["continuation_tokens"] for r in lp["records"]] == [7, 3]
    assert all(v <= 0 for r in lp["records"] for v in r["logprobs"])


def test_a_checkpoint_of_another_shape_is_one_clear_error(checkpoint, tmp_path):
    save, prompts = checkpoint
    with pytest.raises(RecipeError, match="model.hidden_size: checkpoint 64, recipe 32"):
        cli.run(_args("model.hidden_size=32", "--load", save, "--prompt-tokens", prompts))
    with pytest.raises(RecipeError, match="no checkpoint there"):
        cli.run(_args("--load", str(tmp_path), "--prompt-tokens", prompts))
    bad = tmp_path / "bad.json"
    bad.write_text('[[1, 2], "x"]')
    with pytest.raises(RecipeError, match="--prompt-tokens"):
        cli.run(_args("--load", save, "--prompt-tokens", str(bad)))
    with pytest.raises(RecipeError, match="needs --tokenizer"):
        cli.run(_args("--load", save, "--prompt", "hello"))
    big = tmp_path / "big.json"
    big.write_text(json.dumps([[1, 200]]))
    with pytest.raises(TSPConfigError, match="out of the vocabulary"):
        cli.run(_args("--load", save, "--prompt-tokens", str(big)))


def _generate(*argv):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "megatron_tsp.cli", "generate", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    proc.seconds = time.time() - t0
    return proc


def _one_error(proc, needle):
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("megatron-tsp generate: error: ") and needle in lines[0], lines


def test_generate_launcher_checks_prompts_and_load_before_any_worker(checkpoint, tmp_path):
    """--nproc-per-node N: bad prompts and a --load without a checkpoint are one line from the
    launcher, torch-free (no worker starts, nothing loads)."""
    save, prompts = checkpoint
    big = tmp_path / "big.json"
    big.write_text(json.dumps([[1, 200]]))
    long = tmp_path / "long.json"
    long.write_text(json.dumps([list(range(60))]))
    for argv, needle in (
        (["--prompt-tokens", str(big)], "prompt 0 has token ids out of the vocabulary [0, 128): [200]"),
        (["--prompt-tokens", str(long), "--max-new-tokens", "5"], "prompt 0 has 60 tokens + 5 new tokens"),
        (["--prompt-tokens", prompts, "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["--prompt-tokens", str(tmp_path / "nope.json")], "--prompt-tokens"),
        (["--load", str(tmp_path)], "no checkpoint there"),
        (["--prompt", "hi"], "--prompt TEXT needs --tokenizer"),
    ):
        if "--load" not in argv:
            argv = argv + ["--load", save]
        if "--prompt-tokens" not in argv and "--prompt" not in argv:
            argv = argv + ["--prompt-tokens", prompts]
        proc = _generate("--nproc-per-node", "2", TINY, *argv)
        _one_error(proc, needle)
        assert proc.seconds < 10, proc.seconds  # the launcher alone (~0.2 s unloaded): no worker, no torch


@pytest.mark.slow
def test_generate_at_tsp_size_2_matches_size_1(checkpoint, tmp_path):
    """The console command with --nproc-per-node 2 (its own launcher, as train) on the size-1
    checkpoint; an error only the workers find (the checkpoint's shape) is printed once."""
    save, prompts = checkpoint
    one = cli.run(_args("--load", save, "--prompt-tokens", prompts, "--max-new-tokens", "5"))
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    proc = _generate("--nproc-per-node", "2", TINY, "--load", save, "--prompt-tokens", prompts, "--max-new-tokens",
                     "5", "--output", str(out), "--summary-json", str(summary))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
    assert got == [r["tokens"] for r in one["records"]]
    assert json.loads(summary.read_text())["tsp_size"] == 2
    assert "summary: tsp_size 2" in proc.stderr
    proc = _generate("--nproc-per-node", "2", TINY, "model.hidden_size=32", "--load", save, "--prompt-tokens", prompts)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    assert "model.hidden_size: checkpoint 64, recipe 32" in proc.stderr, proc.stderr[-3000:]


def test_inference_d1_benchmark_smoke():
    """benchmarks/inference_d1.py (what scripts/gpu_inference_d1.sh runs on one H200) on CPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("inference_d1", os.path.join(REPO, "benchmarks", "inference_d1.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_seq("128K") == 131072 and bench.parse_seq("1M") == 1 << 20
    rows = bench.main(["--smoke", "--layers", "1", "--new", "3"])
    assert [r["S"] for r in rows] == [64, 96] and all(r["status"] == "ok" for r in rows)
    assert all(len(r["tokens"]) == 3 and r["time_to_first_token_s"] > 0 for r in rows)
