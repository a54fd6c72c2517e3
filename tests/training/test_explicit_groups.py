"""The driver's build and train step read no Megatron global group: DDP, the optimizer,
finalize_model_grads, the schedule and the loss take the ProcessGroupCollection built once.

After the groups are built, every group / rank / world-size getter of
`megatron.core.parallel_state` (and every copy of one imported into another megatron module) and
`ProcessGroupCollection.use_mpu_process_groups` (a collection made from those getters: the fallback
of every megatron-core module handed none) are replaced by ones that raise "global group read:
<name>"; the driver's `build` and two `train_step`s must then run, in every layout (TSP, DP, TP,
TP + SP, CP with either exchange, FSDP over CP, TP + SP x CP, pipelines, MoE with EP under TSP and
TP + SP), and give the unpatched run's losses and grad norms exactly; so must checkpoint save /
load and generation. Each wiring removed in turn (DDP, optimizer, finalize_model_grads, schedule
without their `pg_collection`, a model built on a collection read from the globals) must be caught.
Every entry point refuses a missing collection by name.

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
from megatron.core.process_groups_config import ProcessGroupCollection

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
    # 0.19's GTP readers above build their collection with use_mpu_process_groups(required_pgs=[GTP
    # groups only]): exempt for those groups alone
    "use_mpu_process_groups": _GTP_READERS,
}
_GTP_GROUPS = {"gtp_remat", "expt_gtp_remat"}

_GETTER = re.compile(r"^(get_\w*(group|groups|group_gloo|world_size|rank|ranks)|is_pipeline_(first|last)_stage"
                     r"|is_rank_in_\w+|get_\w+_src_rank)$")


def _getters():
    return {name: fn for name, fn in vars(mpu).items() if _GETTER.match(name) and isinstance(fn, types.FunctionType)}


def _exempt(name, depth=2) -> bool:
    readers = GLOBAL_READS_LEFT.get(name, ())
    frame = sys._getframe(depth)
    while frame is not None:
        if frame.f_code.co_qualname in readers and frame.f_globals.get("__name__", "").startswith("megatron.core"):
            return True
        frame = frame.f_back
    return False


def _forbid_global_reads(monkeypatch):
    """Every global group getter raises (but for GLOBAL_READS_LEFT), in parallel_state and
    wherever a megatron module imported one by name; so does a collection built from them."""
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
    real_collect = ProcessGroupCollection.use_mpu_process_groups

    def use_mpu_process_groups(cls, required_pgs=None):
        if required_pgs is not None and set(required_pgs) <= _GTP_GROUPS and _exempt("use_mpu_process_groups", 1):
            return real_collect(required_pgs=required_pgs)
        raise AssertionError("global group read: ProcessGroupCollection.use_mpu_process_groups")
    monkeypatch.setattr(ProcessGroupCollection, "use_mpu_process_groups", classmethod(use_mpu_process_groups))


def _two_steps(recipe, monkeypatch=None):
    """The driver's groups, build and two train steps (groups forbidden after they are built
    when `monkeypatch` is given). Returns [(loss, grad norm)] per step."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # a fresh process's scale (see test_moe_train)
    pgs = loop.init_groups(recipe)
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


