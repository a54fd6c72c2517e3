"""Activation offload for Megatron's layer checkpointing (`recompute_granularity='full'`).

With full recompute a layer (or a chunk of `recompute_num_layers` layers) keeps only its input
`[s, b, h]` for backward: Megatron's `CheckpointFunction` saves it and runs the chunk's forward
again in backward. `offload_layer_inputs(model)` moves those saved inputs to pinned host memory:

    forward, chunk i:   D2H copy of its input on the offload stream, posted before the chunk's
                        forward runs (so the copy overlaps it); the device tensor is released once
                        the copy has read it (`record_stream`); the checkpoint saves the host copy.
    backward, chunk i:  its input is on the device already (prefetched, or copied now); before the
                        chunk recomputes, chunk i-1's input starts its H2D copy on the prefetch
                        stream. So at most two chunks' inputs are on the device during backward:
                        the one in use and the one prefetched.

Scope: only the tensors Megatron's layer checkpoint saves that have the layer-input size
(`[s, b, hidden_size]`); never a non-recomputed layer's activations, the RoPE table or masks.
Works for every layout (TSP and the baselines: the checkpoint is Megatron's). On a CPU-only
machine the host copy is still made (a separate CPU tensor; what the tests check) and returned
as the saved tensor; the stream logic runs on CUDA devices only.

Mechanism: `megatron.core.tensor_parallel.checkpoint` (what TransformerBlock calls per chunk, in
megatron-core 0.16 and 0.19) is replaced by a wrapper only while the decoder of a model passed to
`offload_layer_inputs` runs its forward (`patches.OFFLOAD_CHECKPOINT`); Megatron's own is back
when the outermost such forward ends, however it ends.

References: the handles are reached only from the autograd graph (the packed saved tensors) and,
during one forward, from the offloader's `_last`; nothing of the offloader reaches back into the
graph. The graph's CheckpointFunctionBackward nodes hold the decoder (the checkpointed function),
and the decoder holds the offloader: a reference from the offloader into the graph (a host copy
carrying a grad_fn, a handle kept after the forward) would be a cycle through C++ autograd nodes
that Python's gc cannot see, keeping every model, graph and destroyed process group alive
(tests/tsp/test_memory.py::test_offloaded_model_is_freed).
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch

from .. import patches
from ..config import TSPConfigError

_ACTIVE: List["LayerInputOffloader"] = []  # offloaders of the decoder forwards in progress


class OffloadedInput:
    """One checkpointed chunk's input: its host copy and, once fetched back, its device copy.
    `prev` is the input of the chunk before it in the same forward (prefetched when this one is
    unpacked, i.e. when this chunk's backward starts)."""

    __slots__ = ("host", "device", "d2h_done", "device_copy", "h2d_done", "prev", "index", "__weakref__")

    def __init__(self, host, device, d2h_done, index):
        self.host, self.device, self.d2h_done, self.index = host, device, d2h_done, index
        self.device_copy, self.h2d_done, self.prev = None, None, None


class LayerInputOffloader:
    """Offloads the layer inputs Megatron's checkpoint saves (see the module docstring).
    `events`, when a list, records ('offload' | 'fetch' | 'prefetch', chunk index) in order
    (the tests read it to check the prefetch schedule)."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.events: Optional[list] = None
        self._streams = {}
        self._last: Optional[OffloadedInput] = None  # the latest saved input of the current forward
        self._count = 0

    # -- forward ------------------------------------------------------------------------------
    def begin_forward(self) -> None:
        self._last, self._count = None, 0

    def end_forward(self) -> None:
        """The chain is complete: from now on only the graph holds the handles."""
        self._last = None

    def is_layer_input(self, t) -> bool:
        return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3
                and t.shape[-1] == self.hidden_size)

    def _stream(self, device, kind: str):
        key = (device, kind)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]

    def _log(self, what: str, handle: OffloadedInput) -> None:
        if self.events is not None:
            self.events.append((what, handle.index))

    def offload(self, t: torch.Tensor) -> OffloadedInput:
        """Post the copy of `t` to (pinned) host memory; `t`'s device memory may be reused as
        soon as the copy has read it."""
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        t = t.detach()  # a copy under autograd would give `host` a grad_fn into the graph (a cycle)
        done = None
        if t.is_cuda:
            stream = self._stream(t.device, "d2h")
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete in stream order
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            t.record_stream(stream)  # the allocator keeps t's block until the copy has run
        else:
            host.copy_(t)
        handle = OffloadedInput(host, t.device, done, self._count)
        self._count += 1
        return handle

    def saved(self, handle: OffloadedInput) -> None:
        """`handle` was saved for backward: chain it behind the previous chunk's input."""
        handle.prev, self._last = self._last, handle
        self._log("offload", handle)

    # -- backward -----------------------------------------------------------------------------
    def _to_device(self, handle: OffloadedInput) -> None:
        """Post the H2D copy of `handle` on the prefetch stream (no-op when already posted)."""
        if handle.device_copy is not None:
            return
        if handle.device.type != "cuda":
            handle.device_copy = handle.host  # CPU: the host copy is the saved tensor
            return
        stream = self._stream(handle.device, "h2d")
        with torch.cuda.stream(stream):
            stream.wait_event(handle.d2h_done)  # the host copy is complete
            t = torch.empty(handle.host.shape, dtype=handle.host.dtype, device=handle.device)
            t.copy_(handle.host, non_blocking=True)
            handle.h2d_done = torch.cuda.Event()
            handle.h2d_done.record(stream)
        handle.device_copy = t

    def fetch(self, handle: OffloadedInput) -> torch.Tensor:
        """The input of the chunk whose backward starts now, on its device; posts the prefetch
        of the previous chunk's input."""
        prefetched = handle.device_copy is not None
        self._to_device(handle)
        t, handle.device_copy = handle.device_copy, None  # freed with the chunk's backward
        if t.is_cuda:
            stream = torch.cuda.current_stream(t.device)
            stream.wait_event(handle.h2d_done)
            t.record_stream(stream)  # allocated on the prefetch stream, used and freed on this one
        self._log("fetch" if not prefetched else "use", handle)
        if handle.prev is not None:
            self._to_device(handle.prev)
            self._log("prefetch", handle.prev)
            handle.prev = None
        return t

    def hooks(self, handle: OffloadedInput, layer_input: torch.Tensor):
        """saved_tensors_hooks for one checkpoint call: its layer input leaves as `handle`,
        everything else it saves stays as it is."""
        ptr, shape = layer_input.data_ptr(), layer_input.shape

        def pack(t):
            if t.data_ptr() == ptr and t.shape == shape and t.dtype == handle.host.dtype:
                self.saved(handle)
                return handle
            return t

        def unpack(obj):
            return self.fetch(obj) if isinstance(obj, OffloadedInput) else obj

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _checkpoint(megatrons, function, distribute_saved_activations, *args):
    """Megatron's `tensor_parallel.checkpoint` (`megatrons`), with the chunk input offloaded while
    an offloading decoder runs."""
    offloader = _ACTIVE[-1] if _ACTIVE else None
    if offloader is None or not args or not offloader.is_layer_input(args[0]) or not torch.is_grad_enabled():
        return megatrons(function, distribute_saved_activations, *args)
    if distribute_saved_activations:
        raise TSPConfigError("parallel.offload_activations = true cannot be combined with "
                             "distribute_saved_activations (both move the saved layer input)")
    layer_input = args[0]
    handle = offloader.offload(layer_input)  # posted before the chunk's forward: they overlap
    with offloader.hooks(handle, layer_input):
        return megatrons(function, distribute_saved_activations, *args)


def _offloading(megatrons):
    return functools.partial(_checkpoint, megatrons)


def offload_layer_inputs(model) -> LayerInputOffloader:
    """Offload the checkpointed layer inputs of `model` (a GPTModel / TSPGPTModel built with
    `recompute_granularity='full'`, before DDP / FSDP wrapping). Returns the offloader (also
    `model.activation_offloader`)."""
    config = model.config
    if config.recompute_granularity != "full":
        raise TSPConfigError(f"parallel.offload_activations = true needs parallel.recompute = full (Megatron's "
                             f"layer checkpointing, whose saved layer inputs it offloads); got "
                             f"recompute_granularity = {config.recompute_granularity!r}")
    if config.distribute_saved_activations:
        raise TSPConfigError("parallel.offload_activations = true cannot be combined with "
                             "distribute_saved_activations (both move the saved layer input)")
    offloader = LayerInputOffloader(config.hidden_size)

    def enter(module, args):
        offloader.begin_forward()
        if not _ACTIVE:  # Megatron's TransformerBlock calls it by module attribute
            patches.install(patches.OFFLOAD_CHECKPOINT, wrap=_offloading)
        _ACTIVE.append(offloader)

    def leave(module, args, output):
        offloader.end_forward()
        if _ACTIVE and _ACTIVE[-1] is offloader:
            _ACTIVE.pop()
        if not _ACTIVE:  # the outermost offloading forward ended, however it ended (always_call)
            patches.undo(patches.OFFLOAD_CHECKPOINT)

    model.decoder.register_forward_pre_hook(enter)
    model.decoder.register_forward_hook(leave, always_call=True)
    model.activation_offloader = offloader
    return offloader
