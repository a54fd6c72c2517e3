"""Whole-model parity: TSPGPTModel at D = 2, 4 against Megatron's native GPTModel at D = 1
with the same weights (float32): per-token loss and every parameter gradient."""

import pytest
from megatron.core import parallel_state as mpu

from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import mock_batch
from tests.parity import fresh_seed
from tests.utils import gather_full, init_tsp, rel_err, skip_unless_divides, sum_sequence_parallel_grads

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)

TOL = 1e-5


def _loss_and_grads(layout, D, shape, seed):
    model = build_gpt(shape, layout=layout, seed=seed, pg_collection=init_tsp(D))
    tokens, labels, pos = mock_batch(0, 2, shape, seed=seed)
    loss = model(tokens, pos, None, labels=labels)  # [b, S], natural order on every rank
    loss.mean().backward()
    group = mpu.get_tensor_model_parallel_group()
    sum_sequence_parallel_grads(model, group)
    grads = {n: gather_full(p.grad, p, group) for n, p in model.named_parameters()}
    return loss.detach(), grads


SHAPES = {
    "rope-mha": ModelShape(seq_length=32),
    "rope-gqa-tied": ModelShape(seq_length=32, num_attention_heads=8, num_query_groups=4, share_embeddings_and_output_weights=True),
    "learned-abs-gelu-bias": ModelShape(seq_length=32, position_embedding_type="learned_absolute", swiglu=False,
                                        add_bias_linear=True, normalization="LayerNorm"),
}


@pytest.mark.parametrize("D", [2, 4])
@pytest.mark.parametrize("name", list(SHAPES))
def test_gpt_loss_and_every_gradient_match_unsharded(world, D, name):
    skip_unless_divides(world, D)
    shape, seed = SHAPES[name], fresh_seed()
    ref_loss, ref_grads = _loss_and_grads("tp_sp", 1, shape, seed)
    loss, grads = _loss_and_grads("tsp", D, shape, seed)
    assert loss.shape == ref_loss.shape == (2, shape.seq_length)
    assert rel_err(loss, ref_loss) <= TOL, f"loss differs (seed {seed})"
    assert grads.keys() == ref_grads.keys()
    bad = {n: rel_err(grads[n], ref_grads[n]) for n in grads if not rel_err(grads[n], ref_grads[n]) <= TOL}
    assert not bad, f"gradients differ (seed {seed}): {bad}"
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
