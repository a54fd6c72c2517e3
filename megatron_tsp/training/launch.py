"""`megatron-tsp train`'s entry: `--nproc-per-node N` starts N worker processes on this machine
itself (no torchrun needed); without it this process is one worker (`training.loop.main`) of a
world that torchrun / SLURM / this launcher set up, or a world of one.

    megatron-tsp train --nproc-per-node 2 configs/tiny.yaml parallel.size=2
    torchrun --nproc-per-node 2 --no-python megatron-tsp train configs/tiny.yaml parallel.size=2

The launcher imports neither torch nor megatron. It checks the command line, the recipe (every
check but the GPU-only ones, at world size N) and `--resume DIR` before any worker starts
(`check_before_workers`: a bad input costs well under a second, not a worker start-up). It gives
each worker torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), forwards SIGINT / SIGTERM to them (they save and stop: `training.signals`; a second
one kills them), and returns 0, 2 for a user error (which rank 0 alone has printed), or the
failure's exit code (below). When one worker fails the others get GRACE_S to fail the same way,
then are terminated.

As torchrun does, each worker gets OMP_NUM_THREADS=1 unless it is set (N workers each with a
thread per core overload the cores: 3-4x slower steps on a 2-core machine). The workers run in
their own process group, so a terminal's Ctrl-C reaches the launcher alone: it passes the first
one on (they save and stop) and kills them at a second one (abort, at any interval). On Linux a
worker gets SIGTERM when the launcher dies, however it dies (PR_SET_PDEATHSIG), and exits at most
ORPHAN_GRACE_S later even if its stop has not finished (no orphaned jobs holding GPUs).

A failing worker (without `--verbose`) writes its error line and traceback to a report file in a
directory the launcher made (output.REPORT_DIR_ENV) instead of its stderr, and the launcher prints what
explains the failure once (`failure_summary`): a rank killed by a signal (SIGKILL, the kernel's
out-of-memory killer) is one line naming the rank and the signal, exit code 128 + the signal
(137 for SIGKILL); otherwise the failing rank's own error and traceback (one that is not a peer's
death), then one line with every rank's exit code. The other ranks' errors ("connection closed
by peer": they only saw the first one die) are held back; `--verbose` prints every rank's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from ..output import REPORT_DIR_ENV
from .command import PROG, parser, train_args, wants_help

GRACE_S = 30.0
LAUNCHER_PID_ENV = "MEGATRON_TSP_LAUNCHER_PID"  # set for the workers: whose death ends them
ORPHAN_GRACE_S = 8.0  # a worker whose launcher died: its stop and save, at most this long


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_nproc(argv: List[str]):
    """(N or None, argv without `--nproc-per-node N` / `--nproc-per-node=N`). Raises ValueError
    on a missing or non-positive N."""
    rest, n, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc-per-node" or a == "--nproc_per_node":
            if i + 1 >= len(argv):
                raise ValueError("--nproc-per-node needs a number of processes")
            value, i = argv[i + 1], i + 2
        elif a.startswith("--nproc-per-node=") or a.startswith("--nproc_per_node="):
            value, i = a.split("=", 1)[1], i + 1
        else:
            rest.append(a)
            i += 1
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--nproc-per-node = {value!r}: a positive number of processes")
        n = int(value)
    return n, rest


def worker_env(nproc: int, env: Optional[dict] = None) -> dict:
    """The environment all `nproc` workers share (RANK and LOCAL_RANK are added per worker)."""
    env = dict(os.environ if env is None else env)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", TORCHELASTIC_RUN_ID="megatron-tsp")
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    # torchrun's default: one OpenMP thread per worker unless the user chose a number (torch's
    # default, a thread per core in every worker, oversubscribes the cores: 3-4x slower on 2 cores).
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent(parent_pid: int):
    """A preexec_fn (runs in the child before exec): SIGTERM this worker when the launcher dies,
    even by SIGKILL. Linux only; elsewhere the worker's watchdog (`watch_launcher`) alone."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing to import after fork

    def preexec():
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the launcher died before prctl: the signal would never come
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def watch_launcher(poll_s: float = 0.5) -> None:
    """In a worker this launcher started: once the launcher is gone, SIGTERM itself (the stop
    and save after the current step, if PR_SET_PDEATHSIG did not already send it) and exit at
    most ORPHAN_GRACE_S later whatever the stop is doing (a long step, a save, a collective
    waiting for a dead rank). A daemon thread; nothing when not started by this launcher."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not launcher.isdigit():
        return
    import threading

    def watch():
        while os.getppid() == int(launcher):
            time.sleep(poll_s)
        if not sys.platform.startswith("linux"):  # on Linux PR_SET_PDEATHSIG has sent it already
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_GRACE_S)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="megatron-tsp-watch-launcher", daemon=True).start()


def _read_reports(folder: str) -> Dict[int, dict]:
    reports = {}
    for name in os.listdir(folder):
        if name.startswith("rank_") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    reports[int(name[5:-5])] = json.load(f)
            except (OSError, ValueError):
                continue
    return reports


def failure_summary(codes: List[int], signalled: set, reports: Dict[int, dict],
                    prog: str = PROG) -> Tuple[List[str], int]:
    """(the lines the launcher prints, its exit code) once the workers ended with exit codes
    `codes` (by rank; -N: killed by signal N), `signalled`: the ranks the launcher itself
    terminated, `reports`: the failure reports by rank. Nothing when every worker exited 0; a
    user error (2) was printed by rank 0 already."""
    killed = [(r, -c) for r, c in enumerate(codes) if c < 0 and r not in signalled]
    if killed:  # from outside (kill -9, the OOM killer): the cause; the others only saw it die
        r, sig = killed[0]
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else "an unknown signal"
        oom = ": kill -9, or the kernel's out-of-memory killer (see dmesg)" if sig == signal.SIGKILL else ""
        held = "; --verbose shows the other ranks' errors" if set(reports) - {r} else ""
        return [f"{prog}: rank {r} was killed by signal {sig} ({name}{oom}); the other ranks stopped; exit code "
                f"{128 + sig} (exit codes by rank: {codes}{held})"], 128 + sig
    failed = [c for c in codes if c != 0]
    if not failed:
        return [], 0
    if 2 in codes and not reports:
        return [], 2
    # The rank whose own error it is (not "connection closed by peer"), else the first to fail.
    culprit = min(reports, key=lambda r: (reports[r].get("peer_lost", False), reports[r].get("time", 0)), default=None)
    lines = []
    if culprit is not None:
        rep = reports[culprit]
        lines += rep.get("traceback", "").rstrip("\n").splitlines() + [rep.get("line", "")]
    rc = codes[culprit] if culprit is not None and codes[culprit] > 0 else next(c for c in codes if c != 0)
    held = " (--verbose shows the other ranks' errors)" if set(reports) - {culprit} else ""
    what = f"rank {culprit} failed" if culprit is not None else "a worker stopped"
    code = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    lines.append(f"{prog}: {what} ({code}); exit codes by rank: {codes}{held}")
    return lines, 128 - rc if rc < 0 else rc


def launch_workers(nproc: int, argv: List[str], env: Optional[dict] = None, command: str = "train") -> int:
    """Run `python -m megatron_tsp.cli COMMAND ARGV` (train, generate) as `nproc` local workers;
    their exit code."""
    from ..output import verbose_requested

    env = worker_env(nproc, env)
    reports_dir = None
    if not verbose_requested(argv):
        reports_dir = tempfile.mkdtemp(prefix="megatron-tsp-reports-")
        env[REPORT_DIR_ENV] = reports_dir
    try:
        return _run_workers(nproc, [command, *argv], env, reports_dir)
    finally:
        if reports_dir:
            shutil.rmtree(reports_dir, ignore_errors=True)


def _run_workers(nproc: int, argv: List[str], env: dict, reports_dir: Optional[str]) -> int:
    prog = f"megatron-tsp {argv[0]}"
    procs = []
    for r in range(nproc):
        # process_group=0: a terminal's Ctrl-C reaches the launcher only, which passes it on once
        # (two copies would make the workers' 1 s same-signal window swallow a real second Ctrl-C).
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_tsp.cli", *argv],
                                      env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), process_group=0,
                                      preexec_fn=_die_with_parent(os.getpid())))
    stops = []
    signalled = set()  # the ranks this launcher terminated or killed: their signal is not the cause

    def forward(signum, _frame):
        stops.append(signum)
        for r, p in enumerate(procs):
            if p.poll() is None:
                signalled.add(r)
                if len(stops) == 1:
                    p.send_signal(signum)  # the first: they save and stop after the current step
                else:
                    p.kill()  # a second Ctrl-C / SIGTERM aborts at once, however soon it comes

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None:
                if any(p.returncode not in (None, 0) for p in procs):
                    failed_at = time.time()
            elif time.time() - failed_at > GRACE_S:  # one failed, the others did not follow: end them
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        signalled.add(r)
                        p.terminate()
                deadline = time.time() + 10
                while any(p.poll() is None for p in procs) and time.time() < deadline:
                    time.sleep(0.1)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.1)
        codes = [p.wait() for p in procs]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if len(stops) > 1:
        print(f"{prog}: aborted by a second {signal.Signals(stops[1]).name}: the workers were killed "
              "without saving", file=sys.stderr, flush=True)
        return 130 if stops[1] == signal.SIGINT else 128 + stops[1]
    lines, rc = failure_summary(codes, signalled, _read_reports(reports_dir) if reports_dir else {}, prog)
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return rc


def check_before_workers(nproc: int, argv: List[str]):
    """The recipe, its overrides and --resume DIR checked here, torch-free, before any worker
    starts (a misspelled key costs no worker start-up): the TSPConfigError to print, or None.
    The workers check again (under torchrun / srun this launcher is not there); the checks that
    need torch (GPU-only options) run only there. argparse's errors exit 2 from here."""
    from ..config import TSPConfigError
    from .checkpoint_files import check_resume
    from .recipe import load_recipe

    _, recipe_path, overrides = train_args(argv)
    try:
        recipe = load_recipe(recipe_path, overrides, devices=False)
        recipe.check(nproc, devices=False)  # this launcher's world: nproc processes
        check_resume(recipe.train)
    except TSPConfigError as e:
        return e
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        nproc, rest = split_nproc(argv)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if wants_help(argv):  # printed from the option dataclasses: no torch, no megatron
        parser().parse_args(argv)
        return 0
    if nproc is not None:
        if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
            from ..output import print_user_error

            return print_user_error(PROG, "--nproc-per-node starts the workers itself: run it without torchrun, "
                                          "or drop it under torchrun / srun")
        error = check_before_workers(nproc, rest)
        if error is not None:
            from ..output import print_user_error

            return print_user_error(PROG, error)
        return launch_workers(nproc, rest)
    from .loop import main as worker_main

    watch_launcher()  # started by this launcher: end with it (no orphaned workers)
    return worker_main(argv)
