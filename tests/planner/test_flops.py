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
