"""A running 2-process tiny job (torchrun, CPU, float32) stopped by SIGTERM, as SLURM stops a
job's tasks before a kill or preemption: once while it saves a checkpoint and once mid-step.
Each time it exits 0 within 30 s with one line saying where it saved, the checkpoint is
complete and `latest`, nothing partial is left; a leftover partial checkpoint is removed at
the next start with one line; and the pieces resume into the losses of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
STEPS = 12
COMMON = ["train.log_interval=1", f"train.steps={STEPS}", "model.dtype=float32", "train.progress_bar=false"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds torchrun's workers through /proc")]


def _launch(overrides, log):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith(("TORCHELASTIC", "ROLE_"))}
    env.update(PYTHONPATH=REPO, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "megatron_tsp.training.loop", TINY, *COMMON, *overrides],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _workers(launcher_pid):
    found = []
    for name in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{name}/stat").read() if name.isdigit() else ""
            cmdline = open(f"/proc/{name}/cmdline").read() if stat else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid and "megatron_tsp.training.loop" in cmdline:
            found.append(int(name))
    return found


def _wait_for(condition, proc, timeout=600, what=""):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _steps_done(metrics):
    return [json.loads(line)["step"] for line in open(metrics)] if os.path.exists(metrics) else []


def _sigterm_workers(proc, log):
    """SIGTERM to both workers (what srun / scancel deliver to every task); returns the log."""
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    sent = time.monotonic()
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    rc = proc.wait(timeout=180)  # the assertion below wants 30 s; more only to report how long
    took = time.monotonic() - sent
    text = open(log).read()
    assert rc == 0 and took < 30, (rc, took, text[-3000:])
    stop_lines = [line for line in text.splitlines() if "stopped by" in line]
    assert len(stop_lines) == 1 and "stopped by SIGTERM after step" in stop_lines[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return stop_lines[0]


def _checkpoint_is_latest_and_alone(ckpt, line):
    step = int(open(os.path.join(ckpt, "latest")).read())
    assert f"after step {step}: " in line and os.path.join(ckpt, f"step_{step:07d}") in line, line
    assert os.path.isfile(os.path.join(ckpt, f"step_{step:07d}", "metadata.json"))
    assert not [n for n in os.listdir(ckpt) if n.endswith(".incomplete")], os.listdir(ckpt)
    return step


def test_sigterm_during_a_save_and_mid_step_then_resume(tmp_path):
    ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")

    # 1. Stopped while it writes the checkpoint of step 2 or a later one (every step saves).
    log = str(tmp_path / "run1.log")
    proc = _launch([f"train.save_dir={ckpt}", "train.save_interval=1", f"train.metrics_file={metrics}"], log)
    _wait_for(lambda: os.path.isfile(os.path.join(ckpt, "latest")), proc, what="the first checkpoint")
    _wait_for(lambda: any(n.endswith(".incomplete") for n in os.listdir(ckpt)), proc, what="a save in progress")
    first = _checkpoint_is_latest_and_alone(ckpt, _sigterm_workers(proc, log))
    assert 2 <= first < STEPS and _steps_done(metrics) == list(range(1, first + 1))

    # 2. Resumed, no periodic saves, stopped mid-step: it saves the step it finished.
    log = str(tmp_path / "run2.log")
    proc = _launch([f"train.save_dir={ckpt}", "train.resume=true", f"train.metrics_file={metrics}"], log)
    _wait_for(lambda: len(_steps_done(metrics)) > first, proc, what="a resumed step")
    second = _checkpoint_is_latest_and_alone(ckpt, _sigterm_workers(proc, log))
    assert first < second < STEPS, (first, second)
    assert _steps_done(metrics) == list(range(1, second + 1))

    # 3. A partial checkpoint left by a killed run is removed at the next start; the run finishes.
    os.makedirs(os.path.join(ckpt, "step_0000099.incomplete"))
    log = str(tmp_path / "run3.log")
    proc = _launch([f"train.save_dir={ckpt}", "train.resume=true", f"train.metrics_file={metrics}"], log)
    assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]
    text = open(log).read()
    assert text.count("an incomplete checkpoint left by an interrupted run") == 1, text[-3000:]
    assert not os.path.exists(os.path.join(ckpt, "step_0000099.incomplete"))
    assert _steps_done(metrics) == list(range(1, STEPS + 1))

    # The three pieces are the uninterrupted run, loss for loss.
    straight = str(tmp_path / "straight.jsonl")
    proc = _launch([f"train.metrics_file={straight}"], str(tmp_path / "straight.log"))
    assert proc.wait(timeout=600) == 0
    pieces = [json.loads(line)["loss"] for line in open(metrics)]
    assert pieces == [json.loads(line)["loss"] for line in open(straight)]
