"""train.optimizer_cpu_offload: megatron-core's optimizer CPU offload (the precision-aware
distributed optimizer handing each rank's shard to its HybridDeviceOptimizer) trains a bf16 model
as the in-memory distributed optimizer does, for every layout (tsp, tp, tp_sp, dp over DP ranks,
context parallel); the fp32 main weights, Adam's moments and the gradients' copies are the host
ones (on the CPU; the gradient copies pinned where CUDA exists) and the GPU keeps none of them;
a broken offload (the host result never copied back) is caught; a checkpoint saved with the
offload resumes exactly; bad keys are one RecipeError naming them, and a run whose offload does
not fit the node's host memory is refused before its first step.

On the CPU "host" and "device" are the same memory (training/cpu.py makes the offload take the
GPU's path): these tests prove the numerics and the wiring, not the GPU's memory or time."""

import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

import megatron_tsp
from megatron_tsp.config import ModelRecipe, ModelShape, ParallelRecipe, TrainRecipe, TSPConfigError
from megatron_tsp.training.build import build_gpt, wrap_ddp_and_optimizer
from megatron_tsp.training.loop import build_train_dataset, micro_batches, train_step
from megatron_tsp.training.recipe import Recipe, RecipeError, load_recipe

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SHAPE = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                   seq_length=16)
STEPS, SEED, GLOBAL_BATCH = 2, 4321, 4
# The host Adam is torch's fused CPU AdamW, the in-memory one torch's AdamW (for-each on a GPU, the
# single-tensor loop on the CPU): the same update, rounded in another order. 2 steps of a bf16 model
# (lr 3e-3) stay within these; a lost update is ~1e-3 in the loss, 3e-3 in the weights.
LOSS_TOL, MAIN_TOL = 2e-5, 1e-6


def _groups(layout, size, cp=1):
    """The groups of `layout` (tsp, tp, tp_sp, dp) at TSP / TP size `size` and context size `cp`;
    data parallel takes the rest of the world. Returns them (a ProcessGroupCollection)."""
    if mpu.model_parallel_is_initialized():
        megatron_tsp.destroy_model_parallel()
    if layout == "tsp":
        return megatron_tsp.initialize_model_parallel(tsp_size=size)
    return megatron_tsp.initialize_native_model_parallel(tensor_model_parallel_size=size, context_parallel_size=cp)


def train(layout, size, cp=1, offload=False, fraction=1.0):
    """STEPS steps of a bf16 model on the distributed optimizer, the state offloaded or not.
    Returns (losses, {name: fp32 main weight of this rank's shard}, model, optimizer)."""
    pgs = _groups(layout, size, cp)
    model = build_gpt(SHAPE, layout=layout, dtype=torch.bfloat16, seed=SEED,
                      sequence_parallel=layout in ("tsp", "tp_sp"), core_attention="sdpa", pg_collection=pgs)
    ddp, opt = wrap_ddp_and_optimizer(model, lr=3e-3, clip_grad=0.5, weight_decay=0.01, use_distributed_optimizer=True,
                                      optimizer_cpu_offload=offload, optimizer_offload_fraction=fraction,
                                      pg_collection=pgs)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    cp_group = pgs.cp
    dp_rank, dp_size = pgs.dp.rank(), pgs.dp.size()
    recipe = Recipe(model=ModelRecipe(**vars(SHAPE)), parallel=ParallelRecipe(context_size=cp),
                    train=TrainRecipe(steps=STEPS, micro_batch_size=GLOBAL_BATCH // dp_size,
                                      global_batch_size=GLOBAL_BATCH, seed=SEED))
    dataset = build_train_dataset(recipe)
    losses = []
    for step in range(STEPS):
        batches = list(micro_batches(dataset, step, recipe, dp_rank, dp_size, torch.device("cpu"), cp_group))
        losses.append(train_step(ddp, opt, batches, recipe, pgs)[0])
    return losses, main_weights(model, opt), model, opt


