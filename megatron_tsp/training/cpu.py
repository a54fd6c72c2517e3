"""Run megatron-core on CPU (gloo), for CI and for CPU runs of the driver.

megatron-core 0.16.1 assumes CUDA in a handful of places (docs/design.md §9, "CPU"):
the RNG tracker, `torch.cuda.current_device()` allocations, literal `device='cuda'`,
`.cuda()`, `pin_memory=True`, and `param.type() == 'torch.cuda.FloatTensor'` checks.
megatron-core 0.19's DDP also asks for `torch.cuda.current_stream()` in every
`start_grad_sync` (to wait on CUDA-graph events), and the MoE all-to-all dispatcher makes a
side stream (`torch.cuda.Stream()`) for its device-to-host copies of the split sizes and enters
it with `torch.cuda.stream(...)`: on the CPU both are the one CPU "stream". The optimizer CPU offload's
HybridDeviceOptimizer offloads only CUDA tensors (see `_split_as_on_a_gpu`).
`install_cpu_shims()` redirects all of these to the CPU (the records `patches.CPU_SHIMS` say what
each replaces and why). It is a no-op when CUDA is available and must never be used on a GPU run.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from .. import patches

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


def _cpu_rng_tracker():
    """Megatron's RNG tracker on the CPU generator (the same seeds and names)."""
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
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

    return CPURNGStatesTracker()


# Megatron's activation checkpointing (CheckpointFunction, CheckpointWithoutOutput) saves and
# restores "the CUDA RNG state" around the recomputation through two module functions. On the CPU
# the tracker above runs on the CPU generator, so that generator is the "CUDA" one.
def _get_cpu_as_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_as_cuda_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _taking_tensor_splits(original):
    """`torch.distributed.all_to_all_single` that also takes split sizes as tensors: the MoE
    dispatcher's split sizes are host copies of device tensors (numpy arrays) on a GPU; on the
    CPU they stay tensors, which the process group's binding refuses. (A function, not the mode
    above: the mode is not active while backward runs, and the combine's backward is an all-to-all.)"""

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        as_list = lambda s: s.tolist() if torch.is_tensor(s) else s  # noqa: E731
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group=group,
                        async_op=async_op)

    return all_to_all_single


class _TheseAreOnTheDevice(TorchFunctionMode):
    """The tensors given, and what is computed from them, answer `is_cuda` true; `.cpu()` gives
    another tensor object (a host copy, as on a GPU: on the CPU it would be the same object) and
    `pin_memory()` is a no-op. Tensors are tracked by id and kept alive while the mode is (no id
    is reused)."""

    def __init__(self, tensors):
        super().__init__()
        self.alive = list(tensors)
        self.ids = {id(t) for t in self.alive}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == torch.Tensor.is_cuda.__get__:
            return id(args[0]) in self.ids
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.cpu:
            return args[0].detach()
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and any(id(a) in self.ids for a in args if isinstance(a, torch.Tensor)):
            self.alive.append(out)
            self.ids.add(id(out))
        return out


def _split_as_on_a_gpu(split):
    """megatron-core's optimizer CPU offload (HybridDeviceOptimizer) splits its parameters by
    `param.is_cuda`: on the CPU none would be, and it would step them in place without the host
    copies (and fail in its copy-back hook). While it splits them, its own parameters count as
    device ones, so the CPU run takes the GPU run's path: host fp32 copies (main weights, Adam
    state, gradients) stepped by the CPU AdamW and copied back into the model's shards, and with
    offload_fraction < 1 the rest stepped as "device" parameters."""

    def split_as_on_a_gpu(self, offload_fraction):
        with _TheseAreOnTheDevice(p for group in self.param_groups for p in group["params"]):
            return split(self, offload_fraction)

    return split_as_on_a_gpu


def install_cpu_shims() -> bool:
    """Install the CPU redirections (`patches.CPU_SHIMS`, each once per process); returns whether
    they are active."""
    if torch.cuda.is_available():
        return False
    patches.install(patches.CUDA_CURRENT_DEVICE, lambda: torch.device("cpu"))
    patches.install(patches.CUDA_SYNCHRONIZE, lambda *a, **k: None)
    patches.install(patches.CUDA_CURRENT_STREAM, lambda *a, **k: _CPU_STREAM)
    patches.install(patches.CUDA_STREAM_CLASS, _CPUStream)
    patches.install(patches.CUDA_STREAM_CONTEXT, _cpu_stream_context)
    # model_parallel_cuda_manual_seed then works unchanged: it resets and fills this tracker
    # (torch.cuda.manual_seed is a lazy no-op without CUDA).
    if not patches.RNG_TRACKER.installed():
        patches.install(patches.RNG_TRACKER, _cpu_rng_tracker())
    patches.install(patches.RNG_TRACKER_INITIALIZED, True)
    patches.install(patches.GET_CUDA_RNG_STATE, _get_cpu_as_cuda_rng_state)
    patches.install(patches.SET_CUDA_RNG_STATE, _set_cpu_as_cuda_rng_state)
    patches.install(patches.ALL_TO_ALL_TENSOR_SPLITS, wrap=_taking_tensor_splits)
    patches.install(patches.HYBRID_OPTIMIZER_SPLIT, wrap=_split_as_on_a_gpu)
    patches.install(patches.CUDA_TO_CPU_MODE, _CudaToCpuMode())  # process-wide: no CUDA to fall back on
    return True
