"""Rank 0 of a WORLD-rank job of the tiny recipe, alone in this process under the probe's fake
world: the CPU allocator's peak and end state of one training step run for real and of one run
under `memory_mode`, and the gradients' shapes after each, printed as one JSON line.

    python tests/probe/step_memory.py WORLD GEMMS(0|1) [recipe overrides ...]

A script, not a test: the fake world needs a process of its own (pytest's has a gloo world)."""

import json
import sys

import torch


def main(world: int, gemms: bool, overrides):
    from megatron_tsp.probe import fake_world
    from megatron_tsp.probe.standins import cpu_trace, memory_mode
    from megatron_tsp.training import loop
    from megatron_tsp.training.cpu import install_cpu_shims
    from megatron_tsp.training.recipe import load_recipe

    torch.set_num_threads(1)
    install_cpu_shims()
    recipe = load_recipe("configs/tiny.yaml", overrides)
    recipe.check(world)
    with fake_world(world):
        pgs = loop.init_groups(recipe)
        model, ddp, opt = loop.build(recipe, pgs)
        data = loop.build_train_dataset(recipe)
        dp, dps = pgs.dp.rank(), pgs.dp.size()

        def step(i):
            batches = list(loop.micro_batches(data, i, recipe, dp, dps, torch.device("cpu"), pgs.cp))
            return lambda: loop.train_step(ddp, opt, batches, recipe, pgs)

        def grads():
            return sorted((n, list(p.main_grad.shape)) for n, p in ddp.named_parameters())

        step(0)()  # the optimizer's state is allocated at its first step: outside the comparison
        cpu_trace(step(1))  # the first profiled step keeps 5 KB (the profiler's, not the step's)
        _, real_peak, real_net = cpu_trace(step(2))
        real_grads = grads()
        with memory_mode(gemms=gemms) as standins:
            _, stub_peak, stub_net = cpu_trace(step(3))
        print(json.dumps({"real": [real_peak, real_net, real_grads], "stub": [stub_peak, stub_net, grads()],
                          "calls": dict(standins.calls), "fallbacks": dict(standins.fallbacks)}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:])
