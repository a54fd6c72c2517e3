"""`megatron-tsp bench`: TSP against TP, TP+SP, CP, TP x CP and FSDP on one machine: peak memory,
step time, MFU. `rows` (what is measured), `launcher` (the command line and the orchestrator that
starts one torchrun per batch of rows), `worker` (one row under torchrun), `report` (markdown,
docs/bench.md block, plot), `profiling` (torch.profiler around steps). FLOPs and MFU come from
`megatron_tsp.planner.flops`, the planner's own model."""
