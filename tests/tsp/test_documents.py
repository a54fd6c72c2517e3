"""Packed sequences with document masks: TSP attention on a packed sequence equals Megatron's
attention run on each document alone (output, input gradient, every weight gradient; float64,
D in {1, 2, 4}, MHA and GQA, every recompute mode and the split kernel), and a mask off by one
at a boundary is caught."""

import pytest
import torch

from megatron_tsp.config import TSPOptions
from tests.parity import document_block_parity
from tests.utils import skip_unless_divides

pytestmark = pytest.mark.distributed

TOL = 1e-10
S = 16  # chunks of c = S / (2D): 8, 4, 2 tokens at D = 1, 2, 4

# one list of document lengths per sample (b = 2: the samples' boundaries differ)
LAYOUTS = {
    # documents crossing zigzag chunks and ranks
    "crossing": [[5, 3, 8], [3, 7, 6]],
    # documents shorter than a chunk (1-token documents included)
    "short": [[1, 2, 1, 3, 1, 1, 4, 2, 1], [2, 1, 1, 1, 5, 1, 3, 2]],
    # one document longer than a rank's share (S / D tokens), then short ones
    "long": [[13, 1, 2], [1, 14, 1]],
}


def _check(errors, seed, tol=TOL):
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol} (seed {seed}): {bad}"


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("layout,groups", [("crossing", None), ("crossing", 2), ("short", 2), ("long", None)],
                         ids=["crossing-mha", "crossing-gqa", "short-gqa", "long-mha"])
def test_packed_attention_equals_documents_alone(world, D, groups, layout):
    skip_unless_divides(world, D)
    if groups is not None and groups % D:
        groups = D  # GQA with one KV group per shard at D = 4
    errors, seed = document_block_parity(D, LAYOUTS[layout], groups=groups, heads=8 if groups else 4)
    _check(errors, seed)


@pytest.mark.parametrize("D", [2, 4])
@pytest.mark.parametrize("options", [TSPOptions(tsp_recompute="full"),
                                     TSPOptions(tsp_attention_backend="math_split", tsp_recompute="full")],
                         ids=["recompute", "split-recompute"])
def test_packed_attention_every_recompute_mode_and_the_split_kernel(world, D, options):
    skip_unless_divides(world, D)
    errors, seed = document_block_parity(D, LAYOUTS["crossing"], groups=D, heads=8, options=options)
    _check(errors, seed)


@pytest.mark.slow  # FlexAttention's first use imports torch's compiler stack (~10 s on 2 cores)
@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_packed_attention_on_flex_attention(world, D, recompute):
    """The `flex` kernel (torch FlexAttention, block mask from the document ids; eager on CPU; its
    backward on CPU is the math kernel's, torch has none there)."""
    skip_unless_divides(world, D)
    errors, seed = document_block_parity(D, LAYOUTS["short" if D == 4 else "crossing"], groups=D, heads=8,
                                         options=TSPOptions(tsp_attention_backend="flex", tsp_recompute=recompute))
    _check(errors, seed)


@pytest.mark.parametrize("D", [1, 2, 4])
def test_one_document_equals_unmasked(world, D):
    """A sequence that is one document: the masked path equals plain causal attention (the
    reference, one document alone, is the unmasked sequence)."""
    skip_unless_divides(world, D)
    errors, seed = document_block_parity(D, [[S], [S]])
    _check(errors, seed)


def test_boundary_off_by_one_is_caught(world, monkeypatch):
    """A mask that moves every document boundary one token later (the EOD of a document would
    be counted in the next) must fail the same comparison."""
    import megatron_tsp.tsp.attention as attention
    from megatron_tsp.tsp.documents import chunk_mask

    def shifted(doc_ids, q_start, c, k_start, k_end):
        late = torch.cat([doc_ids[:, :1], doc_ids[:, :-1]], dim=1)
        return chunk_mask(late, q_start, c, k_start, k_end)

    monkeypatch.setattr(attention, "chunk_mask", shifted)
    errors, _ = document_block_parity(world, LAYOUTS["crossing"])
    assert errors["output"] > 1e-3 and errors["linear_qkv.weight"] > 1e-3


def test_skipped_key_prefix_is_caught(world, monkeypatch):
    """The keys before a chunk's first document are skipped: a skip one key too far must fail."""
    import megatron_tsp.tsp.attention as attention

    real = attention.key_starts
    monkeypatch.setattr(attention, "key_starts", lambda doc_ids, starts: tuple(s + 1 for s in real(doc_ids, starts)))
    errors, _ = document_block_parity(world, LAYOUTS["long"])
    assert errors["output"] > 1e-3


@pytest.mark.slow
@pytest.mark.distributed  # (one process suffices; runs in the slow world-2 pass with the test above)
def test_flex_kernel_equals_math_unmasked_and_masked(world):
    """chunk_forward / chunk_backward on `flex` equal `math` (float64, GQA, a chunk of c queries
    against a longer prefix), with and without document ids."""
    from megatron_tsp.tsp.documents import chunk_mask
    from megatron_tsp.tsp.kernels import chunk_backward, chunk_forward
    from tests.parity import lengths_to_ids

    torch.manual_seed(0)
    b, c, L, d = 2, 4, 11, 8
    q = torch.randn(b, 4, c, d, dtype=torch.float64)
    k, v = (torch.randn(b, 2, L, d, dtype=torch.float64) for _ in range(2))
    do = torch.randn_like(q)
    docs = torch.stack([lengths_to_ids([3, 5, 3]), lengths_to_ids([8, 1, 2])])
    for masked in (False, True):
        ref_kw = {"mask": chunk_mask(docs, L - c, c, 0, L)} if masked else {}
        flex_kw = {"mask": (docs[:, L - c:], docs)} if masked else {}
        o, lse = chunk_forward(q, k, v, 0.3, "math", **ref_kw)
        fo, flse = chunk_forward(q, k, v, 0.3, "flex", **flex_kw)
        assert torch.allclose(fo, o, rtol=0, atol=1e-12) and torch.allclose(flse.double(), lse, rtol=0, atol=1e-12)
        for got, want in zip(chunk_backward(do, q, k, v, fo, flse, 0.3, "flex", **flex_kw),
                             chunk_backward(do, q, k, v, o, lse, 0.3, "math", **ref_kw)):
            assert torch.allclose(got, want, rtol=0, atol=1e-12)
