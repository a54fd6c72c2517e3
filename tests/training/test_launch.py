"""`megatron-tsp train --nproc-per-node N` (megatron_tsp.training.launch) checks the command line,
the recipe and `--resume DIR` itself, torch-free, before any worker starts: a misspelled key, a
layout that does not fit N processes or a malformed YAML file is one line, exit 2, in about a
tenth of a second instead of after the workers imported torch (2-56 s); options and overrides
come in any order (`recipe.yaml --resume DIR train.steps=9`)."""

import os
import subprocess
import sys
import time

import pytest

from megatron_tsp import output
from megatron_tsp.training.command import train_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("TORCHELASTIC", "ROLE_", "PYTHONWARNINGS"))}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop(output.VERBOSE_ENV, None)
    return env


def _train(*args, nproc=("--nproc-per-node", "2")):
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "megatron_tsp.cli", "train", *nproc, *args], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    res.seconds = time.time() - t0
    return res


def _one_error(res, needle, launcher=True):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-tsp train: error: ") and needle in lines[0], res.stderr
    if launcher:
        assert output.INFO_LINE not in res.stdout, res.stdout  # the workers print it first: none started


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_layers: [2\ntrain:\n  steps: 3\n")
    return str(path)


@pytest.mark.parametrize("args,needle", [
    (["parallel.size=2", "train.stpes=3"], "override: unknown key train.stpes; valid keys of train: steps"),
    (["parallel.size=4"], "world size 2 does not fit the layout: parallel.size (4)"),  # N = 2 is the world
    (["configs/tiny_moe.yaml", "parallel.expert_size=3"], "model.num_experts = 4 must be divisible by parallel.expert_size = 3"),
    (["parallel.layout=tp_sp", "parallel.context_size=2", "model.seq_length=66"], "must be divisible by 2 x parallel.context_size"),
    ("BAD_YAML", "is not valid YAML: line 4, column 6"),
])
def test_recipe_errors_come_from_the_launcher_before_any_worker(bad_yaml, args, needle):
    res = _train(*([bad_yaml] if args == "BAD_YAML" else args))
    _one_error(res, needle)
    assert res.seconds < 5, res.seconds  # ~0.1 s unloaded; the workers' torch import alone takes seconds


def test_the_launcher_check_imports_no_torch_and_takes_under_a_second():
    code = ("import sys, time; t = time.time(); from megatron_tsp.training.launch import check_before_workers as c\n"
            "errors = [c(2, ['configs/tiny_moe.yaml', 'train.stpes=1']), c(2, ['configs/tiny_moe.yaml']),\n"
            "          c(4, ['parallel.layout=tp_sp', 'parallel.size=2', 'parallel.context_size=2'])]\n"
            "print(round(time.time() - t, 3), 'torch' in sys.modules, 'megatron' in sys.modules, errors)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         check=True).stdout.split(" ", 3)
    assert out[1:3] == ["False", "False"], out
    assert "unknown key train.stpes" in out[3] and out[3].endswith(", None, None]\n"), out
    assert float(out[0]) < 1.0, out


def test_malformed_yaml_without_the_launcher_is_one_line_too(bad_yaml):
    """A worker (torchrun, srun, or a world of one) reads the recipe before torch.distributed starts."""
    _one_error(_train(bad_yaml, nproc=()), f"recipe file {bad_yaml!r} is not valid YAML: line 4", launcher=False)


def test_options_and_overrides_in_any_order():
    _, recipe, overrides = train_args(["configs/tiny.yaml", "--resume", "ck", "train.steps=9", "--verbose",
                                       "parallel.size=1"])
    assert recipe == "configs/tiny.yaml"
    assert overrides == ["train.steps=9", "parallel.size=1", "train.save_dir=ck", "train.resume=true"]
    _, recipe, overrides = train_args(["train.steps=9", "--resume-if-present", "ck", "parallel.size=1"])
    assert recipe is None
    assert overrides == ["train.steps=9", "parallel.size=1", "train.save_dir=ck", "train.resume_if_present=true"]
    with pytest.raises(SystemExit):
        train_args(["--resume", "a", "--resume-if-present", "b"])


# --- the workers' environment, their end with the launcher, a second Ctrl-C (issue 28, items 10, 2, 6)

def test_workers_get_one_omp_thread_unless_the_user_set_it():
    from megatron_tsp.training.launch import LAUNCHER_PID_ENV, worker_env

    env = worker_env(2, {"PATH": "/bin"})  # torchrun's default: 1 (a thread per core each: 3-4x slower)
    assert env["OMP_NUM_THREADS"] == "1" and env["WORLD_SIZE"] == "2" and env[LAUNCHER_PID_ENV] == str(os.getpid())
    assert worker_env(2, {"OMP_NUM_THREADS": "6"})["OMP_NUM_THREADS"] == "6"  # the user's choice stays


def _children(pid):
    """PIDs whose parent is `pid`, through /proc (Linux)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{name}/stat").read() if name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(name))
    return found


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended (only its parent's wait is missing)


def _start_long_run():
    """A tiny 2-worker run with many steps; returns (launcher, worker PIDs) once step 1 is printed."""
    env = _env()
    env.update(PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_tsp.cli", "train", "--nproc-per-node", "2",
                             "parallel.size=2", "train.steps=100000", "train.log_interval=1",
                             "train.progress_bar=false", "train.save_on_signal=false"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # stdout is the workers' too: rank 0 prints the steps
        lines.append(line)
        if line.lstrip().startswith("step ") or len(lines) > 200:
            break
    workers = _children(proc.pid)
    assert len(workers) == 2 and any(l.lstrip().startswith("step ") for l in lines), (workers, "".join(lines))
    return proc, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc: Linux")
def test_kill_9_of_the_launcher_ends_the_workers_within_10_s():
    proc, workers = _start_long_run()
    proc.kill()  # SIGKILL: the launcher can pass nothing on
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them behind if the assertion fails
        os.kill(w, 9)
    assert not left, f"workers {left} still running 10 s after the launcher's SIGKILL"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_a_second_ctrl_c_to_the_launcher_aborts_at_once():
    import signal

    proc, workers = _start_long_run()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # well inside the workers' 1 s same-signal window: still a second request
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "aborted by a second SIGINT" in out.splitlines()[-1], out[-3000:]
    assert not [w for w in workers if _alive(w)]


# --- one worker's death: one line naming it (issue 28, item 5)

def test_failure_summary_names_the_killed_rank_and_holds_back_the_others():
    from megatron_tsp.training.launch import failure_summary

    peer = {"line": "rank 0 failed: Connection closed by peer", "traceback": "Traceback ...\nRuntimeError: closed\n",
            "peer_lost": True, "time": 2.0}
    lines, rc = failure_summary([1, -9], set(), {0: peer})
    assert rc == 137 and len(lines) == 1, lines
    assert "rank 1 was killed by signal 9 (SIGKILL" in lines[0] and "--verbose" in lines[0], lines
    # A signal the launcher sent itself (its grace ran out) is not the cause: the failing rank's error is.
    bug = {"line": "rank 1 failed: ZeroDivisionError", "traceback": "Traceback ...\nZeroDivisionError: x\n",
           "peer_lost": False, "time": 1.0}
    lines, rc = failure_summary([-15, 1], {0}, {1: bug})
    assert rc == 1 and lines[-3:-1] == ["ZeroDivisionError: x", "rank 1 failed: ZeroDivisionError"], lines
    assert lines[-1].startswith("megatron-tsp train: rank 1 failed (exit code 1)"), lines
    # The rank with its own error, not the one that saw its peer die, even when that one wrote first.
    lines, rc = failure_summary([1, 1], set(), {0: dict(peer, time=0.5), 1: bug})
    assert rc == 1 and "ZeroDivisionError: x" in lines and not any("closed" in l for l in lines), lines
    assert lines[-1].startswith("megatron-tsp train: rank 1 failed (exit code 1)") and "--verbose" in lines[-1], lines
    assert failure_summary([2, 2], set(), {}) == ([], 2)  # a user error: rank 0 printed it
    assert failure_summary([0, 0], set(), {}) == ([], 0)


def _rank_of(pid):
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK="))[5:])


@pytest.mark.slow  # a training run's start (CI runs slow tests once)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_kill_9_of_one_worker_is_one_line_naming_the_rank_and_its_signal():
    proc, workers = _start_long_run()
    rank1 = next(w for w in workers if _rank_of(w) == 1)
    t0 = time.monotonic()
    os.kill(rank1, 9)
    out, _ = proc.communicate(timeout=60)
    seconds = time.monotonic() - t0
    lines = [l for l in out.splitlines() if not l.lstrip().startswith("step ")]  # after step 1: rank 0's steps
    assert proc.returncode == 128 + 9, out[-3000:]
    assert len(lines) == 1, out[-3000:]  # one line (was ~40-150 lines of the other ranks' tracebacks)
    assert lines[-1].startswith("megatron-tsp train: rank 1 was killed by signal 9 (SIGKILL"), out[-3000:]
    assert seconds < 30, seconds
