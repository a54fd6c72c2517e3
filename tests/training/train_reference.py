"""Five training steps (DDP + Megatron optimizer, Adam, clipping) on the current groups.
Run as a script it is the single-process reference: `python -m tests.training.train_reference OUT.json`."""

import json
import sys

from megatron.core import parallel_state as mpu

from megatron_tsp.baselines.context_parallel import cp_slice
from megatron_tsp.training.build import ModelShape, build_gpt, dp_slice, synthetic_batch, train_step, wrap_ddp_and_optimizer

SHAPE = ModelShape(seq_length=32, num_attention_heads=8, num_query_groups=4)
GLOBAL_BATCH, STEPS, SEED = 4, 5, 4321


def run_steps(layout, distributed_optimizer=True, overlap=False, bucket_size=None, fsdp=False, core_attention="local",
              sequence_parallel=None, **build_kw):
    """`layout` 'tsp' or 'native' (with context parallelism when the groups have a CP size > 1);
    `build_kw` go to build_gpt (e.g. recompute_granularity=..., offload_activations=...)."""
    model = build_gpt(SHAPE, layout=layout, seed=SEED, core_attention=core_attention, sequence_parallel=sequence_parallel,
                      **build_kw)
    ddp, opt = wrap_ddp_and_optimizer(model, lr=1e-2, clip_grad=0.5, use_distributed_optimizer=distributed_optimizer,
                                      overlap=overlap, bucket_size=bucket_size, fsdp=fsdp)
    cp_group = mpu.get_context_parallel_group()
    losses, norms = [], []
    for step in range(STEPS):
        tokens, labels, pos = (cp_slice(dp_slice(t), cp_group) for t in synthetic_batch(step, GLOBAL_BATCH, SHAPE, seed=SEED))
        loss, norm = train_step(ddp, opt, tokens, labels, pos)
        losses.append(loss)
        norms.append(float(norm))
    return {"loss": losses, "grad_norm": norms}


if __name__ == "__main__":
    from megatron_tsp import initialize_model_parallel
    from megatron_tsp.training.build import init_distributed
    from megatron_tsp.training.cpu import install_cpu_shims

    init_distributed()
    install_cpu_shims()  # no-op with CUDA
    initialize_model_parallel(tsp_size=1)
    with open(sys.argv[1], "w") as f:
        json.dump(run_steps("native", distributed_optimizer=False), f)
