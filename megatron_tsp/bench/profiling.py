"""Where one training step's GPU time goes: a torch.profiler summary a person can read.

    with StepProfile() as prof:
        train_step(...)
    text = prof.summary(step_seconds)

The summary gives, from the profiler's Chrome trace: the GPU time per kernel category (GEMM,
attention forward/backward, NCCL, elementwise, copies/cat, reductions, other), each stream's
busy time (the union of its kernels' intervals) against the step's wall time -- the idle part of
the compute stream is time the GPU waited for the CPU or for communication -- and the kernels and
operators with the most GPU time.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from typing import Dict, List, Tuple

import torch

# First match wins: attention before GEMM (cuDNN's attention kernels are GEMM-like by name).
CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("nccl", ("nccl",)),
    ("attention backward", ("bprop", "flash_bwd", "attention_backward", "fmha_bwd")),
    ("attention forward", ("fprop", "flash_fwd", "fmha", "sdpa", "attention")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("copy / cat", ("copy", "cat", "index", "scatter", "gather", "fill")),
    ("reduction", ("reduce", "sum", "norm", "softmax", "logsumexp")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def category(kernel: str) -> str:
    name = kernel.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def _union(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


class StepProfile:
    """torch.profiler around one step (CPU and, where present, CUDA activity)."""

    def __enter__(self):
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(*exc)
        return False

    def kernels(self) -> List[dict]:
        """The trace's GPU kernels: name, stream, start and duration (us)."""
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self.prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
        finally:
            os.unlink(path)
        events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
        return [{"name": e.get("name", ""), "stream": (e.get("args") or {}).get("stream"), "ts": float(e["ts"]),
                 "dur": float(e.get("dur", 0.0))}
                for e in events if e.get("cat") == "kernel" and "ts" in e]

    def summary(self, step_seconds: float, title: str = "", top: int = 40) -> str:
        kernels = self.kernels()
        wall_us = step_seconds * 1e6
        lines = [f"# {title}".rstrip(), "", f"step wall time (CUDA events, profiled step): {step_seconds * 1e3:.2f} ms", ""]
        by_cat: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
        by_stream: Dict[object, List[Tuple[float, float]]] = defaultdict(list)
        by_name: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
        for k in kernels:
            c = by_cat[category(k["name"])]
            c[0] += k["dur"]
            c[1] += 1
            by_stream[k["stream"]].append((k["ts"], k["ts"] + k["dur"]))
            n = by_name[k["name"]]
            n[0] += k["dur"]
            n[1] += 1
        lines += ["| kernel category | GPU ms | kernels | % of step wall |", "|---|---|---|---|"]
        for cat, (us, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"| {cat} | {us / 1e3:.2f} | {n} | {100 * us / wall_us:.1f}% |")
        lines += ["", "| stream | kernels | busy ms (union) | % of step wall |", "|---|---|---|---|"]
        for stream, iv in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
            busy = _union(iv)
            lines.append(f"| {stream} | {len(iv)} | {busy / 1e3:.2f} | {100 * busy / wall_us:.1f}% |")
        lines += ["", f"Top {top} kernels by GPU time:", "", "| kernel | category | GPU ms | calls | mean us |",
                  "|---|---|---|---|---|"]
        for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
            short = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{short}` | {category(name)} | {us / 1e3:.2f} | {n} | {us / n:.1f} |")
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=70)
        lines += ["", f"Operators by {sort}:", "", "```", table, "```", ""]
        return "\n".join(lines)
