"""The shell scripts: `bash -n` on every one, and the SLURM launcher's command line (DRY_RUN=1,
outside SLURM) for both job scripts, both programs, and its refusals. The jobs themselves run
under a real SLURM in tests/slurm."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("scripts/**/*.sh"), *REPO.glob("scripts/**/*.sbatch"), REPO / ".ci" / "run"])


def test_every_script_is_found():
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {"scripts/test.sh", "scripts/ci_slurm.sh", "scripts/slurm/launch.sh", "scripts/slurm/tsp.sbatch",
            "scripts/slurm/tp_sp.sbatch", ".ci/run"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _job(script: str, tmp_path, *args, **env):
    """Run a job script as SLURM's batch step would (one node of an allocation of two), with DRY_RUN=1."""
    megatron_lm = tmp_path / "Megatron-LM"
    megatron_lm.mkdir(exist_ok=True)
    (megatron_lm / "pretrain_gpt.py").write_text("")
    full_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NAME": Path(script).stem, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
                "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96",
                "MASTER_ADDR": "gpu07", "MEGATRON_LM": str(megatron_lm), "DRY_RUN": "1"}
    full_env.update(env)
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm" / script), *args], env=full_env,
                          capture_output=True, text=True, cwd=tmp_path)


def _command(r):
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    bash = argv.index("bash")
    assert argv[bash + 1] == "-c" and argv[bash + 3] == "torchrun"
    # srun's options, the per-task shell line, and what follows torchrun: python, its options, the program
    return argv[:bash], argv[bash + 2], argv[bash + 4:]


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_tsp_job_runs_megatron_lm_runner(tmp_path):
    srun, per_task, torchrun = _command(_job("tsp.sbatch", tmp_path, "--lr", "1e-4", EXTRA_ARGS="--train-iters 20"))
    assert _value(srun, "--nodes") == "2" and _value(srun, "--ntasks-per-node") == "1"
    assert _value(srun, "--cpus-per-task") == "96"
    assert '-m torch.distributed.run --node-rank "$SLURM_NODEID"' in per_task  # expanded on each node
    python, rest = torchrun[0], torchrun[1:]
    assert python == "python3"
    assert rest[:rest.index("-m")] == ["--nnodes", "2", "--nproc-per-node", "8", "--master-addr", "gpu07",
                                       "--master-port", str(20000 + 4242)]
    program = rest[rest.index("-m"):]
    ckpt = str(REPO / "checkpoints" / "tsp")
    assert program == ["-m", "megatron_tsp.cli", "run", str(tmp_path / "Megatron-LM" / "pretrain_gpt.py"), "--tsp-size", "8",
                       "--save", ckpt, "--save-interval", "1000", "--load", ckpt, "--train-iters", "20", "--lr", "1e-4"]


def test_tp_sp_job_runs_native_baseline(tmp_path):
    _, _, torchrun = _command(_job("tp_sp.sbatch", tmp_path, TSP_SIZE="4", RESUME="0",
                                RECIPE="configs/tiny.yaml"))
    program = torchrun[torchrun.index("-m"):]
    assert program[:3] == ["-m", "megatron_tsp.cli", "run"] and program[4:] == ["--tsp-size", "1", "--tensor-model-parallel-size", "4", "--sequence-parallel",
                           "--tsp-recipe", str(REPO / "configs" / "tiny.yaml"),
                           "--save", str(REPO / "checkpoints" / "tp_sp"), "--save-interval", "1000"]


@pytest.mark.parametrize("layout", ["tsp", "tp_sp"])
def test_driver_entry(tmp_path, layout):
    _, _, torchrun = _command(_job(f"{layout}.sbatch", tmp_path, "train.steps=3", TSP_ENTRY="driver", NPROC_PER_NODE="2",
                                CKPT_DIR="/ckpt", SAVE_INTERVAL="5"))
    assert _value(torchrun, "--nproc-per-node") == "2"
    program = torchrun[torchrun.index("-m"):]
    assert program == ["-m", "megatron_tsp.cli", "train", str(REPO / "configs" / "7b_16k.yaml"), f"parallel.layout={layout}",
                       "parallel.size=2", "train.save_dir=/ckpt", "train.save_interval=5", "train.resume_if_present=true",
                       "train.steps=3"]


