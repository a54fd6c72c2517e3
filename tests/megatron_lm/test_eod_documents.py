"""The model `pretrain_gpt.py --tsp-size D --reset-attention-mask` builds (megatron_lm/build.py,
EODDocumentsGPTModel): given Megatron-LM's batch (tokens, the dataset's restarted positions, no
mask) it reads the documents from the EOD tokens and equals Megatron's GPTModel run on each
document alone (float64, per-token outputs and every gradient, D = world); an off-by-one
conversion is caught. No Megatron-LM tree needed (tests/megatron_lm/test_megatron_lm_cpu.py runs
the whole pretrain_gpt.py against Megatron's own mask)."""

import pytest
import torch
from megatron.core import parallel_state as mpu

from megatron_tsp import TSPConfigError
from megatron_tsp.training.build import build_gpt
from megatron_tsp.tsp import documents
from tests.parity import fresh_seed
from tests.training.test_packed_training import (LAYOUTS, SHAPES, _assert_match, _batch, _outputs_and_grads,
                                                 documents_alone)
from tests.utils import init_tsp


def _runner_model(shape, seed, D):
    from megatron_tsp.megatron_lm.build import EODDocumentsGPTModel

    pgs = init_tsp(D)
    ref = build_gpt(shape, layout="tsp", dtype=torch.float64, seed=seed)
    model = EODDocumentsGPTModel(ref.config, None, vocab_size=shape.vocab_size, max_sequence_length=shape.seq_length,
                                 position_embedding_type=shape.position_embedding_type,
                                 share_embeddings_and_output_weights=shape.share_embeddings_and_output_weights,
                                 pg_collection=pgs, tsp_options=ref.tsp_options, eod_id=shape.vocab_size - 1)
    model.load_state_dict(ref.state_dict())
    return model


def _run(model, shape, seed, mask=None):
    tokens, _, pos, w = _batch(shape, seed, LAYOUTS)  # pos: restarted per document (--reset-position-ids)
    logits = model(tokens, pos, mask)
    v, r = logits.shape[-1], mpu.get_tensor_model_parallel_group().rank()
    per_token = (logits * w[..., r * v:(r + 1) * v]).sum(-1)
    per_token.sum().backward()
    return _outputs_and_grads(model, per_token, "tsp")


@pytest.mark.distributed
def test_runner_model_reads_the_documents_from_eod_tokens(world, monkeypatch):
    shape, seed = SHAPES["gqa-rope"], fresh_seed()
    ref = documents_alone(shape, seed, LAYOUTS)
    model = _runner_model(shape, seed, world)
    _assert_match(_run(model, shape, seed), ref, seed, tol=1e-8)  # RoPE table rows: see test_packed_training
    # a boolean mask (a dataset that still builds Megatron's [b, 1, S, S] one) is replaced as well
    model.zero_grad()
    _assert_match(_run(model, shape, seed, mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), ref, seed, tol=1e-8)
    with pytest.raises(TSPConfigError, match=r"--reset-attention-mask with --tsp-size needs the tokens of the batch"):
        model(None, None, None)
    # the broken variant: the EOD opening the next document instead of closing its own
    monkeypatch.setattr(documents, "document_ids", lambda tokens, eod: torch.cumsum((tokens == eod).long(), dim=-1))
    model.zero_grad()
    with pytest.raises(AssertionError, match="relative errors above"):
        _assert_match(_run(model, shape, seed), ref, seed, tol=1e-8)
