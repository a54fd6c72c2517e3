"""Baselines TSP is measured against, built from Megatron's own parts where they run without
Transformer Engine: context parallelism (all-gather K/V, `context_parallel`) and weights
ZeRO-3-sharded over the data-and-context-parallel group (`fsdp`)."""
