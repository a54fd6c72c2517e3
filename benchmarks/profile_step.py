"""Where a training step's GPU time goes: runs a recipe through the driver for a few steps and
profiles the last one with torch.profiler on rank 0 (CUDA kernel time by operator).

    torchrun --nproc-per-node 4 benchmarks/profile_step.py configs/7b_16k.yaml OUT.txt [key=value ...]
"""

import sys

import torch
import torch.distributed as dist

import megatron_tsp.training.loop as driver
from megatron_tsp.training.recipe import load_recipe


def main():
    recipe_path, out_path, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    recipe = load_recipe(recipe_path, ["train.steps=3", "train.log_interval=1", *overrides])
    real_step = driver.train_step
    calls = {"n": 0}

    def profiled_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] < recipe.train.steps:
            return real_step(*args, **kwargs)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            result = real_step(*args, **kwargs)
            torch.cuda.synchronize()
        if dist.get_rank() == 0:
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
            with open(out_path, "w") as f:
                f.write(f"recipe {recipe_path} {' '.join(overrides)}\n{table}\n")
        return result

    driver.train_step = profiled_step
    driver.run(recipe)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