@pytest.mark.parametrize("env, error", [
    ({"TSP_SIZE": "3"}, "TSP_SIZE=3 must divide the 8 processes (GPUs) per node"),
    ({"TSP_SIZE": "16"}, "TSP_SIZE=16 must divide the 8 processes (GPUs) per node"),
    ({"SLURM_GPUS_ON_NODE": ""}, "no GPUs in this allocation"),
    ({"TSP_ENTRY": "nemo"}, "TSP_ENTRY=nemo: expected megatron-lm or driver"),
    ({"RECIPE": "configs/none.yaml"}, "configs/none.yaml: no such file"),
    ({"MEGATRON_LM": "/nonexistent"}, "MEGATRON_LM=/nonexistent has no pretrain_gpt.py"),
    ({"RESUME": "yes"}, "RESUME=yes: expected 0 or 1"),
    ({"REQUEUE": "no"}, "REQUEUE=no: expected 0 or 1"),
])
def test_launcher_refuses(tmp_path, env, error):
    r = _job("tsp.sbatch", tmp_path, **env)
    assert r.returncode == 2 and r.stdout == ""
    assert error in r.stderr, r.stderr


def test_master_address_is_the_first_nodes_node_addr(tmp_path):
    """Without MASTER_ADDR: the address SLURM has for the allocation's first node (its NodeAddr),
    which other nodes reach even where its name does not resolve; its name where SLURM has none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        'case "$1 $2" in\n'
        '  "show hostnames") printf "gpu07\\ngpu08\\n" ;;\n'
        '  "show node") [[ $3 == gpu07 && -z ${NO_ADDR:-} ]] && echo "NodeName=gpu07 Arch=x86_64 CoresPerSocket=48"'
        ' && echo "   NodeAddr=10.1.2.7 NodeHostName=gpu07 Version=22.05.8" ;;\n'
        "esac\n")
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    srun, _, torchrun = _command(_job("tsp.sbatch", tmp_path, MASTER_ADDR="", PATH=path))
    assert _value(torchrun, "--master-addr") == "10.1.2.7"
    _, _, torchrun = _command(_job("tsp.sbatch", tmp_path, MASTER_ADDR="", PATH=path, NO_ADDR="1"))
    assert _value(torchrun, "--master-addr") == "gpu07"


def test_job_scripts_ask_for_the_warning_signal_and_requeue():
    for script in ("tsp.sbatch", "tp_sp.sbatch"):
        text = (REPO / "scripts" / "slurm" / script).read_text()
        for option in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert option in text.splitlines(), (script, option)


def test_job_script_needs_the_checkout(tmp_path):
    r = _job("tsp.sbatch", tmp_path, SLURM_SUBMIT_DIR=str(tmp_path))
    assert r.returncode == 2 and "submit from the megatron-tsp checkout or set TSP_REPO" in r.stderr
    _command(_job("tsp.sbatch", tmp_path, SLURM_SUBMIT_DIR=str(tmp_path), TSP_REPO=str(REPO)))


# -- Megatron-LM scripts without Megatron-LM (the real trees: tests/megatron_lm/test_megatron_lm_cpu.py) --

SUPPORTED = "core_v0.16.1 (55ac7082), core_v0.17.1 (266f1c97), core_v0.18.2 (571370c8), core_v0.19.0 (5be96267)"


def _fake_megatron_lm(tmp_path, git=False):
    tree = tmp_path / "Megatron-LM"
    (tree / "megatron" / "training").mkdir(parents=True)
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "megatron/training/arguments.py"):
        (tree / name).write_text("# not Megatron-LM's\n")
    if git:
        cmd = ["git", "-C", str(tree), "-c", "user.email=t@t", "-c", "user.name=t"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
            subprocess.run(cmd + args, check=True)
    return tree


@pytest.mark.parametrize("script", ["apply_patches.sh", "prune_megatron_lm.sh"])
@pytest.mark.parametrize("git", [False, True], ids=["files", "git"])
def test_megatron_lm_scripts_refuse_an_unsupported_tree(tmp_path, script, git):
    tree = _fake_megatron_lm(tmp_path, git=git)
    r = subprocess.run(["bash", str(REPO / "scripts" / script), str(tree), str(tmp_path / "dest")],
                       capture_output=True, text=True) if script.startswith("prune") else \
        subprocess.run(["bash", str(REPO / "scripts" / script), str(tree)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == "", r.stderr
    if script == "prune_megatron_lm.sh":
        assert "is at no supported Megatron-LM tag (core_v0.16.1 core_v0.17.1 core_v0.18.2 core_v0.19.0" in r.stderr
        assert not (tmp_path / "dest").exists()
    elif git:
        assert "not a supported Megatron-LM tag: " + SUPPORTED in r.stderr
    else:
        assert ("matches no supported Megatron-LM tag (pretrain_gpt.py gpt_builders.py model_provider.py "
                "megatron/training/arguments.py differs from core_v0.16.1, the closest; supported: " + SUPPORTED) in r.stderr
    assert (tree / "pretrain_gpt.py").read_text() == "# not Megatron-LM's\n"  # nothing changed



def test_apply_patches_refuses_what_is_not_megatron_lm(tmp_path):
    r = subprocess.run(["bash", str(REPO / "scripts" / "apply_patches.sh"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "is not a Megatron-LM tree (no pretrain_gpt.py, megatron/training)" in r.stderr
