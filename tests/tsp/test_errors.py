"""Bad inputs at run time raise one clear error on every rank, before any collective
(a rank that went on into a broadcast would hang the test instead)."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_tsp import TSPConfigError
from megatron_tsp.tsp.attention import TSPSelfAttention
from megatron_tsp.baselines.specs import get_sp_layer_spec
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import init_tsp, tiny_config

pytestmark = pytest.mark.distributed  # runs under torchrun at every world size (scripts/test.sh N)


def test_bad_sequence_length_raises_on_every_rank(world):
    if world < 2:
        pytest.skip("needs D >= 2")
    D = world
    pgs = init_tsp(D)
    config = tiny_config(D)
    attn = TSPSelfAttention(config, get_sp_layer_spec(config).submodules.self_attention.submodules, layer_number=1, pg_collection=pgs)
    x = torch.randn(3, 2, 32, dtype=torch.float64)  # S = 3*D tokens: not a multiple of 2*D
    with pytest.raises(TSPConfigError, match=r"must be divisible by 2 x parallel.size = %d" % (2 * D)):
        attn(x, None)

    model = build_gpt(ModelShape(seq_length=32), layout="tsp", pg_collection=pgs)
    tokens = torch.randint(0, 128, (2, 30))
    with pytest.raises(TSPConfigError, match=r"sequence length of the batch = 30 must be divisible"):
        model(tokens, None, None, labels=tokens)
    with pytest.raises(TSPConfigError, match=r"packed sequences"):
        model(torch.randint(0, 128, (2, 32)), None, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
