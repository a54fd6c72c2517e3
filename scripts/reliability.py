"""A job's bad day, replayed: every bad input and fault of issue 28 against `megatron-tsp train` /
`plan` / `generate` on this machine (CPU, the tiny recipe, 2 processes), one table: the case, the
exit code, the lines printed (stderr / stdout), the seconds to exit, the checkpoint's state after.

    python scripts/reliability.py [--only SUBSTRING] [--keep DIR]

Not part of CI (it starts ~10 two-process jobs: a few minutes on 2 cores); the tests that gate each
behaviour are in tests/training/ (test_launch, test_checkpoint_files, test_checkpoint_faults,
test_output) and tests/inference/test_inference_cli.py. The full disk is real here: the job runs
under RLIMIT_FSIZE (a write past the limit fails with EFBIG, as ENOSPC on a full disk), set after
a first run wrote a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "MEGATRON_TSP_VERBOSE")
TRAIN = ["train", "--nproc-per-node", "2", "parallel.size=2", "train.progress_bar=false", "train.log_interval=1"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(args):
    return [sys.executable, "-m", "megatron_tsp.cli", *args]


def ckpt_state(save_dir):
    if not save_dir or not os.path.isdir(save_dir):
        return "-"
    names = sorted(os.listdir(save_dir))
    latest = open(os.path.join(save_dir, "latest")).read().strip() if "latest" in names else None
    steps = [n[5:].lstrip("0") or "0" for n in names if n.startswith("step_")]
    return f"latest={latest} dirs={','.join(steps) or 'none'}"


def run(args, preexec=None, timeout=600):
    t0 = time.monotonic()
    res = subprocess.run(_cmd(args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
                         preexec_fn=preexec)
    return res.returncode, res.stdout, res.stderr, time.monotonic() - t0


def _children(pid):
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_and_signal(args, action):
    """Start a job, wait for its first step line, `action(launcher, workers)`, then collect it.
    (exit code, stdout, stderr after the signal, seconds from the signal to the launcher's exit)."""
    proc = subprocess.Popen(_cmd(args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = []
    for line in proc.stdout:
        first.append(line)
        if line.lstrip().startswith("step "):
            break
    workers = _children(proc.pid)
    t0 = time.monotonic()
    note = action(proc, workers)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, time.monotonic() - t0, note


def kill_rank1(proc, workers):
    for w in workers:
        env = open(f"/proc/{w}/environ", "rb").read().split(b"\0")
        if b"RANK=1" in env:
            os.kill(w, signal.SIGKILL)
    return ""


def kill_launcher(proc, workers):
    proc.kill()
    t0 = time.monotonic()
    while any(_alive(w) for w in workers) and time.monotonic() - t0 < 15:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    return f"workers ended {time.monotonic() - t0:.1f} s after" if not left else f"{len(left)} workers left!"


def sigterm(proc, workers):
    proc.send_signal(signal.SIGTERM)
    return ""


def two_ctrl_c(proc, workers):
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    return ""


def fsize_limit(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def cases(tmp):
    bad_yaml = os.path.join(tmp, "bad.yaml")
    with open(bad_yaml, "w") as f:
        f.write("model:\n  hidden_size: 64\n  num_layers: [2\n")
    prompts = os.path.join(tmp, "prompts.json")
    with open(prompts, "w") as f:
        json.dump([[1, 2, 3], [4, 500]], f)
    ck = os.path.join(tmp, "ck")
    yield "resume: mistyped DIR", lambda: run(TRAIN + ["--resume", os.path.join(tmp, "typo")]), None
    yield "recipe: malformed YAML", lambda: run(TRAIN[:3] + [bad_yaml] + TRAIN[3:]), None
    yield "recipe: misspelled key", lambda: run(TRAIN + ["train.stpes=3"]), None
    yield "plan: --gpus-per-node 0", lambda: run(["plan", "configs/7b_16k.yaml", "--gpus-per-node", "0"]), None
    yield "train: a checkpoint (setup)", lambda: run(TRAIN + ["train.steps=4", "train.save_interval=2",
                                                              f"train.save_dir={ck}"]), ck
    yield "generate: token out of vocabulary", lambda: run(["generate", "--nproc-per-node", "2", "--load", ck,
                                                            "--prompt-tokens", prompts]), None
    # a real full disk: writes over 64 KiB fail (the shards are larger); the checkpoint of step 4 stays
    yield "save: disk full (RLIMIT_FSIZE)", lambda: run(TRAIN + ["train.steps=6", "train.save_interval=2",
                                                                 "--resume", ck], fsize_limit(64 << 10)), ck
    corrupt = os.path.join(tmp, "corrupt")

    def corrupt_run():
        shutil.copytree(ck, corrupt)
        shard = next(os.path.join(r, n) for r, _, ns in os.walk(os.path.join(corrupt, "step_0000004"))
                     for n in ns if n.endswith(".distcp"))
        with open(shard, "r+b") as f:
            f.truncate(100)
        return run(TRAIN + ["train.steps=6", "--resume", corrupt])
    yield "resume: truncated shard", corrupt_run, corrupt
    long = TRAIN + ["train.steps=100000", "train.save_on_signal=false"]
    yield "SIGKILL of worker rank 1", lambda: run_and_signal(long, kill_rank1), None
    yield "SIGKILL of the launcher", lambda: run_and_signal(long, kill_launcher), None
    sig = os.path.join(tmp, "sig")
    yield "SIGTERM to the launcher", lambda: run_and_signal(TRAIN + ["train.steps=100000", f"train.save_dir={sig}"],
                                                            sigterm), sig
    yield "two Ctrl-C within 0.2 s", lambda: run_and_signal(long, two_ctrl_c), None
    keep = os.path.join(tmp, "keep")
    yield "keep_checkpoints=2, 5 saves", lambda: run(TRAIN + ["train.steps=5", "train.save_interval=1",
                                                              "train.keep_checkpoints=2",
                                                              f"train.save_dir={keep}"]), keep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="run the cases whose name contains this")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    args = p.parse_args(argv)
    tmp = args.keep or tempfile.mkdtemp(prefix="megatron-tsp-reliability-")
    os.makedirs(tmp, exist_ok=True)
    rows = []
    try:
        for name, case, save_dir in cases(tmp):
            if args.only and args.only not in name and "setup" not in name:
                continue
            rc, out, err, seconds, *note = case()
            last = (err.strip().splitlines() or [""])[-1]
            rows.append((name, rc, len(err.splitlines()), len(out.splitlines()), seconds, ckpt_state(save_dir),
                         (note[0] + "; " if note and note[0] else "") + last[:150]))
            print(f"{name}: exit {rc}, {seconds:.1f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    head = ("case", "exit", "stderr lines", "stdout lines", "s to exit", "checkpoint", "last stderr line")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, rc, nerr, nout, seconds, state, last in rows:
        print(f"| {name} | {rc} | {nerr} | {nout} | {seconds:.1f} | {state} | {last.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
