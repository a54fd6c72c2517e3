"""The harness of tests/gpu/test_moe_bf16.py (bf16 MoE against float64 with the bf16 model's
routing replayed) on CPU, at a tiny shape, so that CI sees it work on every megatron-core
version before the GPU run: the replay covered every torch.topk call of the float64 forward,
and the bf16 CPU kernels stay within the GPU test's bound."""

import dataclasses

import torch

from tests.gpu.test_moe_bf16 import SHAPE, TOL, moe_bf16_errors


def test_bf16_moe_harness_on_cpu(monkeypatch):
    shape = dataclasses.replace(SHAPE, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                                vocab_size=128, seq_length=64)
    errors, (flipped, total), experts = moe_bf16_errors(torch.device("cpu"), monkeypatch, shape=shape)
    assert experts == {"SequentialMLP"} and total == 2 * shape.seq_length * 2 * 2  # b x S tokens, 2 layers, routing + aux
    assert 0 < max(errors.values()) <= TOL, errors  # bf16 is not float64, and close to it
