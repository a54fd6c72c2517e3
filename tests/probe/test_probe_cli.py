"""`megatron-tsp probe` as a user runs it: bad flags are one line naming the flag (exit 2, before
torch is imported); a tiny run prints the table, or one JSON object with --json."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe(*argv, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "megatron_tsp.cli", "probe", *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("argv, names", [
    (["--world", "3"], "--world 3 does not fit"),
    (["--world", "4", "--rank", "4"], "--rank 4"),
    (["--world", "4", "--warmup", "0"], "--warmup 0"),
    (["--world", "4", "--stage", "1"], "--stage 1 needs parallel.pipeline_size"),
    (["parallel.pipeline_size=2", "--world", "4", "--stage", "2"], "--stage 2"),
    (["--world", "2", "--gpu-memory-gb", "0"], "--gpu-memory-gb"),
    (["parallel.size=3", "--world", "3"], "parallel.size = 3"),
])
def test_bad_request_is_one_line_naming_it(argv, names):
    out = probe("configs/tiny.yaml", *argv)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("megatron-tsp probe: error:") and names in lines[0], out.stderr


def test_json_run():
    out = probe("configs/tiny.yaml", "parallel.layout=tp_sp", "parallel.size=2", "--world", "2", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["layout"] == "TP+SP 2" and result["measured"]["world"] == 2
    assert result["measured"]["peak_allocated_gib"] > result["measured"]["model_states_gib"] > 0
    assert result["predicted"]["peak_gib"] > 0 and 0.8 < result["ratio_peak"] < 1.25


def test_table_run():
    out = probe("configs/tiny.yaml", "parallel.size=2", "--world", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for what in ("rank 0 (pipeline stage 0) of 2", "TSP D=2", "peak allocated", "model states", "not measured"):
        assert what in text, text


def test_inference_run():
    out = probe("configs/tiny.yaml", "parallel.size=4", "--world", "4", "--inference", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    m, p = result["measured"], result["predicted"]
    assert m["inference"] and m["prompt_tokens"] == 62 and m["peak_allocated_gib"] > m["weights_gib"] > 0
    assert 0.8 < m["weights_gib"] / p["weights_gib"] < 1.25 and m["time_to_first_token_s"] > 0


def test_inference_refuses_a_baseline_layout():
    out = probe("configs/tiny.yaml", "parallel.layout=tp_sp", "parallel.size=2", "--world", "2", "--inference")
    assert out.returncode == 2 and "--inference measures TSP prefill" in out.stderr, out.stderr


def test_frontier_on_cpu(tmp_path):
    """--frontier end to end on the tiny model (the capacity checked after each CPU step; all probes in
    one process, as --in-process): the longest context fits, the next one tried does not, and a rerun
    reads the log instead of probing."""
    log = str(tmp_path / "probes.jsonl")
    argv = ["configs/tiny.yaml", "train.global_batch_size=2", "train.micro_batch_size=1", "model.num_layers=1",
            "--world", "2", "--frontier", "--layouts", "tsp", "--start-seq", "256", "--gpu-memory-gb", "0.004",
            "--max-seq", "16384", "--host-memory-gb", "0", "--out", log, "--json", "--in-process"]
    out = probe(*argv, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout)["layouts"][0]
    assert row["max_seq_len"] and row["first_miss"] and row["max_seq_len"] < row["first_miss"]
    assert row["at_max"]["measured"]["peak_allocated_gib"] <= 0.004
    assert {p["seq_len"]: p["measured"]["oom"] is None for p in row["probes"]}[row["first_miss"]] is False
    probed = len(open(log).readlines())
    again = probe(*argv, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout)["layouts"][0]["max_seq_len"] == row["max_seq_len"]
    assert len(open(log).readlines()) == probed  # nothing probed twice


def test_a_probe_in_a_child_process_measures_the_same():
    """--frontier's default runs each probe in a fresh process (probe.cli.measure_in_child): the same
    peak as in this one, and an over-capacity peak comes back as out of memory (exit 3), not a failure."""
    from megatron_tsp.probe.cli import measure_in_child

    over = ["parallel.size=2", "train.global_batch_size=2", "train.micro_batch_size=1"]
    child = measure_in_child("configs/tiny.yaml", over, 2, 1, None, None)
    again = measure_in_child("configs/tiny.yaml", over, 2, 1, None, child["peak_allocated_gib"] / 2)
    assert child["oom"] is None and child["peak_allocated_gib"] > child["model_states_gib"] > 0
    assert again["oom"] and "over the capacity" in again["oom"]