MOE = ["model.hidden_size=32", "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32"]
RUNS = {  # name: (recipe, overrides, world sizes): every layout of the recipe (training.recipe.LAYOUTS)
    "tsp2-distopt": (TINY, ["parallel.size=2", "train.distributed_optimizer=true"], (2, 4)),
    "tsp1-pp2-tied": (TINY, ["parallel.size=1", "parallel.pipeline_size=2", "train.distributed_optimizer=true",
                             "model.share_embeddings_and_output_weights=true"], (2, 4)),
    "tsp2-ep2-moe-distopt": (TINY_MOE, ["parallel.size=2", "parallel.expert_size=2", "train.distributed_optimizer=true",
                                        *MOE], (2, 4)),
    "dp": (TINY, ["parallel.layout=dp", "parallel.size=1"], (2,)),
    "dp-pp2": (TINY, ["parallel.layout=dp", "parallel.size=1", "parallel.pipeline_size=2"], (2,)),
    "tp2": (TINY, ["parallel.layout=tp", "parallel.size=2"], (2,)),
    "tp_sp2-distopt": (TINY, ["parallel.layout=tp_sp", "parallel.size=2", "train.distributed_optimizer=true"], (2,)),
    "tp_sp2-moe": (TINY_MOE, ["parallel.layout=tp_sp", "parallel.size=2", "parallel.expert_size=1", *MOE], (2,)),
    "cp2-fsdp": (TINY, ["parallel.layout=dp", "parallel.size=1", "parallel.context_size=2", "parallel.fsdp=true"], (2,)),
    "cp2-p2p-distopt": (TINY, ["parallel.layout=dp", "parallel.size=1", "parallel.context_size=2",
                               "parallel.cp_comm_type=p2p", "train.distributed_optimizer=true"], (2,)),
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


def _model_on_the_global_groups(monkeypatch):
    """The model built on a collection read from Megatron's globals (the old `tsp_process_groups()`
    fallback) instead of the one handed down."""
    from megatron_tsp.training import build

    real = build.build_gpt

    def on_globals(*args, pg_collection, **kwargs):
        return real(*args, pg_collection=ProcessGroupCollection.use_mpu_process_groups(), **kwargs)
    monkeypatch.setattr(build, "build_gpt", on_globals)


BROKEN = {  # name: (the breakage, the read that catches it)
    "ddp": (lambda mp: _drop_group_kwarg(mp, "ddp_group_kwargs"), "get_"),
    "optimizer": (lambda mp: _drop_group_kwarg(mp, "optimizer_group_kwargs"), "get_"),
    "schedule": (lambda mp: _drop_group_kwarg(mp, "schedule_group_kwargs"), "get_"),
    "finalize_model_grads": (_finalize_without_groups, "get_"),
    "model_on_the_global_groups": (_model_on_the_global_groups, "ProcessGroupCollection.use_mpu_process_groups"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_missing_pg_collection_is_caught(world, broken, monkeypatch):
    """Test of the test: each of the driver's hand-overs removed, the patched getters catch it."""
    if world != 2:
        pytest.skip("once, at world 2")
    recipe = load_recipe(TINY, COMMON + ["parallel.size=2", "train.distributed_optimizer=true"])
    breakage, read = BROKEN[broken]
    breakage(monkeypatch)
    with pytest.raises(AssertionError, match=f"global group read: {read}"):
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
    fully_reshardable state) and `generate`'s load on the groups handed to them: the model's
    sharded state dict takes the data x context group in its metadata."""
    import tempfile

    import torch.distributed as dist

    from megatron_tsp.inference import cli
    from megatron_tsp.training import checkpoint

    if world != 2:
        pytest.skip("once, at world 2")
    path = [tempfile.mkdtemp(prefix="tsp_groups_", dir=shared_tmp_path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    recipe = load_recipe(TINY, COMMON + ["parallel.size=2", "train.distributed_optimizer=true", f"train.save_dir={path[0]}"])
    pgs = loop.init_groups(recipe)
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
    generating = dict(cli.build_and_load(recipe, path[0], pgs).named_parameters())
    assert generating.keys() == saved.keys() and all(torch.equal(generating[n], saved[n]) for n in saved)


def test_generate_reads_no_global_group(world, monkeypatch):
    """`megatron-tsp generate`'s path (build_and_load, TSP prefill, the K/V cache exchange,
    tensor-parallel decode; log-probabilities) on the groups handed to it: the unpatched run's
    tokens and log-probabilities exactly."""
    from megatron_tsp.inference import cli
    from megatron_tsp.inference.decode import generate, logprobs

    if world != 2:
        pytest.skip("once, at world 2")
    recipe = load_recipe(TINY, COMMON + ["parallel.size=2"])
    prompts = [[3, 5, 7, 9, 11], [2, 4, 6]]

    def run(forbid: bool):
        pgs = loop.init_groups(recipe)
        if forbid:
            _forbid_global_reads(monkeypatch)
        model = cli.build_and_load(recipe, None, pgs)
        return generate(model, prompts, 3).tokens, logprobs(model, prompts, [[1, 2], [3]])

    reference = run(False)
    assert run(True) == reference


def test_every_entry_point_requires_its_groups(world):
    """`pg_collection` is required everywhere: left out, Python's TypeError names it; None, one
    TSPConfigError naming it, before anything else (no collective, no directory made)."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tsp.baselines.context_parallel import ContextParallelAttention
    from megatron_tsp.baselines.sdpa_attention import SDPACoreAttention
    from megatron_tsp.config import ModelShape, TSPConfigError
    from megatron_tsp.inference import cli
    from megatron_tsp.training import checkpoint
    from megatron_tsp.training.build import build_gpt, wrap_ddp_and_optimizer
    from megatron_tsp.tsp.moe import TSPSharedExpertMLP, TSPTopKRouter
    from tests.utils import tiny_config

    recipe, config = load_recipe(TINY, COMMON + ["train.save_dir=/nonexistent/tsp_groups"]), tiny_config(1)
    calls = {
        "build_gpt": lambda **g: build_gpt(ModelShape(seq_length=32), **g),
        "wrap_ddp_and_optimizer": lambda **g: wrap_ddp_and_optimizer(None, **g),
        "build": lambda **g: loop.build(recipe, **g),
        "train_step": lambda **g: loop.train_step(None, None, [], recipe, **g),
        "save_checkpoint": lambda **g: checkpoint.save_checkpoint(None, None, recipe, 1, **g),
        "load_checkpoint": lambda **g: checkpoint.load_checkpoint(None, None, recipe, **g),
        "build_and_load": lambda **g: cli.build_and_load(recipe, None, **g),
        "TSPTopKRouter": lambda **g: TSPTopKRouter(config, **g),
        "TSPSharedExpertMLP": lambda **g: TSPSharedExpertMLP(config, None, **g),
        "SDPACoreAttention": lambda **g: SDPACoreAttention(config, 1, AttnMaskType.causal, "self", **g),
        "ContextParallelAttention": lambda **g: ContextParallelAttention(config, 1, AttnMaskType.causal, "self", **g),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="pg_collection"):
            call()
        with pytest.raises(TSPConfigError, match="needs its process group passed explicitly as `pg_collection`"):
            call(pg_collection=None)
    assert not os.path.exists("/nonexistent/tsp_groups")


def test_a_collection_missing_a_group_is_an_error_naming_it(world):
    """A collection without a group Megatron's part needs: one TSPConfigError naming it (not
    megatron-core 0.16.1's assertion or DDP's silently made single-rank expt_dp group)."""
    from megatron_tsp.config import TSPConfigError, require_groups

    full = loop.init_groups(load_recipe(TINY, COMMON + [f"parallel.size={world}"]))
    for names, what in ((compat.DDP_GROUPS, "DistributedDataParallel"), (compat.OPTIMIZER_GROUPS, "get_megatron_optimizer"),
                        (compat.FINALIZE_GROUPS, "finalize_model_grads"), (compat.SCHEDULE_GROUPS, "the schedule")):
        assert require_groups(full, names, what) is full
        partial = ProcessGroupCollection(**{n: getattr(full, n) for n in names[1:]})
        with pytest.raises(TSPConfigError, match=rf"{what}: `pg_collection` lacks the group\(s\) {names[0]} "):
            require_groups(partial, names, what)
    with pytest.raises(TSPConfigError, match="needs its process group passed explicitly as `pg_collection`"):
        require_groups(None, compat.DDP_GROUPS, "DistributedDataParallel")