def main_weights(model, optimizer):
    """{parameter name: the fp32 main weight of this rank's shard of it}: the host copy with the
    offload (HybridDeviceOptimizer's `master_param`), the distributed optimizer's own without."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for opt in optimizer.chained_optimizers:
        hdo = opt.optimizer if isinstance(opt.optimizer, HybridDeviceOptimizer) else None
        for model_group, shard_group, main_group in zip(opt.model_float16_groups, opt.shard_float16_groups,
                                                        opt.shard_fp32_from_float16_groups):
            for p, shard, main in zip(model_group, shard_group, main_group):
                out[names[p]] = (hdo.param_to_inner_param[shard] if hdo is not None else main).detach().float().clone()
    return out


def assert_same_training(got, ref, what):
    (loss_a, main_a), (loss_b, main_b) = got[:2], ref[:2]
    for step, (a, b) in enumerate(zip(loss_a, loss_b)):
        assert abs(a - b) <= LOSS_TOL * abs(b), f"{what}: loss at step {step + 1}: {a} vs {b}"
    assert main_a.keys() == main_b.keys()
    for name in main_b:
        err = (main_a[name] - main_b[name]).abs().max().item()
        assert err <= MAIN_TOL, f"{what}: fp32 main weight {name} differs by {err}"


# (layout, size, cp, the world it runs at): every layout at world 2 (dp: the optimizer sharded over
# 2 data-parallel ranks), tsp at D = 1 alone and at D = 2 beside data parallel 2 (CI's worlds 1, 2, 4)
LAYOUTS = [("tsp", 1, 1, 1), ("tsp", 2, 1, 2), ("tp_sp", 2, 1, 2), ("dp", 1, 1, 2), ("dp", 1, 2, 2),
           ("tsp", 2, 1, 4), pytest.param("tp", 2, 1, 2, marks=pytest.mark.slow)]


def _id(case):
    layout, size, cp, world = case.values if hasattr(case, "values") else case
    return f"{layout}{size}" + (f"_cp{cp}" if cp > 1 else "") + f"_world{world}"


@pytest.mark.parametrize("layout,size,cp,at_world", LAYOUTS, ids=[_id(c) for c in LAYOUTS])
def test_offload_trains_as_in_memory(world, layout, size, cp, at_world):
    if world != at_world:
        pytest.skip(f"runs at world {at_world}")
    ref = train(layout, size, cp)
    got = train(layout, size, cp, offload=True)
    assert_same_training(got, ref, f"{layout} {size} cp {cp} at world {world}")
    assert ref[0][-1] < ref[0][0]  # the steps did train
    _, _, model, opt = got
    (inner,) = [o for o in opt.chained_optimizers]
    hdo = inner.optimizer
    assert isinstance(hdo, HybridDeviceOptimizer) and hdo.gpu_optimizer is None and hdo.cpu_optimizers
    # No fp32 main weight on the device: the distributed optimizer keeps none, the host copies are
    # other tensors than the model's bf16 shards.
    assert all(main is None for group in inner.shard_fp32_from_float16_groups for main in group)
    shards = [s for group in inner.shard_float16_groups for s in group]
    assert sum(s.numel() for s in shards) == sum(p.numel() for p in hdo.param_to_inner_param.values())
    for shard in shards:
        state = hdo.state[shard]
        assert set(state) >= {"exp_avg", "exp_avg_sq", "master_param"}
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            t = state[key]
            assert t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() == shard.numel(), key
            assert t.untyped_storage().data_ptr() != shard.untyped_storage().data_ptr(), key
        grad = hdo.param_to_inner_param[shard].grad  # the host copy of the fp32 gradient shard
        assert grad.device.type == "cpu" and grad.dtype == torch.float32
        if torch.cuda.is_available():
            assert grad.is_pinned() and shard.is_cuda


def test_partial_offload_and_a_broken_offload(world, monkeypatch):
    if world > 2:
        pytest.skip("tsp D = 1 and 2 at worlds 1 and 2")
    D = world
    ref = train("tsp", D)
    half = train("tsp", D, offload=True, fraction=0.5)
    assert_same_training(half, ref, "half of the state offloaded")
    hdo = half[3].chained_optimizers[0].optimizer
    assert hdo.cpu_optimizers and hdo.gpu_optimizer is not None  # both halves in use
    # Broken: the host step's result never copied back into the model's weights.
    monkeypatch.setattr(HybridDeviceOptimizer, "_register_param_copy_back_gpu_hook", lambda self: None)
    broken = train("tsp", D, offload=True)
    with pytest.raises(AssertionError, match="loss at step 2"):
        assert_same_training(broken, ref, "broken offload")


def _resumed(D, recipe, offload, steps):
    """A fresh model and optimizer (other weights: another seed), the checkpoint loaded, `steps`
    more steps; their losses."""
    from megatron_tsp.training.checkpoint import load_checkpoint

    pgs = _groups("tsp", D)
    model = build_gpt(SHAPE, layout="tsp", dtype=torch.bfloat16, seed=SEED + 1, sequence_parallel=True,
                      pg_collection=pgs)
    ddp, opt = wrap_ddp_and_optimizer(model, lr=3e-3, clip_grad=0.5, weight_decay=0.01,
                                      use_distributed_optimizer=True, optimizer_cpu_offload=offload, pg_collection=pgs)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    assert load_checkpoint(model, opt, recipe, pg_collection=pgs) == steps
    r = Recipe(model=ModelRecipe(**vars(SHAPE)), train=TrainRecipe(micro_batch_size=GLOBAL_BATCH,
                                                                   global_batch_size=GLOBAL_BATCH, seed=SEED))
    dataset = build_train_dataset(r)
    return [train_step(ddp, opt, list(micro_batches(dataset, step, r, 0, 1, torch.device("cpu"), pgs.cp)), r, pgs)[0]
            for step in range(steps, 2 * steps)]


@pytest.mark.slow  # a checkpoint save and two loads: ~15 s
def test_resume_with_offload_is_exact(world, shared_tmp_path):
    """2 steps, save, 2 more == 4 straight, with the offload on (fully_reshardable format); the
    same checkpoint also resumes without the offload (the state is stored per parameter either way)."""
    from megatron_tsp.training.checkpoint import save_checkpoint

    if world > 2:
        pytest.skip("tsp D = 1 and 2 at worlds 1 and 2")
    global STEPS
    D = world
    path = [os.path.join(shared_tmp_path, "offload_resume")]
    dist.broadcast_object_list(path, src=0)
    recipe = Recipe(model=ModelRecipe(**{**vars(SHAPE), "dtype": "bfloat16"}), parallel=ParallelRecipe(size=D),
                    train=TrainRecipe(save_dir=path[0], distributed_optimizer=True, optimizer_cpu_offload=True))
    steps = STEPS
    try:
        STEPS = 2 * steps
        straight = train("tsp", D, offload=True)[0]
        STEPS = steps
        first, _, model, opt = train("tsp", D, offload=True)
        save_checkpoint(model, opt, recipe, steps, model.pg_collection)
        rest = _resumed(D, recipe, True, steps)
        in_memory = _resumed(D, recipe, False, steps)
    finally:
        STEPS = steps
    assert first + rest == straight  # bit for bit: the same host Adam, its state restored
    for a, b in zip(in_memory, rest):
        assert abs(a - b) <= LOSS_TOL * abs(b), (in_memory, rest)


def test_offload_keys_are_checked(world):
    base = ["model.dtype=bfloat16", "train.distributed_optimizer=true", "train.optimizer_cpu_offload=true"]
    for overrides, match in (
            (["model.dtype=float32"], r"optimizer_cpu_offload = true cannot be combined with model.dtype = float32"),
            (["train.distributed_optimizer=false"], r"with train.distributed_optimizer = false"),
            (["train.optimizer_offload_fraction=0"], r"optimizer_offload_fraction = 0.0 must be a number in \(0, 1\]"),
            (["train.host_memory_gb=-1"], r"train.host_memory_gb = -1.0 must be a positive number"),
            (["parallel.layout=dp", "train.distributed_optimizer=false", "parallel.fsdp=true"],
             r"with parallel.fsdp = true")):
        with pytest.raises(RecipeError, match=match):
            load_recipe(TINY, base + overrides).check(world, devices=False)
    pgs = _groups("tsp", 1)
    model = build_gpt(SHAPE, layout="tsp", seed=SEED, pg_collection=pgs)  # float32
    with pytest.raises(TSPConfigError, match="optimizer_cpu_offload = true cannot be combined with model.dtype"):
        wrap_ddp_and_optimizer(model, use_distributed_optimizer=True, optimizer_cpu_offload=True, pg_collection=pgs)


def test_host_memory_need_and_the_refusal(world, tmp_path):
    """The need per process by hand: 16 bytes per offloaded parameter of the rank's optimizer
    shard; the checkpointed inputs [S/D x b, h] per kept input. A node that cannot hold its
    processes' share is one RecipeError before the first step (the driver, every rank)."""
    from megatron_tsp.training.host_memory import GIB, HostMemoryError, check_host_memory, host_need_per_rank
    from megatron_tsp.training.loop import run

    recipe = load_recipe(TINY, ["model.dtype=bfloat16", "train.distributed_optimizer=true",
                                "train.optimizer_cpu_offload=true", "parallel.size=2", "parallel.recompute=full",
                                "parallel.offload_activations=true"])
    # 2 layers kept (uniform, 1 per checkpoint) x 2 sequences x 64 / 2 tokens x h 64 x 2 bytes
    assert host_need_per_rank(recipe, 1000, 2) == {"optimizer": 1000 / 2 * 16, "inputs": 2 * 2 * 32 * 64 * 2}
    recipe.train.optimizer_offload_fraction = 0.5
    assert host_need_per_rank(recipe, 1000, 1)["optimizer"] == 1000 * 0.5 * 16
    need = (8000 + 16384) * 4  # 4 processes per node
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {need // 1024 + 1} kB\nMemFree: 1 kB\n")
    assert check_host_memory(recipe, 1000, 1, 4, meminfo=str(meminfo)) == need
    meminfo.write_text(f"MemTotal:       {need // 1024 - 1} kB\n")
    with pytest.raises(HostMemoryError, match=r"need .* GiB of host memory per node \(4 processes x 7.45e-06 GiB "
                                              r"optimizer state \(train.optimizer_cpu_offload\) \+ 1.53e-05 GiB layer "
                                              r"inputs \(parallel.offload_activations\)\) but this node's MemTotal"):
        check_host_memory(recipe, 1000, 1, 4, meminfo=str(meminfo))
    recipe.train.host_memory_gb = need / GIB * 1.01  # the key wins over MemTotal
    assert check_host_memory(recipe, 1000, 1, 4, meminfo=str(meminfo)) == need

    # The driver, at this world: refused after the model is built, before the optimizer and step 1.
    with pytest.raises(RecipeError, match=r"layer inputs \(parallel.offload_activations\)\) but "
                                          r"train.host_memory_gb = 1e-06 GiB: offload less"):
        run(load_recipe(TINY, [f"parallel.size={min(world, 2)}", "parallel.recompute=full",  # tiny: 2 KV groups
                               "parallel.offload_activations=true",
                               "train.host_memory_gb=0.000001", "train.steps=1", "train.log_interval=100"]))
    pgs = _groups("tsp", 1)
    bf16 = build_gpt(SHAPE, layout="tsp", seed=SEED, dtype=torch.bfloat16, pg_collection=pgs)
    norm = bf16.decoder.final_layernorm.weight
    norm.data = norm.data.float()  # as a norm that keeps fp32 weights would
    with pytest.raises(TSPConfigError, match=r"bf16 parameters only: decoder.final_layernorm.weight \(and 0 more\)"):
        wrap_ddp_and_optimizer(bf16, use_distributed_optimizer=True, optimizer_cpu_offload=True, pg_collection=pgs)
