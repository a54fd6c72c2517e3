"""The SLURM job scripts under a real SLURM (the two-node cluster of tests/slurm/conftest.py):
a TSP degree that does not divide the processes per node is refused before srun. Training,
resuming, preemption and a lost node: tests/slurm/test_two_nodes.py.

    python -m pytest -m slurm tests/slurm
"""

import pytest

from .conftest import job_env, read, submit, wait

pytestmark = pytest.mark.slurm


def test_tsp_size_must_divide_processes_per_node(cluster):
    """A TSP degree that does not divide the processes per node stops the job before srun, with the reason."""
    work = cluster["work"]
    env = job_env(cluster, TSP_ENTRY="driver", NPROC_PER_NODE="2", TSP_SIZE="3", LOG_DIR=str(work / "logs"),
                  CKPT_DIR=str(work / "ckpt_bad"))
    job = submit(cluster, "tsp.sbatch", env)
    assert wait(cluster, job) == "FAILED"
    out = read(work / f"slurm-tsp-{job}.out")
    assert "TSP_SIZE=3 must divide the 2 processes (GPUs) per node" in out, out
    assert not (work / "ckpt_bad").exists()
