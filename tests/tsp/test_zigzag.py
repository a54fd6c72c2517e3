import pytest
import torch

from megatron_tsp import TSPConfigError
from megatron_tsp.tsp.zigzag import (from_zigzag, inverse_permutation, local_chunk_starts, local_positions, to_zigzag,
                                     zigzag_permutation)


@pytest.mark.parametrize("S,D", [(8, 1), (8, 2), (16, 4), (24, 4), (64, 8)])
def test_permutation_layout_and_inverse(S, D):
    perm = zigzag_permutation(S, D)
    assert sorted(perm.tolist()) == list(range(S))
    c = S // (2 * D)
    for r in range(D):
        held = perm[r * S // D : (r + 1) * S // D].tolist()
        assert held == list(range(r * c, (r + 1) * c)) + list(range((2 * D - 1 - r) * c, (2 * D - r) * c))
        assert local_positions(S, D, r).tolist() == held
        assert local_chunk_starts(S, D, r) == (r * c, (2 * D - 1 - r) * c)
    x = torch.randn(3, S, 5)
    assert torch.equal(from_zigzag(to_zigzag(x, D, 1), D, 1), x)
    assert torch.equal(inverse_permutation(perm)[perm], torch.arange(S))


def test_every_rank_has_equal_causal_work():
    S, D = 64, 4
    work = [sum(p + 1 for p in local_positions(S, D, r).tolist()) for r in range(D)]
    assert len(set(work)) == 1


@pytest.mark.parametrize("S,D", [(10, 2), (12, 4), (7, 1)])
def test_bad_sequence_length_is_a_clear_error(S, D):
    with pytest.raises(TSPConfigError,
                       match=r"--seq-length = %d must be divisible by 2 x parallel.size = %d" % (S, 2 * D)):
        zigzag_permutation(S, D)
