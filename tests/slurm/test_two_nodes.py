"""The job scripts on two SLURM nodes (tests/slurm/conftest.py: each slurmd in its own network
namespace), 2 CPU processes per node (gloo), through the driver on configs/tiny.yaml:

- TSP D=2 inside each node with data parallelism across the nodes, the same with Megatron's
  TP+SP (tp_sp.sbatch), and pipeline across the nodes (PP 2 x D 2): every job logs its steps and
  its losses equal the same run on one node with 4 processes (tests/slurm/one_node_reference.py).
- A long TSP job: a short time limit brings SLURM's warning signal (--signal=B:USR1), the workers
  save and stop, the job requeues itself and resumes; in its second allocation one node's workers
  are killed (a lost node): the whole job ends within a bound, the log names the failed rank and
  host, and the job submitted again resumes from the last complete checkpoint. Every step's loss
  in every allocation equals the uninterrupted one-node run's.

    python -m pytest -m slurm tests/slurm/test_two_nodes.py
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, job_env, job_field, read, scontrol, submit, wait

pytestmark = pytest.mark.slurm

STEPS = 4                 # the layout jobs
LONG_STEPS = 300          # the preempted / lost-node job: still training when SLURM's warning comes (<= 75 s)
LONG_ARGS = ["train.global_batch_size=16"]  # 4 micro-batches a step: ~0.4 s, so 300 steps outlast the warning
SAVE_EVERY = 20
TIMEOUT_S = 300           # train.collective_timeout_s of the long job (above its slowest save on a busy machine;
                          # a killed peer's closed connections fail the collectives at once anyway)
WARN_S = 60               # --signal=B:USR1@WARN_S (the job scripts' own: 300)
LOST_NODE_BOUND_S = 120   # the job ends this soon after a node's workers die
LAYOUTS = {  # name: (job script, recipe overrides; every one D = 2 inside a node, 4 processes)
    "tsp": ("tsp.sbatch", []),
    "tp_sp": ("tp_sp.sbatch", []),
    "pp": ("tsp.sbatch", ["parallel.pipeline_size=2"]),
}


@pytest.fixture(scope="module")
def reference(cluster):
    """The one-node runs (torchrun --standalone, 4 processes), started at once so that they run
    alongside the SLURM jobs; the fixture's value waits for them: {name: [loss per step]}."""
    out = cluster["work"] / "reference.json"
    runs = {name: ["parallel.size=2", f"train.steps={STEPS}", "train.seed=7", f"parallel.layout={'tp_sp' if name == 'tp_sp' else 'tsp'}",
                   *extra] for name, (_, extra) in LAYOUTS.items()}
    runs["long"] = ["parallel.size=2", f"train.steps={LONG_STEPS}", "train.seed=7", *LONG_ARGS]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = open(cluster["work"] / "reference.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                             str(REPO / "tests" / "slurm" / "one_node_reference.py"), str(out), json.dumps(list(runs.values()))],
                            env=env, stdout=log, stderr=subprocess.STDOUT)

    class Reference:
        def losses(self, name):
            if proc.returncode is None:
                proc.wait(timeout=900)
            assert proc.returncode == 0, read(cluster["work"] / "reference.log")[-4000:]
            return json.loads(out.read_text())[str(list(runs).index(name))]

    yield Reference()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _env(cluster, name, ckpt, metrics, steps, **settings):
    work = cluster["work"]
    extra = LAYOUTS[name][1] if name in LAYOUTS else LONG_ARGS
    return job_env(cluster, TSP_ENTRY="driver", RECIPE="configs/tiny.yaml", NPROC_PER_NODE="2", TSP_SIZE="2",
                   LOG_DIR=str(work / "logs"), CKPT_DIR=str(ckpt),
                   EXTRA_ARGS=" ".join([f"train.steps={steps}", "train.log_interval=1", f"train.metrics_file={metrics}", *extra]),
                   **settings)


def _metrics(path: Path):
    """(step, loss) of every step logged, in order, over every allocation."""
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())] if path.exists() else []


