"""Per-rank memory of one process: the CUDA caching allocator's counters on a GPU, the CPU
allocator's own events on the CPU.

Both meters answer the same questions at named points of a step (`mark`): what is allocated
now, the highest allocation since the last `reset_peak`. On the GPU these are
`torch.cuda.memory_allocated` / `max_memory_allocated` (and reserved). The CPU allocator keeps
no counters, so the CPU meter records every allocation and free with torch's profiler
(`profile_memory=True`: each `[memory]` event carries +bytes or -bytes, storage resizes
included, as FSDP frees its unsharded parameters) and replays them in order when asked; it
sees every byte the allocator hands out, the kernels' own scratch included, which a
tensor-level count would miss.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch


_PREFIX = "megatron_tsp.probe::"


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CudaMeter:
    """The caching allocator's counters of the current GPU."""

    def __init__(self):
        self.points: Dict[str, Tuple[int, int]] = {}
        self._peaks: Dict[str, Tuple[int, int]] = {}
        self._open: Optional[str] = None

    def start(self) -> None:
        torch.cuda.synchronize()

    def mark(self, name: str) -> None:
        """Allocated and reserved bytes now, kept under `name`."""
        torch.cuda.synchronize()
        self.points[name] = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())

    def open_peak(self, name: str) -> None:
        """Start a peak window `name` (the allocator's peak counters reset)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._open = name

    def close_peak(self) -> None:
        torch.cuda.synchronize()
        self._peaks[self._open] = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
        self._open = None

    def finish(self) -> None:
        pass

    def point(self, name: str) -> Tuple[int, Optional[int]]:
        return self.points[name]

    def peak(self, name: str) -> Tuple[int, Optional[int]]:
        return self._peaks[name]


class CpuMeter:
    """The CPU allocator's allocations and frees, recorded by torch's profiler and replayed.
    Bytes are counted from `start()`: tensors allocated before it are not included (their
    frees, if any, are ignored), so start it before the model is built."""

    def __init__(self):
        self._prof = None
        self._marks: List[str] = []
        self._open: Optional[str] = None
        self._stamps: Dict[str, int] = {}
        self._timeline: Optional[List[Tuple[int, int]]] = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _stderr_silenced():  # the profiler's C++ start / stop lines
            self._prof.__enter__()

    @staticmethod
    def _stamp(label: str) -> None:
        """An empty profiler range: its start time, on the clock of the memory events, marks now."""
        with torch.autograd.profiler.record_function(_PREFIX + label):
            pass

    def mark(self, name: str) -> None:
        self._marks.append(name)
        self._stamp("point:" + name)

    def open_peak(self, name: str) -> None:
        self._open = name
        self._stamp("open:" + name)

    def close_peak(self) -> None:
        self._stamp("close:" + self._open)
        self._open = None

    def finish(self) -> None:
        with _stderr_silenced():
            self._prof.__exit__(None, None, None)
        events = list(self._prof.profiler.kineto_results.events())
        self._stamps = {e.name()[len(_PREFIX):]: e.start_ns() for e in events if e.name().startswith(_PREFIX)}
        memory = [e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        total, timeline = 0, []
        for e in sorted(memory, key=lambda e: e.start_ns()):  # stable: same-time events keep their order
            total += e.nbytes()
            timeline.append((e.start_ns(), total))
        self._timeline = timeline
        self._prof = None

    def _at(self, t: int) -> int:
        current = 0
        for ts, total in self._timeline:
            if ts > t:
                break
            current = total
        return current

    def point(self, name: str) -> Tuple[int, Optional[int]]:
        return self._at(self._stamps["point:" + name]), None

    def peak(self, name: str) -> Tuple[int, Optional[int]]:
        t0, t1 = self._stamps["open:" + name], self._stamps["close:" + name]
        inside = [total for ts, total in self._timeline if t0 <= ts <= t1]
        return max([self._at(t0)] + inside), None


def meter_for(device: torch.device):
    return CudaMeter() if device.type == "cuda" else CpuMeter()
