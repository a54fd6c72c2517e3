"""The driver's build and train step read no Megatron global group: DDP, the optimizer,
finalize_model_grads, the schedule and the loss take the ProcessGroupCollection built once.

After the groups are built, every group / rank / world-size getter of
`megatron.core.parallel_state` (and every copy of one imported into another megatron module) is
replaced by one that raises "global group read: <name>"; the driver's `build` and two
`train_step`s must then run and give the unpatched run's losses and grad norms exactly. Each
wiring removed in turn (DDP, optimizer, finalize_model_grads, schedule without their
`pg_collection`) must be caught.

Exempt, by name, only the reads Megatron makes whatever it is given (docs/architecture.md,
'process groups'): `GLOBAL_READS_LEFT`.
"""

import os
import re
import sys
import types

import pytest
import torch
from megatron.core import parallel_state as mpu

from megatron_tsp import compat
from megatron_tsp.training import loop
from megatron_tsp.training.recipe import load_recipe

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
TINY_MOE = os.path.join(REPO, "configs", "tiny_moe.yaml")
COMMON = ["train.steps=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.seq_length=32",
          "train.log_interval=100"]

# The reads Megatron makes whatever it is handed: {getter: the Megatron functions (qualified
# names) that make them}. A read is exempt only from inside one of its functions (a megatron.core
# frame of the call stack), so the same getter read from anywhere else still fails.
# - megatron-core 0.19, GTP weight rematerialization (never on here): every
#   `ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding.__init__` builds a
#   collection of the global GTP groups (`use_mpu_process_groups(required_pgs=["gtp_remat",
#   "expt_gtp_remat"])`, no argument carries them); `model_parallel_cuda_manual_seed` seeds its
#   GTP RNG streams from the global GTP ranks; the optimizer's grad-norm filter
#   `param_is_not_gtp_duplicate` reads them per parameter; finalize_model_grads'
#   `_allreduce_replicated_grads_over_gtp_remat_group` builds its own collection from them.
# - both versions: `RowParallelLinear.forward` calls
#   `linear_with_grad_accumulation_and_async_allreduce` with `tp_group=None` (neither
#   allreduce_dgrad nor sequence_parallel: the global TP group is looked up and never used).
# - megatron-core 0.16.1, native layouts only (TSP has its own LM head): `GPTModel`'s loss calls
#   `vocab_parallel_cross_entropy`, which takes no group and reads the global TP group.
_GTP_READERS = ("ColumnParallelLinear.__init__", "RowParallelLinear.__init__", "VocabParallelEmbedding.__init__",
                "model_parallel_cuda_manual_seed", "param_is_not_gtp_duplicate",
                "_allreduce_replicated_grads_over_gtp_remat_group")
_TP_READERS = ("linear_with_grad_accumulation_and_async_allreduce", "vocab_parallel_cross_entropy")
GLOBAL_READS_LEFT = {
    **{name: _GTP_READERS for name in ("get_gtp_weight_remat_group", "get_gtp_weight_remat_rank",
                                       "get_gtp_weight_remat_world_size", "get_expert_gtp_weight_remat_group",
                                       "get_expert_gtp_weight_remat_rank", "get_expert_gtp_weight_remat_world_size")},
    "get_tensor_model_parallel_group": _TP_READERS,
    "get_tensor_model_parallel_rank": _TP_READERS[1:],
    "get_tensor_model_parallel_world_size": _TP_READERS[1:],
}

_GETTER = re.compile(r"^(get_\w*(group|groups|group_gloo|world_size|rank|ranks)|is_pipeline_(first|last)_stage"
                     r"|is_rank_in_\w+|get_\w+_src_rank)$")


def _getters():
    return {name: fn for name, fn in vars(mpu).items() if _GETTER.match(name) and isinstance(fn, types.FunctionType)}


def _exempt(name) -> bool:
    readers = GLOBAL_READS_LEFT.get(name, ())
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_qualname in readers and frame.f_globals.get("__name__", "").startswith("megatron.core"):
            return True
        frame = frame.f_back
    return False


