"""Runs several `megatron-tsp train` recipes one after the other in one torchrun world (the
megatron import and the process start are paid once), for the tests that need several worlds:

    torchrun --nproc-per-node N tests/training/train_jobs.py JOBS.json RESULTS.json

JOBS.json: a list of {"name", "overrides": [...], "resume_copy_of": DIR (optional)}. With
resume_copy_of, rank 0 copies the checkpoint directory DIR to a fresh one that the job resumes
from (so several jobs can resume the same checkpoint). RESULTS.json (rank 0): {name: losses, or
"error: ..." when the job raised}."""

import json
import os
import shutil
import sys
import tempfile
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def main(jobs_path, results_path):
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from megatron_tsp.training.recipe import load_recipe
    from megatron_tsp.training.loop import run
    from megatron_tsp.training.build import init_distributed
    from megatron_tsp.training.cpu import install_cpu_shims

    torch.set_num_threads(1)
    init_distributed()
    install_cpu_shims()  # no-op with CUDA
    results = {}
    for job in json.load(open(jobs_path)):
        overrides = list(job["overrides"])
        if job.get("resume_copy_of"):
            path = [None]
            if dist.get_rank() == 0:
                path = [tempfile.mkdtemp(prefix="tsp_resume_")]
                shutil.copytree(job["resume_copy_of"], path[0], dirs_exist_ok=True)
            dist.broadcast_object_list(path, src=0)
            overrides += [f"train.save_dir={path[0]}", "train.resume=true"]
        try:
            result = run(load_recipe(TINY, overrides))
            results[job["name"]] = [h["loss"] for h in result["history"]]
        except Exception as e:  # every rank raises the same recipe error before any collective
            results[job["name"]] = f"error: {type(e).__name__}: {e}"
        dist.barrier()
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main(*sys.argv[1:3])
