"""The SLURM job scripts under a real SLURM: scripts/ci_slurm.sh starts a one-node cluster
(munged, slurmctld, slurmd) on this machine, `sbatch` submits scripts/slurm/tsp.sbatch and
tp_sp.sbatch pointed at the plugin's driver and configs/tiny.yaml (2 CPU processes, gloo), and the
test reads the jobs' logs and checkpoints, resubmits the tsp job to see it resume, and submits one
that the launcher must refuse. Skipped, with the reason, only when SLURM cannot run
here; TSP_REQUIRE_SLURM=1 turns that skip into a failure.

    python -m pytest -m slurm tests/slurm
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "scripts" / "ci_slurm.sh"
STEPS = 4
JOB_TIMEOUT_S = 300


def _skip_or_fail(reason: str):
    if os.environ.get("TSP_REQUIRE_SLURM") == "1":
        pytest.fail(f"TSP_REQUIRE_SLURM=1 but SLURM cannot run here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    """SLURM_CONF and a work directory for the jobs; the cluster is stopped and removed after."""
    if os.environ.get("RANK") not in (None, "0"):
        pytest.skip("one cluster per machine: run under plain pytest, not torchrun")
    work = Path(tempfile.mkdtemp(prefix="tsp-slurm-jobs-"))
    cluster_dir = tempfile.mkdtemp(prefix="tsp-slurm-", dir="/tmp")  # munged wants every parent executable by all
    try:
        up = subprocess.run(["bash", str(HELPER), "up", cluster_dir], capture_output=True, text=True, timeout=1200,
                            env=dict(os.environ, PYTHON=sys.executable))
        print(up.stdout, up.stderr, sep="\n")
        if up.returncode == 77:
            _skip_or_fail(up.stderr.strip().removeprefix("SKIP: "))
        assert up.returncode == 0, f"ci_slurm.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}"
        yield {"SLURM_CONF": os.path.join(cluster_dir, "slurm.conf"), "work": work}
    finally:
        down = subprocess.run(["bash", str(HELPER), "down", cluster_dir], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, f"ci_slurm.sh down failed:\n{down.stdout}\n{down.stderr}"
        assert not os.path.exists(cluster_dir)
        subprocess.run(["rm", "-rf", str(work)], check=True)


def _env(cluster, **settings):
    env = dict(os.environ, SLURM_CONF=cluster["SLURM_CONF"], PYTHON=sys.executable)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(settings)
    return env


def _submit(cluster, script: str, env: dict, *args: str) -> str:
    # --gpus-per-node=0 clears the scripts' GPU request: this node has none.
    cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=10", f"--chdir={cluster['work']}",
           f"scripts/slurm/{script}", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def _wait(cluster, job: str) -> str:
    """The job's final state (COMPLETED, FAILED, ...) once it left the queue."""
    env = _env(cluster)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        state = re.search(r"JobState=(\S+)", out)
        if state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state.group(1)
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} did not finish in {JOB_TIMEOUT_S} s")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<no {path}>"


def test_tsp_and_tp_sp_jobs_train_and_resume(cluster):
    """Both job scripts run the driver on tiny.yaml through srun + torchrun, log every step, the
    summary and the checkpoint under LOG_DIR and CKPT_DIR; the job script's arguments reach the
    driver; the tsp job submitted again with more steps resumes from its checkpoint."""
    work = cluster["work"]
    jobs = {}
    for layout in ("tsp", "tp_sp"):
        env = _env(cluster, TSP_ENTRY="driver", RECIPE="configs/tiny.yaml", NPROC_PER_NODE="2",
                   LOG_DIR=str(work / "logs"), CKPT_DIR=str(work / f"ckpt_{layout}"),
                   EXTRA_ARGS=f"train.steps={STEPS} train.log_interval=1")
        jobs[layout] = _submit(cluster, f"{layout}.sbatch", env, "train.seed=7")
    for layout, job in jobs.items():
        state = _wait(cluster, job)
        log = work / "logs" / f"{layout}-{job}.out"
        text, slurm_out = _read(log), _read(work / f"slurm-{layout}-{job}.out")
        assert state == "COMPLETED", f"{layout} job {job}: {state}\n{slurm_out}\n{text[-4000:]}"
        assert f"launch.sh: log {log}" in slurm_out
        assert f"layout {layout}, size 2, 2 processes per node, entry driver" in text
        assert re.search(rf"megatron-tsp train: layout {layout} size 2 x pipeline 1 x data 1 on 2 "
                         r"(CPU processes \(gloo\)|GPUs \(nccl\))", text), text[-4000:]
        steps = [int(s) for s in re.findall(rf"^0: step +(\d+)/{STEPS} \| loss \d+\.\d+", text, re.M)]
        assert steps == list(range(1, STEPS + 1)), text[-4000:]
        assert re.search(rf"^0: summary: {STEPS} steps, loss \d+\.\d+ -> \d+\.\d+", text, re.M), text[-4000:]
        assert "train.seed=7" in text  # the job script's own arguments are passed on
        assert (work / f"ckpt_{layout}" / f"step_{STEPS:07d}").is_dir()

    # RESUME=1 (the default): the tsp job submitted again continues from CKPT_DIR's latest checkpoint.
    ckpt = work / "ckpt_tsp"
    env = _env(cluster, TSP_ENTRY="driver", RECIPE="configs/tiny.yaml", NPROC_PER_NODE="2",
               LOG_DIR=str(work / "logs"), CKPT_DIR=str(ckpt), EXTRA_ARGS=f"train.steps={STEPS + 2} train.log_interval=1")
    job = _submit(cluster, "tsp.sbatch", env, "train.seed=7")
    state, text = _wait(cluster, job), _read(work / "logs" / f"tsp-{job}.out")
    assert state == "COMPLETED", text[-4000:]
    assert f"steps {STEPS + 1}..{STEPS + 2} (resumed from {ckpt})" in text, text[-4000:]
    steps = [int(s) for s in re.findall(rf"^0: step +(\d+)/{STEPS + 2} \| loss", text, re.M)]
    assert steps == [STEPS + 1, STEPS + 2], text[-4000:]
    assert (ckpt / f"step_{STEPS + 2:07d}").is_dir()


def test_tsp_size_must_divide_processes_per_node(cluster):
    """A TSP degree that does not divide the processes per node stops the job before srun, with the reason."""
    work = cluster["work"]
    env = _env(cluster, TSP_ENTRY="driver", NPROC_PER_NODE="2", TSP_SIZE="3", LOG_DIR=str(work / "logs"),
               CKPT_DIR=str(work / "ckpt_bad"))
    job = _submit(cluster, "tsp.sbatch", env)
    assert _wait(cluster, job) == "FAILED"
    out = _read(work / f"slurm-tsp-{job}.out")
    assert "TSP_SIZE=3 must divide the 2 processes (GPUs) per node" in out, out
    assert not (work / "ckpt_bad").exists()
