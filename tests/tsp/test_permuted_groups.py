"""Groups explicit: the whole TSP GPT model on TSP groups that are NOT Megatron's TP groups.

At world 4 Megatron's global TP group is the default contiguous one ({0,1},{2,3} at D=2;
[0,1,2,3] at D=4) while the model is built on permuted groups ({0,2},{1,3}; ranks in the order
3,1,0,2), passed as `pg_collection`. Loss and every gradient must match the unsharded model
(float64): any module that reads Megatron's global group instead of its argument holds the wrong
token chunks or weight shards and breaks the match, which the test of the test shows."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_tsp.training.build import ModelShape, build_gpt
from megatron_tsp.tsp.attention import TSPSelfAttention
from megatron_tsp.tsp.mlp import TSPMLP
from tests.parity import fresh_seed
from tests.tsp.test_lm_head import megatron_ce_in_float64  # noqa: F401  (fixture: the reference's CE in float64)
from tests.utils import gather_full, init_tsp, mock_batch, rel_err, sum_sequence_parallel_grads

pytestmark = pytest.mark.distributed  # runs under torchrun; needs world 4 (skips elsewhere)

TOL = 1e-10  # float64
PERMUTED = {2: [[0, 2], [1, 3]], 4: [[3, 1, 0, 2]]}  # group rank i = global rank ranks[i]
SHAPES = {
    "mha": ModelShape(seq_length=32, hidden_size=32, ffn_hidden_size=64, vocab_size=64),
    "gqa-tied": ModelShape(seq_length=32, hidden_size=32, ffn_hidden_size=64, vocab_size=64, num_attention_heads=8,
                           num_query_groups=4, share_embeddings_and_output_weights=True),
}
_GROUPS = {}


def permuted_group(D):
    """This rank's permuted TSP group of size D (every rank creates every group, once, in order)."""
    if D not in _GROUPS:
        mine = None
        for ranks in PERMUTED[D]:
            group = dist.new_group(ranks, sort_ranks=False)
            if dist.get_rank() in ranks:
                mine = group
        assert dist.get_process_group_ranks(mine) == next(r for r in PERMUTED[D] if dist.get_rank() in r)
        _GROUPS[D] = mine
    return _GROUPS[D]


def permuted_collection(base: ProcessGroupCollection, D) -> ProcessGroupCollection:
    """`base` (the collection initialize_model_parallel returned) with the TSP slot (tp, and tp_cp
    / mp, which are the same ranks at CP = PP = 1) replaced by the permuted group."""
    present = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if hasattr(base, f.name)}
    group = permuted_group(D)
    return ProcessGroupCollection(**{**present, "tp": group, "tp_cp": group, "mp": group})


def _loss_and_grads(layout, D, shape, seed):
    base = init_tsp(D)  # Megatron's groups: contiguous TP of size D
    pgs = permuted_collection(base, D) if layout == "tsp" else base
    assert layout != "tsp" or dist.get_process_group_ranks(pgs.tp) != dist.get_process_group_ranks(
        mpu.get_tensor_model_parallel_group()), "the TSP group must differ from Megatron's TP group"
    model = build_gpt(shape, layout=layout, dtype=torch.float64, seed=seed, pg_collection=pgs)
    tokens, labels, pos = mock_batch(0, 2, shape, seed=seed)
    loss = model(tokens, pos, None, labels=labels)  # [b, S], natural order on every rank
    loss.mean().backward()
    sum_sequence_parallel_grads(model, pgs.tp)
    grads = {n: gather_full(p.grad, p, pgs.tp) for n, p in model.named_parameters()}
    return loss.detach(), grads


def _errors(D, name):
    """Worst relative error over the loss and every gradient, the same on every rank."""
    shape, seed = SHAPES[name], fresh_seed()
    ref_loss, ref_grads = _loss_and_grads("tp_sp", 1, shape, seed)
    loss, grads = _loss_and_grads("tsp", D, shape, seed)
    assert grads.keys() == ref_grads.keys()
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
    errors = {"loss": rel_err(loss, ref_loss), **{n: rel_err(grads[n], ref_grads[n]) for n in grads}}
    vals = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(errors, vals.tolist())), seed


def _skip_unless_world_4(world):
    if world != 4:
        pytest.skip(f"permuted TSP groups need world 4 (here {world})")


@pytest.mark.parametrize("D", [2, 4])
@pytest.mark.parametrize("name", list(SHAPES))
def test_gpt_on_permuted_tsp_groups_matches_unsharded(world, D, name, megatron_ce_in_float64):
    _skip_unless_world_4(world)
    errors, seed = _errors(D, name)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"D={D} {name} on groups {PERMUTED[D]} differs from the unsharded model (seed {seed}): {bad}"


def _attention_reads_global_group(monkeypatch):
    init = TSPSelfAttention.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.tsp_group = mpu.get_tensor_model_parallel_group()

    monkeypatch.setattr(TSPSelfAttention, "__init__", patched)


def _mlp_reads_global_group(monkeypatch):
    init = TSPMLP.__init__

    def patched(self, config, submodules, *args, tp_group=None, **kwargs):
        init(self, config, submodules, *args, tp_group=mpu.get_tensor_model_parallel_group(), **kwargs)

    monkeypatch.setattr(TSPMLP, "__init__", patched)


@pytest.mark.parametrize("D,broken", [(2, _mlp_reads_global_group), (4, _attention_reads_global_group)],
                         ids=["D2-mlp", "D4-attention"])
def test_permuted_groups_catch_a_module_reading_the_global_group(world, D, broken, monkeypatch, megatron_ce_in_float64):
    """Test of the test: one module on Megatron's global TP group (the old fallback) fails it."""
    _skip_unless_world_4(world)
    broken(monkeypatch)
    errors, seed = _errors(D, "mha")
    assert max(errors.values()) > 1e-3, f"a module on the global group went unnoticed (seed {seed}): {errors}"


def test_a_missing_group_is_an_error_naming_the_argument():
    """No module falls back to Megatron's global groups: without its group it refuses, by name."""
    from megatron_tsp.config import TSPConfigError
    from megatron_tsp.tsp.model import TSPGPTModel
    from megatron_tsp.baselines.specs import get_sp_layer_spec
    from megatron_tsp.tsp.specs import get_tsp_block_spec, get_tsp_layer_spec
    from megatron_tsp import compat
    from tests.utils import tiny_config

    pgs = init_tsp(1)
    config = tiny_config(1)
    spec = get_sp_layer_spec(config).submodules
    with pytest.raises(TSPConfigError, match="`pg_collection`"):
        TSPGPTModel(config, vocab_size=64, max_sequence_length=32)
    with pytest.raises(TSPConfigError, match="`pg_collection.pp`"):  # its layers' stage: never the global one
        TSPGPTModel(config, vocab_size=64, max_sequence_length=32, pg_collection=ProcessGroupCollection(tp=pgs.tp))
    with pytest.raises(TSPConfigError, match="`pg_collection`"):
        TSPSelfAttention(config, spec.self_attention.submodules, layer_number=1)
    with pytest.raises(TSPConfigError, match="`tp_group`"):
        TSPMLP(config, compat.mlp_submodules(spec.mlp))
    with pytest.raises(TSPConfigError, match="`tsp_group`"):
        get_tsp_layer_spec(config, None)
    with pytest.raises(TSPConfigError, match="`pp_rank`"):  # Megatron would read its global pipeline rank
        get_tsp_block_spec(config, tsp_group=pgs.tp)
