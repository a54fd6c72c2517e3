"""One model-FLOP count: `megatron-tsp plan` and `megatron-tsp bench` give the same model FLOPs,
so the same MFU, for the same row (planner/flops.py says what is counted and why)."""

import pytest

from megatron_tsp.bench import rows as bench_rows
from megatron_tsp.planner.flops import causal_pairs, model_flops
from megatron_tsp.planner.formulas import flops
from megatron_tsp.planner.model import Layout, ModelSpec, TrainSpec


@pytest.mark.parametrize("variant", ["mha", "gqa"])
@pytest.mark.parametrize("kind,size", [("tsp", 4), ("tp_sp", 2)])
def test_bench_and_planner_count_the_same_model_flops(variant, kind, size):
    seq = 16 * 1024
    shape = bench_rows.model_shape("7b", variant, 4, seq)
    spec = ModelSpec(num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
                     num_query_groups=shape.num_query_groups, ffn_hidden_size=shape.ffn_hidden_size, vocab_size=shape.vocab_size,
                     swiglu=shape.swiglu)
    lay = Layout(kind, tsp_size=size) if kind == "tsp" else Layout(kind, tp=size)
    per_gpu = flops(spec, TrainSpec(seq_length=seq), lay)["model_flops"]
    assert per_gpu * lay.size == pytest.approx(bench_rows.model_flops(shape)["total"], rel=1e-12)
    # recompute and the local head's second logits pass are not model work: the same count
    with_recompute = flops(spec, TrainSpec(seq_length=seq, tsp_recompute="full", recompute="full"), lay)
    assert with_recompute["model_flops"] == per_gpu
    assert with_recompute["matmul"] > flops(spec, TrainSpec(seq_length=seq), lay)["matmul"]


def test_attention_backward_counts_twice_the_forward():
    """Model FLOPs: forward 4 q per causal pair and layer, backward 2 x that (dQ, dK, dP, dV):
    3 x forward in all; the planner's time model counts the kernels' extra QK^T (2.5 x)."""
    f = model_flops(layers=1, matmul_params_per_layer=0, q_dim=128, hidden=1, vocab=0, seq=64)
    assert f["attention"] == 3 * 4 * 128 * causal_pairs(64)


def test_document_masks_count_the_pairs_inside_documents():
    """Packed documents (--document-length N): the attention FLOPs of the pairs inside each
    document, sum of n (n+1)/2, in the model FLOPs and the time model; one document = unmasked."""
    from megatron_tsp.planner.flops import packed_pairs

    S = 4096
    assert packed_pairs(S, 0) == packed_pairs(S, S) == packed_pairs(S, 2 * S) == causal_pairs(S)
    assert packed_pairs(S, 1024) == 4 * causal_pairs(1024)
    assert packed_pairs(S, 1000) == 4 * causal_pairs(1000) + causal_pairs(96)  # the last document cut
    # issue 27's yardstick: masked / unmasked attention = sum of n^2 / S^2 (up to the diagonal's n / S^2)
    for seq, n in ((128 * 1024, 4096), (2**20, 64 * 1024), (2**20, 3000)):
        docs = [n] * (seq // n) + ([seq % n] if seq % n else [])
        assert packed_pairs(seq, n) / causal_pairs(seq) == pytest.approx(sum(d * d for d in docs) / seq**2, rel=1e-3)
    spec = ModelSpec(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024, vocab_size=1000)
    lay = Layout("tsp", tsp_size=2)
    whole = flops(spec, TrainSpec(seq_length=S), lay)
    packed = flops(spec, TrainSpec(seq_length=S, document_length=1024), lay)
    assert packed["attention"] == pytest.approx(whole["attention"] * packed_pairs(S, 1024) / causal_pairs(S), rel=1e-12)
    assert packed["matmul"] == whole["matmul"]
    kw = dict(layers=2, matmul_params_per_layer=1, q_dim=256, hidden=256, vocab=1000, seq=S)
    assert (model_flops(**kw)["attention"] - model_flops(**kw, document_length=1024)["attention"]
            == 3 * 2 * 4 * 256 * (causal_pairs(S) - packed_pairs(S, 1024)))


def test_plan_takes_the_document_length(capsys):
    from megatron_tsp.planner.cli import main

    args = ["--layers", "2", "--hidden", "256", "--heads", "4", "--seq-len", "8192", "--layout", "tsp2", "--json"]
    import json

    assert main(args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(args + ["--document-length", "1024"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert main(args + ["--document-length", "-1"]) == 2
    assert "--document-length = -1 must be >= 0" in capsys.readouterr().err
    t = lambda out: out["plans"][0]["time_breakdown_s"]["attention_s"]  # noqa: E731
    assert t(packed) < t(whole) / 4
