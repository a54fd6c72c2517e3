"""The training driver (`megatron-tsp train`): the YAML recipe (`recipe`), model / DDP / optimizer
set-up (`build`), the driver's run and its train step (`loop`), its checkpoints (`checkpoint`),
stop signals (`signals`) and the CPU shims for megatron-core on machines without CUDA (`cpu`,
installed only by the entry points that run on CPU). `example` is the tiny hand-written loop (to
be folded into the driver)."""
