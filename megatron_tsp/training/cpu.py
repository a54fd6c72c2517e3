"""Run megatron-core on CPU (gloo), for CI and for CPU runs of the driver.

megatron-core 0.16.1 assumes CUDA in a handful of places (docs/design.md §9, "CPU"):
the RNG tracker, `torch.cuda.current_device()` allocations, literal `device='cuda'`,
`.cuda()`, `pin_memory=True`, and `param.type() == 'torch.cuda.FloatTensor'` checks.
megatron-core 0.19's DDP also asks for `torch.cuda.current_stream()` in every
`start_grad_sync` (to wait on CUDA-graph events), and the MoE all-to-all dispatcher makes a
side stream (`torch.cuda.Stream()`) for its device-to-host copies of the split sizes and enters
it with `torch.cuda.stream(...)`: on the CPU both are the one CPU "stream". `install_cpu_shims()` redirects all of these
to the CPU. It is a no-op when CUDA is available and must never be used on a GPU run.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU, drops pin_memory, makes `.cuda()` a no-op and
    makes `Tensor.type()` answer with the CUDA type names Megatron's optimizer asserts."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to,) and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


class _CPUStream:
    """The current "stream" on the CPU: work is already ordered, so waits are no-ops. It stands
    in for the class `torch.cuda.Stream` and stays a class (code that annotates with
    `torch.cuda.Stream | None` at import, as transformers does, needs one): constructing it
    answers the one CPU stream."""

    _one = None

    def __new__(cls, *args, **kwargs):
        if cls._one is None:
            cls._one = super().__new__(cls)
        return cls._one

    def __init__(self, *args, **kwargs):  # torch.cuda.Stream(device=..., priority=...): nothing to set
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _CPUEvent()


class _CPUEvent:
    """An event on the CPU "stream": already complete."""

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


@contextlib.contextmanager
def _cpu_stream_context(stream=None):
    yield


_CPU_STREAM = _CPUStream()


def _install_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's RNG tracker on the CPU generator (the same seeds and names)."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    # model_parallel_cuda_manual_seed then works unchanged: it resets and fills this tracker
    # (torch.cuda.manual_seed is a lazy no-op without CUDA).
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # Megatron's activation checkpointing (CheckpointFunction, CheckpointWithoutOutput) saves and
    # restores "the CUDA RNG state" around the recomputation through these two module functions.
    # On the CPU the tracker above runs on the CPU generator, so that generator is the "CUDA" one.
    def get_cpu_as_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_cpu_as_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_cpu_as_cuda_rng_state
    mrandom._set_cuda_rng_state = set_cpu_as_cuda_rng_state


def _all_to_all_single_taking_tensor_splits():
    """`torch.distributed.all_to_all_single` that also takes split sizes as tensors: the MoE
    dispatcher's split sizes are host copies of device tensors (numpy arrays) on a GPU; on the
    CPU they stay tensors, which the process group's binding refuses. (A function, not the mode
    above: the mode is not active while backward runs, and the combine's backward is an all-to-all.)"""
    import torch.distributed as dist

    original = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        as_list = lambda s: s.tolist() if torch.is_tensor(s) else s  # noqa: E731
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group=group,
                        async_op=async_op)

    dist.all_to_all_single = all_to_all_single


def install_cpu_shims() -> bool:
    """Install the CPU redirections once per process; returns whether they are active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.Stream = _CPUStream
    torch.cuda.stream = _cpu_stream_context
    _install_rng_tracker()
    _all_to_all_single_taking_tensor_splits()
    _CudaToCpuMode().__enter__()  # process-wide: the CPU path has no CUDA to fall back on
    _INSTALLED = True
    return True
