"""A tiny TSP training run: `torchrun --nproc-per-node 2 -m megatron_tsp.training.example`.

Builds a small GPT (RoPE, SwiGLU, RMSNorm) with TSP over all ranks (or `--tsp-size`), wraps it
in Megatron's DDP with the distributed optimizer, and trains on a learnable mock stream.
NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import argparse
import time
import warnings

import torch.distributed as dist

from ..megatron_lm.arguments import add_tsp_args
from ..config import TSPConfigError


def main(argv=None):
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|deprecated).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(prog="python -m megatron_tsp.training.example", description=__doc__.split("\n\n")[0])
    add_tsp_args(parser)
    parser.set_defaults(tsp_size=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    from .. import initialize_model_parallel
    from .build import ModelShape, build_gpt, dp_slice, init_distributed, synthetic_batch, train_step, wrap_ddp_and_optimizer

    from .cpu import install_cpu_shims

    backend = init_distributed()
    install_cpu_shims()  # no-op with CUDA
    world, rank = dist.get_world_size(), dist.get_rank()
    D = world if args.tsp_size is None else args.tsp_size
    initialize_model_parallel(tsp_size=D)
    shape = ModelShape(seq_length=args.seq_length)
    model = build_gpt(shape, layout="tsp")
    ddp, optimizer = wrap_ddp_and_optimizer(model, lr=args.lr)
    if rank == 0:
        print(f"megatron-tsp example: world {world} ({backend}), --tsp-size {D}, data-parallel {world // D}, "
              f"S={shape.seq_length}, {sum(p.numel() for p in model.parameters())} parameters per rank", flush=True)
    first = last = None
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = (dp_slice(t) for t in synthetic_batch(step, args.global_batch_size, shape))
        loss, grad_norm = train_step(ddp, optimizer, *batch)
        first = loss if first is None else first
        last = loss
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  grad-norm {grad_norm:.3f}  {1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)
    if rank == 0:
        print(f"loss {first:.4f} -> {last:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except TSPConfigError as e:
        raise SystemExit(f"error: {e}")