def _forbid_global_reads(monkeypatch):
    """Every global group getter raises (but for GLOBAL_READS_LEFT), in parallel_state and
    wherever a megatron module imported one by name."""
    originals = _getters()
    assert len(originals) > 40, sorted(originals)  # the patch reaches Megatron's getters
    by_id = {id(fn): name for name, fn in originals.items()}

    def refusing(name, real):
        def read(*args, **kwargs):
            if _exempt(name):
                return real(*args, **kwargs)
            raise AssertionError(f"global group read: {name}")
        return read

    for modname, module in list(sys.modules.items()):
        if module is None or not modname.startswith(("megatron.", "megatron_tsp")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, types.FunctionType) and id(value) in by_id and value is originals[by_id[id(value)]]:
                monkeypatch.setattr(module, attr, refusing(by_id[id(value)], value))


def _two_steps(recipe, monkeypatch=None):
    """The driver's groups, build and two train steps (groups forbidden after they are built
    when `monkeypatch` is given). Returns [(loss, grad norm)] per step."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_tsp.parallel_state import tsp_process_groups

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # a fresh process's scale (see test_moe_train)
    loop.init_groups(recipe)
    pgs = tsp_process_groups()
    dataset = loop.build_train_dataset(recipe)
    if monkeypatch is not None:
        _forbid_global_reads(monkeypatch)
    model, ddp, optimizer = loop.build(recipe, pgs)
    out = []
    for step in range(recipe.train.steps):
        batches = list(loop.micro_batches(dataset, step, recipe, pgs.dp.rank(), pgs.dp.size(), torch.device("cpu"), pgs.cp))
        out.append(loop.train_step(ddp, optimizer, batches, recipe, pgs))
        if recipe.model.num_experts:
            from megatron_tsp.tsp.moe import moe_step_metrics

            moe_step_metrics(model, len(batches), pgs)
    return out


RUNS = {  # name: (recipe, overrides, world sizes)
    "tsp2-distopt": (TINY, ["parallel.size=2", "train.distributed_optimizer=true"], (2, 4)),
    "tsp1-pp2-tied": (TINY, ["parallel.size=1", "parallel.pipeline_size=2", "train.distributed_optimizer=true",
                             "model.share_embeddings_and_output_weights=true"], (2, 4)),
    "tsp2-ep2-moe-distopt": (TINY_MOE, ["parallel.size=2", "parallel.expert_size=2", "train.distributed_optimizer=true",
                                        "model.hidden_size=32", "model.moe_ffn_hidden_size=32",
                                        "model.moe_shared_expert_intermediate_size=32"], (2, 4)),
    "cp2-fsdp": (TINY, ["parallel.layout=dp", "parallel.size=1", "parallel.context_size=2", "parallel.fsdp=true"], (2,)),
    "tp2-cp2-distopt": (TINY, ["parallel.layout=tp_sp", "parallel.size=2", "parallel.context_size=2",
                               "train.distributed_optimizer=true"], (4,)),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_driver_reads_no_global_group(world, name, monkeypatch):
    path, overrides, worlds = RUNS[name]
    if world not in worlds:
        pytest.skip(f"{name} runs at world sizes {worlds}")
    recipe = load_recipe(path, COMMON + overrides)
    reference = _two_steps(recipe)
    got = _two_steps(recipe, monkeypatch)
    assert got == reference  # bit for bit


def _drop_group_kwarg(monkeypatch, adapter):
    real = getattr(compat, adapter)

    def without_pg_collection(*args, **kwargs):
        out = dict(real(*args, **kwargs))
        out.pop("pg_collection")
        out.pop("p2p_communicator", None)
        out.pop("use_gloo_process_groups", None)
        return out
    monkeypatch.setattr(compat, adapter, without_pg_collection)


def _finalize_without_groups(monkeypatch):
    """finalize_model_grads run without its groups. (Unbinding the partial alone is not enough:
    both versions' schedules pass their own `pg_collection` to config.finalize_model_grads_func.)"""
    from megatron.core.distributed import finalize_model_grads

    def without_pg_collection(model, num_tokens=None, pg_collection=None, **kwargs):
        return finalize_model_grads(model, num_tokens, **kwargs)
    monkeypatch.setattr(compat, "finalize_model_grads_func", lambda pgs: without_pg_collection)


BROKEN = {
    "ddp": lambda mp: _drop_group_kwarg(mp, "ddp_group_kwargs"),
    "optimizer": lambda mp: _drop_group_kwarg(mp, "optimizer_group_kwargs"),
    "schedule": lambda mp: _drop_group_kwarg(mp, "schedule_group_kwargs"),
    "finalize_model_grads": _finalize_without_groups,
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_missing_pg_collection_is_caught(world, broken, monkeypatch):
    """Test of the test: each of the driver's hand-overs removed, the patched getters catch it."""
    if world != 2:
        pytest.skip("once, at world 2")
    recipe = load_recipe(TINY, COMMON + ["parallel.size=2", "train.distributed_optimizer=true"])
    BROKEN[broken](monkeypatch)
    with pytest.raises(AssertionError, match="global group read: get_"):
        _two_steps(recipe, monkeypatch)


def test_exempt_reads_name_getters_that_exist():
    """An exemption for a getter this megatron-core lacks exempts nothing; one for a getter it
    has is listed in docs/architecture.md."""
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        doc = f.read()
    for name, readers in GLOBAL_READS_LEFT.items():
        assert name in doc and all(r in doc for r in readers), name


def test_checkpoint_save_and_load_read_no_global_group(world, shared_tmp_path, monkeypatch):
    """The driver's save and load (Megatron dist-checkpointing, the distributed optimizer's
    fully_reshardable state) on the groups handed to them: the model's sharded state dict takes
    the data x context group in its metadata."""
    import tempfile

    import torch.distributed as dist

    from megatron_tsp.parallel_state import tsp_process_groups
    from megatron_tsp.training import checkpoint

    if world != 2:
        pytest.skip("once, at world 2")
    path = [tempfile.mkdtemp(prefix="tsp_groups_", dir=shared_tmp_path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    recipe = load_recipe(TINY, COMMON + ["parallel.size=2", "train.distributed_optimizer=true", f"train.save_dir={path[0]}"])
    loop.init_groups(recipe)
    pgs = tsp_process_groups()
    dataset = loop.build_train_dataset(recipe)
    _forbid_global_reads(monkeypatch)
    model, ddp, optimizer = loop.build(recipe, pgs)
    batches = list(loop.micro_batches(dataset, 0, recipe, pgs.dp.rank(), pgs.dp.size(), torch.device("cpu"), pgs.cp))
    loop.train_step(ddp, optimizer, batches, recipe, pgs)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    checkpoint.save_checkpoint(model, optimizer, recipe, 1, pgs)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert checkpoint.load_checkpoint(model, optimizer, recipe, pg_collection=pgs) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n


def test_a_collection_missing_a_group_is_an_error_naming_it(world):
    """A collection without a group Megatron's part needs: one TSPConfigError naming it (not
    megatron-core 0.16.1's assertion or DDP's silently made single-rank expt_dp group)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_tsp.config import TSPConfigError, require_groups
    from megatron_tsp.parallel_state import tsp_process_groups

    loop.init_groups(load_recipe(TINY, COMMON + [f"parallel.size={world}"]))
    full = tsp_process_groups()
    for names, what in ((compat.DDP_GROUPS, "DistributedDataParallel"), (compat.OPTIMIZER_GROUPS, "get_megatron_optimizer"),
                        (compat.FINALIZE_GROUPS, "finalize_model_grads"), (compat.SCHEDULE_GROUPS, "the schedule")):
        assert require_groups(full, names, what) is full
        partial = ProcessGroupCollection(**{n: getattr(full, n) for n in names[1:]})
        with pytest.raises(TSPConfigError, match=rf"{what}: `pg_collection` lacks the group\(s\) {names[0]} "):
            require_groups(partial, names, what)
    with pytest.raises(TSPConfigError, match="needs its process group passed explicitly as `pg_collection`"):
        require_groups(None, compat.DDP_GROUPS, "DistributedDataParallel")