def _wait_for(what, predicate, timeout_s, text, cluster=None, job=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    # SLURM's view last and short: CI shows the end of a failure's message
    pytest.fail(f"no {what} in {timeout_s} s:\n{text()[-1500:]}" + (_slurm_state(cluster, job) if cluster else ""))


def _slurm_state(cluster, job):
    """What SLURM says when a job does not start or stalls, in few lines: the job's state fields, the
    nodes, the batch script's own output, and the daemons' last lines."""
    env = job_env(cluster)
    run = lambda *cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout  # noqa: E731
    fields = ("JobState", "Reason", "Restarts", "BatchFlag", "ExitCode", "SubmitTime", "EligibleTime", "StartTime",
              "NodeList", "BatchHost")
    show = run("scontrol", "show", "job", job)
    out = ["job " + " ".join(m.group(0) for f in fields if (m := re.search(rf"\b{f}=\S+", show))),
           "nodes " + run("sinfo", "-N", "-h", "-o", "%N %T %E").replace("\n", "; ")]
    for path in [*cluster["work"].glob(f"slurm-*-{job}.out"), *sorted((cluster["dir"] / "log").glob("slurm*.log"))]:
        out.append(f"--- {path.name}: " + " | ".join(read(path).splitlines()[-6:]))
    return "\n\nSLURM:\n" + "\n".join(out)


def test_layouts_across_two_nodes_match_one_node(cluster, reference):
    work, nodes = cluster["work"], cluster["nodes"]
    jobs = {}
    for name, (script, _) in LAYOUTS.items():
        env = _env(cluster, name, work / f"ckpt_{name}", work / f"{name}.jsonl", STEPS)
        jobs[name] = submit(cluster, script, env, "train.seed=7", nodes=2)
    for name, job in jobs.items():
        layout = "tp_sp" if name == "tp_sp" else "tsp"
        state = wait(cluster, job)
        log = work / "logs" / f"{layout}-{job}.out"
        text, slurm_out = read(log), read(work / f"slurm-{layout}-{job}.out")
        assert state == "COMPLETED", f"{name} job {job}: {state}\n{slurm_out}\n{text[-4000:]}"
        assert f"launch.sh: log {log}" in slurm_out
        # the allocation's two nodes; the master is the first node's address, not this host's
        assert f"on 2 node(s): {nodes[1]['name'][:-1]}[1-2]" in text, text[:2000]
        assert f"layout {layout}, size 2, 2 processes per node, entry driver, master {nodes[1]['addr']}:" in text
        pipeline, data = (2, 1) if name == "pp" else (1, 2)
        # 4 processes: torchrun's rendezvous had both nodes (2 per node)
        assert re.search(rf"^0: megatron-tsp train: layout {layout} size 2 x pipeline {pipeline} x data {data} on 4 "
                         r"CPU processes \(gloo\)", text, re.M), text[-4000:]
        steps = [int(s) for s in re.findall(rf"^0: step +(\d+)/{STEPS} \| loss \d+\.\d+", text, re.M)]
        assert steps == list(range(1, STEPS + 1)), text[-4000:]
        assert re.search(rf"^0: summary: {STEPS} steps, loss \d+\.\d+ -> \d+\.\d+", text, re.M), text[-4000:]
        assert "train.seed=7" in text  # the job script's own arguments are passed on
        assert (work / f"ckpt_{name}" / f"step_{STEPS:07d}").is_dir()
        got = [loss for _, loss in _metrics(work / f"{name}.jsonl")]
        assert got == reference.losses(name), f"{name}: two nodes {got}, one node {reference.losses(name)}"


def _workers(job: str, node_id: int):
    """The pids of the job's training processes on one node: torchrun's children (LOCAL_RANK set)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_NODEID") == str(node_id) and "LOCAL_RANK" in env:
            try:  # torchrun's children, not theirs (a checkpoint writer's helper has the same environment)
                ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                if b"torch.distributed.run" in Path(f"/proc/{ppid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


def test_preempted_then_lost_node_job_resumes_with_the_same_losses(cluster, reference):
    work, nodes = cluster["work"], cluster["nodes"]
    ckpt, metrics = work / "ckpt_long", work / "long.jsonl"
    env = _env(cluster, "long", ckpt, metrics, LONG_STEPS, SAVE_INTERVAL=str(SAVE_EVERY))
    env["EXTRA_ARGS"] += f" train.collective_timeout_s={TIMEOUT_S}"
    job = submit(cluster, "tsp.sbatch", env, "train.seed=7", nodes=2, options=[f"--signal=B:USR1@{WARN_S}", "--time=60"])
    log = work / "logs" / f"tsp-{job}.out"
    text = lambda: read(log)  # noqa: E731

    # 1. Once it trains, a short time limit: SLURM's warning comes at its next time-limit check
    # (every 30 s; it sends the warning up to 30 s early), the workers finish their step, save
    # and stop, and the job requeues itself.
    _wait_for("training", lambda: re.search(r"^0: step +2/", text(), re.M), 900, text)
    h, m, sec = map(int, job_field(cluster, job, "RunTime").split(":")[-3:])
    elapsed = 3600 * h + 60 * m + sec
    scontrol(cluster, "update", f"JobId={job}", f"TimeLimit={math.ceil((elapsed + 45) / 60)}")  # 45-105 s left
    _wait_for("SIGUSR1 from SLURM", lambda: "launch.sh: SIGUSR1" in text(), 120, text)
    scontrol(cluster, "update", f"JobId={job}", "TimeLimit=60")  # the next allocation has the time to finish
    stopped = _wait_for("stop", lambda: re.search(r"^0: stopped by SIGUSR1 after step (\d+): (.*)$", text(), re.M), 120, text)
    first = int(stopped.group(1))
    assert 2 <= first < LONG_STEPS, text()[-4000:]
    assert stopped.group(2) in (f"checkpoint saved in {ckpt / f'step_{first:07d}'}", f"its checkpoint is {ckpt / f'step_{first:07d}'}")
    _wait_for("requeue", lambda: f"launch.sh: requeueing job {job}" in text(), 120, text)
    # SLURM holds the requeued job for AuthInfo's cred_expire (30 s in scripts/ci_slurm.sh), then starts it
    # at its next scheduling pass; not sooner (no StartTime=now): a relaunch that races the revocation of
    # the job's credential fails, and SLURM holds the job for good ("launch failed requeued held").
    second = re.compile(rf"^job {job} \(tsp\) on 2 node\(s\)", re.M)
    _wait_for("the second allocation", lambda: len(second.findall(text())) >= 2, 300, text, cluster, job)

    # 2. The second allocation resumes from that checkpoint; once it saved one of its own, node 2's workers die.
    resumed = _wait_for("resume", lambda: re.search(rf"steps {first + 1}\.\.{LONG_STEPS} \(resumed from {ckpt}\)", text()), 300, text, cluster, job)
    saved = _wait_for("a checkpoint of the second allocation",
                      lambda: re.findall(r"^0: saved checkpoint .*step_(\d+)$", text()[resumed.end():], re.M), 600, text)
    last_saved = int(saved[-1])
    _wait_for("a step after it", lambda: re.search(rf"^0: step +{last_saved + 2}/", text(), re.M), 120, text)
    victims = _workers(job, 1)
    assert len(victims) == 2, f"node 2's workers: {victims}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    state = wait(cluster, job, timeout_s=LOST_NODE_BOUND_S + 60)
    ended_after = time.monotonic() - killed_at
    assert state == "FAILED", text()[-4000:]
    assert ended_after < LOST_NODE_BOUND_S, f"the job ended {ended_after:.0f} s after the node's workers died"
    assert job_field(cluster, job, "Restarts") == "1"
    after = text()[resumed.end():]
    # torchrun on node 2 names the dead ranks and their host; node 1's ranks name the peer that went away
    assert re.search(r"rank\s*:\s*[23] \(local_rank: [01]\)", after) and "Signal 9 (SIGKILL)" in after, after[-4000:]
    if nodes[2]["ns"]:
        assert re.search(rf"host\s*:\s*{nodes[2]['name']}", after), after[-4000:]
        assert re.search(rf"^0: megatron-tsp train: rank [01] of 4 on host {nodes[1]['name']} \(node rank 0\) failed: ",
                         after, re.M), after[-4000:]
    assert "launch.sh: srun exited" in after and "resubmit to resume" in after

    # 3. Submitted again, the job resumes from the last complete checkpoint and finishes.
    latest = int((ckpt / "latest").read_text())
    assert latest >= last_saved
    job2 = submit(cluster, "tsp.sbatch", env, "train.seed=7", nodes=2, options=["--time=60"])
    state2, text2 = wait(cluster, job2), read(work / "logs" / f"tsp-{job2}.out")
    assert state2 == "COMPLETED", text2[-4000:]
    assert f"steps {latest + 1}..{LONG_STEPS} (resumed from {ckpt})" in text2, text2[-4000:]
    assert not list(ckpt.glob("*.incomplete"))

    # Every step ran, and every loss logged (the steps after the lost checkpoint twice) is the uninterrupted run's.
    want = reference.losses("long")
    logged = _metrics(metrics)
    assert {s for s, _ in logged} == set(range(1, LONG_STEPS + 1))
    wrong = [(s, loss, want[s - 1]) for s, loss in logged if loss != want[s - 1]]
    assert not wrong, f"steps whose loss differs from the uninterrupted run (step, got, want): {wrong[:10]}"
    print(f"long job: stopped by the warning after step {first}, killed after step {last_saved + 2}+, resumed from {latest}")
