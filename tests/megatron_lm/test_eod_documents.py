"""The models `pretrain_gpt.py --reset-attention-mask` builds (megatron_lm/build.py, with_eod_documents):
TSP's (`--tsp-size D`) and the TP + SP baseline's on SDPA (`--tsp-native-spec sdpa`). Given
Megatron-LM's batch (tokens, the dataset's restarted positions, no mask) each reads the documents from
the EOD tokens and equals Megatron's GPTModel run on each document alone (float64, per-token outputs
and every gradient, D = world); an off-by-one conversion is caught. No Megatron-LM tree needed
(tests/megatron_lm/test_megatron_lm_cpu.py runs the whole pretrain_gpt.py against Megatron's own mask)."""

import pytest
import torch
from megatron.core import parallel_state as mpu

from megatron_tsp import TSPConfigError
from megatron_tsp.training.build import build_gpt
from megatron_tsp.tsp import documents
from tests.parity import fresh_seed
from tests.training.test_packed_training import (LAYOUTS, SHAPES, _assert_match, _batch, _init, _outputs_and_grads,
                                                 documents_alone)


def _runner_model(kind, shape, seed, D):
    """The model of `pretrain_gpt.py --reset-attention-mask`: TSP's (`--tsp-size D`) or the native one on
    the SDPA spec (`--tsp-size 1 --tensor-model-parallel-size D --sequence-parallel --tsp-native-spec
    sdpa`), with the weights of build_gpt's."""
    from megatron.core.models.gpt import GPTModel

    from megatron_tsp.baselines.sdpa_attention import SDPACoreAttention
    from megatron_tsp.megatron_lm.build import with_eod_documents
    from megatron_tsp.tsp.model import TSPGPTModel
    from megatron_tsp.baselines.specs import get_sp_block_spec

    pgs = _init(kind, D)
    ref = build_gpt(shape, layout="tsp" if kind == "tsp" else "tp_sp", dtype=torch.float64, seed=seed,
                    core_attention="sdpa", pg_collection=pgs)
    kw = dict(vocab_size=shape.vocab_size, max_sequence_length=shape.seq_length,
              position_embedding_type=shape.position_embedding_type,
              share_embeddings_and_output_weights=shape.share_embeddings_and_output_weights,
              pg_collection=pgs, eod_id=shape.vocab_size - 1)
    if kind == "tsp":
        model = with_eod_documents(TSPGPTModel)(ref.config, None, tsp_options=ref.tsp_options, **kw)
    else:
        spec = get_sp_block_spec(ref.config, None, 0, core_attention=SDPACoreAttention)
        model = with_eod_documents(GPTModel)(ref.config, spec, **kw)
    assert type(model).__name__ == "EODDocuments" + type(ref).__name__
    model.load_state_dict(ref.state_dict())
    return model


def _run(kind, model, shape, seed, mask=None):
    tokens, _, pos, w = _batch(shape, seed, LAYOUTS)  # pos: restarted per document (--reset-position-ids)
    logits = model(tokens, pos, mask)
    v, r = logits.shape[-1], mpu.get_tensor_model_parallel_group().rank()
    per_token = (logits * w[..., r * v:(r + 1) * v]).sum(-1)
    per_token.sum().backward()
    return _outputs_and_grads(model, per_token, kind)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["tsp", "tp_sp"])
def test_runner_model_reads_the_documents_from_eod_tokens(world, kind, monkeypatch):
    shape, seed = SHAPES["gqa-rope"], fresh_seed()
    ref = documents_alone(shape, seed, LAYOUTS)
    model = _runner_model(kind, shape, seed, world)
    _assert_match(_run(kind, model, shape, seed), ref, seed, tol=1e-8)  # RoPE table rows: see test_packed_training
    # a boolean mask (a dataset that still builds Megatron's [b, 1, S, S] one) is replaced as well
    model.zero_grad()
    _assert_match(_run(kind, model, shape, seed, mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), ref, seed, tol=1e-8)
    with pytest.raises(TSPConfigError, match=r"--reset-attention-mask needs the tokens of the batch"):
        model(None, None, None)
    # the broken variant: the EOD opening the next document instead of closing its own
    monkeypatch.setattr(documents, "document_ids", lambda tokens, eod: torch.cumsum((tokens == eod).long(), dim=-1))
    model.zero_grad()
    with pytest.raises(AssertionError, match="relative errors above"):
        _assert_match(_run(kind, model, shape, seed), ref, seed, tol=1e-8)
