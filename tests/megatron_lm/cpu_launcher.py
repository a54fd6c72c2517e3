"""Megatron-LM's pretrain_gpt.py on the CPU (gloo), through `megatron_tsp.megatron_lm.run`, for the tests.

`python tests/megatron_lm/cpu_launcher.py [--direct | --native-model] <pretrain_gpt.py> <flags>`
under torchrun (`--direct`: run the script itself, e.g. one patched by scripts/apply_patches.sh;
`--native-model`: the runner, but every model built is Megatron's native GPTModel (TP + SP), as
from a pretrain_gpt.py whose model path bypasses the TSP builder: the runner's check of the
built model must stop it). Megatron-LM's
training loop is written for CUDA; this installs megatron_tsp's CPU shims plus the few
Megatron-LM-specific redirections below (and the packed-sequence tests' knobs, `packed_test_knobs`), then
hands over to `megatron_tsp.megatron_lm.run.main`. Never for GPU runs.
"""

import sys
import types

import torch


def _stub_batch_invariant_kernels():
    """megatron.training.initialize imports Triton kernels unconditionally; without Triton (the
    CPU CI), stand in a module whose batch-invariant mode cannot be enabled."""
    try:
        import triton  # noqa: F401
        return
    except ImportError:
        pass
    name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
    module = types.ModuleType(name)

    def refuse(*args, **kwargs):
        raise RuntimeError("--batch-invariant-mode needs Triton")

    module.set_batch_invariant_mode = module.enable_batch_invariant_mode = refuse
    module.disable_batch_invariant_mode = lambda *a, **k: None
    module.is_batch_invariant_mode_enabled = lambda: False
    sys.modules[name] = module


def install_megatron_lm_cpu_shims():
    from megatron_tsp.training.cpu import install_cpu_shims

    if not install_cpu_shims():
        raise SystemExit("cpu_launcher.py is for machines without CUDA")
    torch.set_num_threads(1)
    _stub_batch_invariant_kernels()
    # One pretend device, so that Megatron's _initialize_distributed builds the model-parallel
    # groups and _set_random_seed seeds the (CPU) RNG tracker, as on a GPU.
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *a, **k: None
    # Streams (DDP set-up runs on a side stream; the MoE alltoall dispatcher records events on its
    # device-to-host stream) are install_cpu_shims' no-op streams; memory statistics (logging).
    torch.cuda.empty_cache = lambda: None
    # The rerun state machine saves and restores the CUDA generator (there is none).
    torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *a, **k: None
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.memory_stats = lambda *a, **k: {}
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)

    from megatron.training import arguments, training, utils

    arguments.get_device_arch_version = utils.get_device_arch_version = lambda: 9  # as Hopper
    try:  # core_v0.16.1; gone from core_v0.17
        from megatron.legacy import fused_kernels
    except ImportError:
        fused_kernels = None
    if fused_kernels is not None and hasattr(fused_kernels, "load"):
        fused_kernels.load = lambda args: None  # asks nvcc its version and builds nothing (this commit)

    initialize_megatron = training.initialize_megatron

    def initialize_megatron_without_cuda(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    training.initialize_megatron = initialize_megatron_without_cuda


def build_native_model_instead():
    """Make megatron_tsp's builder (both Megatron-LM model paths) build Megatron's native
    GPTModel on the sequence-parallel local spec whatever the flags say: a pretrain_gpt.py whose
    model path never reaches the TSP model yet trains (TP + SP). The runner must refuse it."""
    import argparse

    from megatron_tsp.megatron_lm import build, hooks

    build_gpt_model = build.build_gpt_model

    def build_native(args, config, kwargs):
        native = argparse.Namespace(**{**vars(args), "tsp": False, "tsp_native_spec": "sp_norm"})
        return build_gpt_model(native, config, kwargs)

    # the builder hook (core_v0.16-0.18) calls hooks' name, TSPGPTModelBuilder (core_v0.19+) build's
    hooks.build_gpt_model = build.build_gpt_model = build_native


def packed_test_knobs():
    """For the packed-sequence tests (environment, so that compare_tsp_vs_tpsp.py passes them on):
    TSP_TEST_MOCK_DOCUMENT_MAX_LENGTH=N makes Megatron's mock documents 1..N-1 tokens long (its
    default, up to 4096, leaves a 64-token sequence with no EOD most of the time);
    TSP_TEST_BROKEN_DOCUMENTS=1 turns the runner's conversion off by one (the EOD opens the next
    document), a broken variant the comparison with Megatron's own mask must catch."""
    import os

    length = int(os.environ.get("TSP_TEST_MOCK_DOCUMENT_MAX_LENGTH", "0"))
    if length:
        from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

        MockGPTLowLevelDataset.max_sequence_length = length
    if os.environ.get("TSP_TEST_BROKEN_DOCUMENTS") == "1":
        from megatron_tsp.tsp import documents

        documents.document_ids = lambda tokens, eod: torch.cumsum((tokens == eod).long(), dim=-1)
        print("> cpu_launcher: document ids off by one (TSP_TEST_BROKEN_DOCUMENTS)", flush=True)


if __name__ == "__main__":
    import os
    import runpy

    mode = sys.argv[1] if sys.argv[1] in ("--direct", "--native-model") else None
    argv = sys.argv[2:] if mode else sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # the Megatron-LM tree
    install_megatron_lm_cpu_shims()
    packed_test_knobs()
    if mode == "--direct":
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    else:
        if mode == "--native-model":
            build_native_model_instead()
        from megatron_tsp.megatron_lm.run import main

        sys.exit(main(argv))
