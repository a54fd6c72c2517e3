"""The TSP core, in schedule order: the zigzag token layout (`zigzag`), the collectives with their
backward (`comm`) and the shard exchanges built on them (`exchange`), the chunk-attention kernels
(`kernels`), RoPE at true positions (`rope`), the layers (`attention`, `mlp`, `norm`, `lm_head`),
the Megatron specs that put them in a GPT (`specs`, `model`) and the layer-input offload
(`offload`). Imports only the package's base (`config`, `compat`), torch and megatron.core:
nothing of training/, bench/, planner/ or megatron_lm/ (tests/test_layering.py)."""
