"""planner.inference against the tensors megatron_tsp.inference holds (world of one, TSP size 1;
the per-rank division by D is the same formula, checked at D = 2 in test_inference's cache test)."""

import pytest
import torch

from megatron_tsp.inference import decode_model, exchange_all, static_context, tsp_prefill
from megatron_tsp.planner.inference import inference_memory
from megatron_tsp.planner.model import Layout, ModelSpec, PlanError
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import init_tsp


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("groups,tied", [(None, False), (2, True)])
def test_weights_and_kv_cache_are_the_tensors_the_code_holds(groups, tied):
    shape = ModelShape(hidden_size=32, num_attention_heads=4, num_query_groups=groups, ffn_hidden_size=64,
                       vocab_size=64, seq_length=64, share_embeddings_and_output_weights=tied)
    model = build_gpt(shape, layout="tsp", dtype=torch.float32, pg_collection=init_tsp(1)).eval()
    spec = ModelSpec(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=groups, ffn_hidden_size=64, vocab_size=64, dtype="float32",
                     share_embeddings_and_output_weights=tied)
    prompts, new = [[1, 2, 3, 4, 5], [6, 7, 8]], 4
    plan = inference_memory(spec, Layout("tsp", tsp_size=1), prompt_tokens=5, batch=2, new_tokens=new)
    assert plan["weights"] == _bytes(model.parameters())
    pre = tsp_prefill(model, prompts)
    assert plan["kv_prefill"] == _bytes(pre.kv)  # S = 6 (a multiple of 2)
    native = decode_model(model)
    context = static_context(exchange_all(pre.kv, model.tsp_group), pre.lengths, new,
                             [layer.self_attention.layer_number for layer in native.decoder.layers])
    assert plan["kv_decode"] == _bytes(t for kv in context.key_value_memory_dict.values() for t in kv)


def test_per_gpu_cache_divides_by_the_layout_size_and_bad_input_is_refused():
    spec = ModelSpec(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=16384, vocab_size=32000)
    one = inference_memory(spec, Layout("tsp", tsp_size=1), 131072)
    assert one["kv_prefill"] == 2 * 32 * 131072 * 4096 * 2  # 64 GiB of bf16 K/V at 128K
    for lay in (Layout("tsp", tsp_size=4), Layout("tp", tp=4), Layout("cp", cp=4), Layout("tp_cp", tp=2, cp=2)):
        assert inference_memory(spec, lay, 131072)["kv_prefill"] == one["kv_prefill"] / 4
    with pytest.raises(PlanError, match="prompt tokens"):
        inference_memory(spec, Layout("tsp", tsp_size=1), 0)
