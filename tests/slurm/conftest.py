"""One throw-away two-node SLURM cluster for tests/slurm (scripts/ci_slurm.sh up DIR 2: munged,
slurmctld, and a slurmd per node, each in its own network namespace where the machine allows),
started once per session and removed after it, namespaces included; plus job helpers. Skipped,
with the reason, only when SLURM cannot run here; TSP_REQUIRE_SLURM=1 turns that skip into a
failure; TSP_SLURM_KEEP_JOBS=1 keeps the jobs' logs and checkpoints."""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "scripts" / "ci_slurm.sh"
JOB_TIMEOUT_S = 1200


def _skip_or_fail(reason: str):
    if os.environ.get("TSP_REQUIRE_SLURM") == "1":
        pytest.fail(f"TSP_REQUIRE_SLURM=1 but SLURM cannot run here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    """SLURM_CONF, a work directory for the jobs and the nodes (name, namespace, address); the
    cluster is stopped and removed after the session."""
    if os.environ.get("RANK") not in (None, "0"):
        pytest.skip("one cluster per machine: run under plain pytest, not torchrun")
    work = Path(tempfile.mkdtemp(prefix="tsp-slurm-jobs-"))
    cluster_dir = tempfile.mkdtemp(prefix="tsp-slurm-", dir="/tmp")  # munged wants every parent executable by all
    try:
        up = subprocess.run(["bash", str(HELPER), "up", cluster_dir, "2"], capture_output=True, text=True,
                            timeout=1200, env=dict(os.environ, PYTHON=sys.executable))
        print(up.stdout, up.stderr, sep="\n")
        if up.returncode == 77:
            _skip_or_fail(up.stderr.strip().removeprefix("SKIP: "))
        assert up.returncode == 0, f"ci_slurm.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}"
        nodes = {}
        for line in Path(cluster_dir, "nodes.env").read_text().splitlines():
            fields = dict(kv.split("=", 1) for kv in shlex.split(line))
            k = next(iter(fields)).split("_")[1]
            nodes[int(k)] = {"name": fields[f"NODE_{k}"], "ns": fields[f"NODE_{k}_NS"], "addr": fields[f"NODE_{k}_ADDR"]}
        # gloo's interface between the nodes: the namespaces' veth, or loopback when both share this host's
        iface = "tsp0" if nodes[1]["ns"] else "lo"
        yield {"SLURM_CONF": os.path.join(cluster_dir, "slurm.conf"), "work": work, "nodes": nodes, "iface": iface,
               "dir": Path(cluster_dir)}
    finally:
        down = subprocess.run(["bash", str(HELPER), "down", cluster_dir], capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, f"ci_slurm.sh down failed:\n{down.stdout}\n{down.stderr}"
        assert not os.path.exists(cluster_dir)
        if os.environ.get("TSP_SLURM_KEEP_JOBS") == "1":  # the jobs' logs and checkpoints, for a look after a failure
            print(f"tests/slurm: kept {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=True)


def job_env(cluster, **settings):
    """The environment for sbatch: the cluster, this interpreter, gloo's interface between the
    nodes, no torchrun variables of this process."""
    env = dict(os.environ, SLURM_CONF=cluster["SLURM_CONF"], PYTHON=sys.executable, GLOO_SOCKET_IFNAME=cluster["iface"])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(key, None)
    env.update(settings)
    return env


def submit(cluster, script: str, env: dict, *args: str, nodes: int = 1, options=()) -> str:
    # --gpus-per-node=0 clears the scripts' GPU request: these nodes have none.
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--time=60", f"--chdir={cluster['work']}",
           *options, f"scripts/slurm/{script}", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def scontrol(cluster, *args: str) -> str:
    r = subprocess.run(["scontrol", *args], env=job_env(cluster), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"scontrol {' '.join(args)}: {r.stderr}"
    return r.stdout


def job_field(cluster, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=job_env(cluster), capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait(cluster, job: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """The job's final state (COMPLETED, FAILED, ...) once it left the queue for good."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_field(cluster, job, "JobState")
        if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=job_env(cluster))
    pytest.fail(f"job {job} did not finish in {timeout_s:.0f} s")


def read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<no {path}>"
