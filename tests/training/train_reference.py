"""Five training steps (DDP + Megatron optimizer, Adam, clipping) on the groups given.
Run as a script it is the single-process reference: `python -m tests.training.train_reference OUT.json`."""

import json
import sys

from megatron_tsp import compat

from megatron_tsp.config import ModelRecipe, ModelShape, ParallelRecipe, TrainRecipe
from megatron_tsp.training.build import build_gpt, wrap_ddp_and_optimizer
from megatron_tsp.training.loop import build_train_dataset, micro_batches, train_step
from megatron_tsp.training.recipe import Recipe

SHAPE = ModelShape(seq_length=32, num_attention_heads=8, num_query_groups=4)
GLOBAL_BATCH, STEPS, SEED = 4, 5, 4321


def run_steps(pgs, layout, distributed_optimizer=True, overlap=False, bucket_size=None, fsdp=False,
              core_attention="local", sequence_parallel=None, **build_kw):
    """On the groups `pgs` (the collection initialize_model_parallel returned): `layout` 'tsp' or a
    baseline ('tp_sp': TP + SP, with context parallelism when the groups have a CP size > 1);
    `build_kw` go to build_gpt (e.g. recompute_granularity=..., offload_activations=...). The
    driver's data (MockGPTDataset, this DP / CP rank's share) and step (Megatron's schedule, the
    loss mask), one micro-batch per DP rank."""
    model = build_gpt(SHAPE, layout=layout, seed=SEED, core_attention=core_attention, sequence_parallel=sequence_parallel,
                      pg_collection=pgs, **build_kw)
    # lr 3e-3 (the recipe default): at 1e-2 the mock data's loss rises from step 3 (4.12 -> 4.33 -> 4.57)
    # and the diverging run amplifies float32 rounding past the parity bound
    ddp, opt = wrap_ddp_and_optimizer(model, lr=3e-3, clip_grad=0.5, use_distributed_optimizer=distributed_optimizer,
                                      overlap=overlap, bucket_size=bucket_size, fsdp=fsdp, pg_collection=pgs)
    model.config.finalize_model_grads_func = compat.finalize_model_grads_func(pgs)  # as training.loop.build does
    model.config.no_sync_func = ddp.no_sync
    cp_group = pgs.cp
    dp_rank, dp_size = pgs.dp.rank(), pgs.dp.size()
    recipe = Recipe(model=ModelRecipe(**vars(SHAPE)), parallel=ParallelRecipe(context_size=cp_group.size()),
                    train=TrainRecipe(steps=STEPS, micro_batch_size=GLOBAL_BATCH // dp_size,
                                      global_batch_size=GLOBAL_BATCH, seed=SEED))
    dataset = build_train_dataset(recipe)
    device = next(model.parameters()).device
    losses, norms = [], []
    for step in range(STEPS):
        batches = list(micro_batches(dataset, step, recipe, dp_rank, dp_size, device, cp_group))
        loss, norm = train_step(ddp, opt, batches, recipe, pgs)
        losses.append(loss)
        norms.append(float(norm))
    return {"loss": losses, "grad_norm": norms}


if __name__ == "__main__":
    from megatron_tsp import initialize_model_parallel
    from megatron_tsp.training.build import init_distributed
    from megatron_tsp.training.cpu import install_cpu_shims

    init_distributed()
    install_cpu_shims()  # no-op with CUDA
    groups = initialize_model_parallel(tsp_size=1)
    with open(sys.argv[1], "w") as f:
        json.dump(run_steps(groups, "tp_sp", distributed_optimizer=False), f)
