"""Megatron's MoE metric tracker is process-wide and sizes each entry by the layer count of the
first model that records into it: a deeper MoE model built later in the same process (a test
suite, bench, inference after training) indexed past its end until build_gpt forgot the entries."""

import dataclasses

import torch

from megatron_tsp.training.build import build_gpt
from tests.gpu.test_moe_bf16 import MOE, SHAPE
from tests.utils import init_tsp


def _forward(layers, pgs):
    shape = dataclasses.replace(SHAPE, num_layers=layers, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                ffn_hidden_size=64, vocab_size=64, seq_length=16)
    model = build_gpt(shape, layout="tsp", dtype=torch.float32, pg_collection=pgs,
                      **{**MOE, "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": None})
    tokens = torch.randint(0, 64, (1, 16))
    return model(tokens, torch.arange(16).unsqueeze(0), None, labels=tokens).sum()


def test_a_deeper_moe_model_after_a_shallower_one_records_its_router_losses():
    pgs = init_tsp(1)
    _forward(1, pgs).backward()
    _forward(3, pgs).backward()  # raised IndexError in the tracker (entries of size 1)
