"""Memory mode: the expensive kernels replaced by stand-ins that allocate but do not compute.

Finding the memory frontier of a 3M-token step of a 7B model would cost over an hour of
attention per rank. Under `memory_mode()` every attention kernel (and, with `gemms=True`, every
GEMM) is answered by a stand-in that allocates what the real kernel allocates and skips the
arithmetic, so a step's peak is measured in seconds:

    with memory_mode(gemms=True) as standins:
        loss = step(...)            # same allocations, same peak, zeros for values
    standins.calls, standins.fallbacks

It works at the dispatcher (a `TorchDispatchMode`), below autograd, so it sees every call site:
`F.scaled_dot_product_attention` (which lowers to one of the fused ops below), TSP's direct
`torch.ops.aten` calls (megatron_tsp/tsp/kernels.py), and the backward ops autograd runs. The
math path of SDPA and TSP's `math` backend are not one op: they decompose into matmuls (stubbed
with `gemms=True`) and elementwise ops (always run).

A stand-in's outputs are the op's meta outputs (shape, strides, dtype; undefined tensors and
integers as the meta kernel gives them) allocated on the real device and zero-filled (fresh
memory can hold NaN or inf, which a NaN check would stop on). Then the kernel's internal
buffers (the transients below) are allocated and freed before returning: the op's peak. An op
without a meta kernel runs for real (counted in `fallbacks`). On CUDA the first stubbed GEMM of
each thread and stream runs once for real on 1-element tensors, so that cuBLAS allocates the
workspace it keeps, as the real step would.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten


# ---- kernel-internal transients: bytes of each buffer the real kernel allocates and frees ---
#
# Each formula takes the op's arguments by schema name and returns one size per buffer. The
# evidence: "measured" = read off the CPU profiler's allocation events (torch 2.13, fp32 and
# bf16; `calibrate(torch.device("cpu"))` repeats it); "source" = read from the kernel's
# source, unmeasured until `calibrate(torch.device("cuda"))` runs on a GPU.


def _dims(a, layout: str):
    """(b, hq, hk, sq, sk, d) of the q, k arguments in layout "bhsd" (SDPA ops) or "bshd"."""
    q, k = a["query"], a["key"]
    if layout == "bhsd":
        (b, hq, sq, d), hk, sk = q.shape, k.shape[1], k.shape[2]
    else:
        (b, sq, hq, d), sk, hk = q.shape, k.shape[1], k.shape[2]
    return b, hq, hk, sq, sk, d


def _reduced(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _acc_size(t: torch.Tensor) -> int:
    return 8 if t.dtype == torch.float64 else 4


def _cpu_splits(sq: int, sk: int):
    """The CPU flash kernel's (q, kv) block sizes (FlashAttentionKernel.cpp's dispatch)."""
    qs = 256 if sq >= 768 else 64 if sq >= 192 else 32
    return min(qs, sq), min(512, sk)


def _cpu_flash_forward(a) -> List[int]:
    """Measured: per thread an fp32 buffer of qk [qS, kvS] + row max and sum [qS] each + an
    output accumulator [qS, d], and for bf16/fp16 a [qS, kvS] copy of qk in the input dtype."""
    q = a["query"]
    b, hq, hk, sq, sk, d = _dims(a, "bhsd")
    qs, kvs = _cpu_splits(sq, sk)
    nt = torch.get_num_threads()
    return [nt * (qs * kvs + 2 * qs + qs * d) * _acc_size(q),
            nt * qs * kvs * q.element_size() if _reduced(q) else 0]


def _cpu_flash_backward(a) -> List[int]:
    """Measured: grad_out copied to [b, s, h, d]-contiguous unless it already is; per thread an
    fp32 buffer of attn and grad_attn [qS, kvS] each (and their bf16/fp16 copies) and a row sum
    [qS]. Not modelled: oneDNN's scratch in bf16/fp16 GEMMs (<= 0.25 MB per call measured)."""
    q, do = a["query"], a["grad_out"]
    b, hq, hk, sq, sk, d = _dims(a, "bhsd")
    qs, kvs = _cpu_splits(sq, sk)
    nt = torch.get_num_threads()
    copy = 0 if do.transpose(1, 2).is_contiguous() else do.numel() * do.element_size()
    return [copy, nt * 2 * qs * kvs * _acc_size(q),
            nt * 2 * qs * kvs * q.element_size() if _reduced(q) else 0, nt * qs * _acc_size(q)]


def _round(x: int, m: int) -> int:
    return -(-x // m) * m


def _flash_backward(layout: str):
    def formula(a) -> List[int]:
        """Source (torch's _flash_attention_backward and its FlashAttention-2 mha_bwd):
        grad_out and out copied to [b, s, h, d]-contiguous unless they are; softmax_d [b, h,
        sq rounded to 128] fp32; dq_accum [b, sq rounded to 128, h, d rounded to 32] fp32; and
        with GQA dk, dv at the query heads [b, sk, hq, d] before they are summed to hk heads."""
        q = a["query"]
        b, hq, hk, sq, sk, d = _dims(a, layout)
        bshd = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
        copies = [t.numel() * t.element_size() for t in (a["grad_out"], a["out"]) if not bshd(t).is_contiguous()]
        sq_r, d_r = _round(sq, 128), _round(d, 32)
        gqa = [2 * b * sk * hq * d * q.element_size()] if hk != hq else []
        return copies + [b * hq * sq_r * 4, b * sq_r * hq * d_r * 4] + gqa
    return formula


def _cudnn_backward(a) -> List[int]:
    """Source (cuDNN frontend SDPA backward workspace), an estimate until calibrated: an fp32 dQ
    accumulator [b, h, sq, d] and the fp32 row sums of dO * O [b, h, sq]."""
    b, hq, hk, sq, sk, d = _dims(a, "bhsd")
    return [b * hq * sq * d * 4 + b * hq * sq * 4]


def _efficient_backward(layout: str):
    def formula(a) -> List[int]:
        """Source (xformers/cutlass mem-efficient backward), an estimate until calibrated: delta
        [b, h, sq] fp32, and for bf16/fp16 an fp32 grad_q accumulator [b, sq, h, d]."""
        q = a["query"]
        b, hq, hk, sq, sk, d = _dims(a, layout)
        return [b * hq * sq * 4] + ([b * sq * hq * d * 4] if _reduced(q) else [])
    return formula


def _none(a) -> List[int]:
    """No buffer beyond the outputs. Source: FlashAttention-2 and mem-efficient forwards (no
    split-KV, head dim a multiple of 8), GEMMs (cuBLAS's workspace is kept per handle, see
    `KernelStandins.prime`). Assumed, to be calibrated: cuDNN forward without dropout."""
    return []


# op -> its transient formula. Not modelled: FlashAttention-2's split-KV forward, which it may
# pick when b * h * ceil(sq / 64) is small against the SM count (decoding shapes) and which
# allocates fp32 partial outputs; head dims that are not a multiple of 8 (padded by copies).
# Not intercepted: the ops' out= overloads, `_scaled_dot_product_fused_attention_overrideable`
# (other backends), `_native_multi_head_attention` (nn.MultiheadAttention's inference path).
_ATTENTION_BY_NAME = {  # name -> transient formula; ops this torch lacks are left out
    "_scaled_dot_product_flash_attention_for_cpu": _cpu_flash_forward,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_flash_backward,
    "_scaled_dot_product_flash_attention": _none,
    "_scaled_dot_product_flash_attention_backward": _flash_backward("bhsd"),
    "_flash_attention_forward": _none,
    "_flash_attention_backward": _flash_backward("bshd"),
    "_scaled_dot_product_cudnn_attention": _none,
    "_scaled_dot_product_cudnn_attention_backward": _cudnn_backward,
    "_cudnn_attention_forward": _none,  # no meta kernel in torch 2.13: run for real
    "_cudnn_attention_backward": _cudnn_backward,  # likewise
    "_flash_attention_forward_no_dropout_inplace": _none,  # (torch 2.13) fills `out` in place: left as it is
    "_scaled_dot_product_efficient_attention": _none,
    "_scaled_dot_product_efficient_attention_backward": _efficient_backward("bhsd"),
    "_efficient_attention_forward": _none,
    "_efficient_attention_backward": _efficient_backward("bshd"),
}
ATTENTION: Dict[object, Callable] = {getattr(aten, name).default: formula for name, formula in _ATTENTION_BY_NAME.items()
                                     if hasattr(aten, name)}
GEMMS: Dict[object, Callable] = {
    op: _none for op in (aten.mm.default, aten.addmm.default, aten.bmm.default,
                         aten.baddbmm.default, aten._addmm_activation.default)
}


def named_args(func, args, kwargs) -> Dict[str, object]:
    """The op's arguments by their schema names (positional and keyword alike)."""
    out = dict(zip((x.name for x in func._schema.arguments), args))
    out.update(kwargs)
    return out


class KernelStandins(TorchDispatchMode):
    """Answers attention ops (and GEMMs with `gemms=True`) with stand-ins; all else runs.

    `calls` counts the ops answered by a stand-in, `fallbacks` those run for real because they
    have no meta kernel. An op with a tensor-subclass argument (a DTensor of FSDP2) is handed to
    the subclass, whose own ops on plain tensors then meet the stand-ins."""

    def __init__(self, *, gemms: bool = False):
        super().__init__()
        self.table = {**ATTENTION, **(GEMMS if gemms else {})}
        self.calls: Counter = Counter()
        self.fallbacks: Counter = Counter()
        self.primed = set()

    def prime(self, func, args, kwargs):
        """Run the GEMM once for real on 1-element tensors per (thread, CUDA stream): the first
        cuBLAS call on a handle and stream allocates its workspace through the caching allocator
        (kept for the process), which a step of stubbed GEMMs would otherwise never allocate.
        Autograd's backward thread has a handle, hence a workspace, of its own."""
        device = self.device(args)
        if device.type != "cuda":
            return
        key = (threading.get_ident(), device, torch.cuda.current_stream(device).cuda_stream)
        if key not in self.primed:
            tiny = lambda t: (torch.zeros([1] * t.dim(), dtype=t.dtype, device=t.device)
                              if isinstance(t, torch.Tensor) else t)
            func(*tree_map(tiny, args), **tree_map(tiny, kwargs))
            self.primed.add(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.table:
            return func(*args, **kwargs)
        if any(t is not torch.Tensor and t is not torch.nn.Parameter for t in types):
            return NotImplemented
        if func in GEMMS:
            self.prime(func, args, kwargs)
        try:
            out = self.outputs(func, args, kwargs)
        except (NotImplementedError, RuntimeError):  # no (usable) meta kernel: run the real one
            self.fallbacks[str(func)] += 1
            return func(*args, **kwargs)
        # the kernel's buffers: alive together during the call, freed at its end
        transient = [torch.empty(n, dtype=torch.uint8, device=self.device(args))
                     for n in self.transients(func, args, kwargs) if n]
        del transient
        self.calls[str(func)] += 1
        return out

    @staticmethod
    def device(args) -> torch.device:
        return next(t.device for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor))

    def outputs(self, func, args, kwargs):
        """The op's outputs as its meta kernel shapes them, allocated on the real device."""
        device = self.device(args)
        to_meta = lambda t: (torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")
                             if isinstance(t, torch.Tensor) else t)
        meta = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        real = lambda m: (torch.empty_strided(m.size(), m.stride(), dtype=m.dtype, device=device).zero_()
                          if isinstance(m, torch.Tensor) else m)
        return tree_map(real, meta)

    def transients(self, func, args, kwargs) -> List[int]:
        """Bytes of each buffer the real kernel allocates and frees within the call."""
        return self.table[func](named_args(func, args, kwargs))


def memory_mode(*, gemms: bool = False) -> KernelStandins:
    """Stand-ins for attention (and GEMMs) within a `with` block: `with memory_mode() as s:`."""
    return KernelStandins(gemms=gemms)


# ---- measuring: the CPU allocator through the profiler, the CUDA one through its counters ---


def cpu_trace(fn):
    """(fn(), peak, net): the CPU allocator's bytes during fn, above its start (probe.meter's
    replay of the profiler's memory events)."""
    from .meter import CpuMeter

    meter = CpuMeter()
    meter.start()
    meter.mark("start")
    meter.open_peak("fn")
    out = fn()
    meter.close_peak()
    meter.mark("end")
    meter.finish()
    start = meter.point("start")[0]
    return out, meter.peak("fn")[0] - start, meter.point("end")[0] - start


def _cuda_trace(fn):
    """(fn(), peak, net): the caching allocator's bytes during fn, above the start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before


def _calls(q, k, v, do, scale):
    """family -> (first call, second call from the first's outputs), each (op, args, kwargs):
    an attention forward and its backward, or two GEMMs."""
    sq, sk, kw, t = q.shape[2], k.shape[2], {"scale": scale}, lambda x: x.transpose(1, 2)
    a, b = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]).T  # [b h sq, d] @ [d, b hk sk]
    return {
        "flash_for_cpu": (
            (aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v, 0.0, True), kw),
            lambda o: (aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                       (do, q, k, v, o[0], o[1], 0.0, True), kw)),
        "flash": (
            (aten._scaled_dot_product_flash_attention.default, (q, k, v, 0.0, True, False), kw),
            lambda o: (aten._scaled_dot_product_flash_attention_backward.default,
                       (do, q, k, v, o[0], o[1], o[2], o[3], sq, sk, 0.0, True, o[6], o[7]), kw)),
        "flash_raw": (
            (aten._flash_attention_forward.default, (t(q), t(k), t(v), None, None, sq, sk, 0.0, True, False), kw),
            lambda o: (aten._flash_attention_backward.default,
                       (t(do), t(q), t(k), t(v), o[0], o[1], None, None, sq, sk, 0.0, True, o[2], o[3]), kw)),
        "cudnn": (
            (aten._scaled_dot_product_cudnn_attention.default, (q, k, v, None, True, 0.0, True, False), kw),
            lambda o: (aten._scaled_dot_product_cudnn_attention_backward.default,
                       (do, q, k, v, o[0], o[1], o[6], o[7], None, None, None, sq, sk, 0.0, True), kw)),
        "efficient": (
            (aten._scaled_dot_product_efficient_attention.default, (q, k, v, None, True, 0.0, True), kw),
            lambda o: (aten._scaled_dot_product_efficient_attention_backward.default,
                       (do, q, k, v, None, o[0], o[1], o[2], o[3], 0.0, [True, True, True, False], True), kw)),
        "gemm": ((aten.mm.default, (a, b), {}),
                 lambda o: (aten.addmm.default, (o[0, :1], a, b), {})),
    }


# (b, hq, hk, sq, sk, d): square, a chunk against a longer prefix, and GQA (flash only)
CALIBRATION_SHAPES = [(1, 8, 8, 1024, 1024, 128), (2, 4, 4, 512, 2048, 64), (1, 16, 4, 2048, 2048, 128)]
GQA_FAMILIES = ("flash", "flash_raw", "flash_for_cpu", "gemm")


def _layout(out):
    return [(tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t
            for t in (out if isinstance(out, (tuple, list)) else [out])]


def _compare(report, key, op, args, kwargs, measure, gemms):
    """Measure op and its stand-in; returns the real outputs."""
    real = lambda: op(*args, **kwargs)
    standins = KernelStandins(gemms=gemms)

    def standin():
        with standins:
            return real()

    for fn in (real, standin):  # warm-ups: cuDNN builds its graph, cuBLAS its workspace
        fn()
    out, peak, net = measure(real)
    s_out, s_peak, s_net = measure(standin)
    report[f"{key} {op.name()}"] = {
        "real": [peak, net], "standin": [s_peak, s_net], "transient": peak - net,
        "formula": sum(standins.transients(op, args, kwargs)),
        "layout": [] if _layout(out) == _layout(s_out) else [_layout(out), _layout(s_out)],
    }
    return out


def calibrate(device, dtype=None, shapes=CALIBRATION_SHAPES) -> Dict[str, dict]:
    """Each intercepted op of `device`'s type, run for real and as its stand-in at a few shapes,
    q/k/v contiguous ("bhsd") and as Megatron hands them to SDPA ("sbhd" permuted):
    "{family} {layout} {shape} {op}" -> {"real": [peak, net], "standin": [peak, net],
    "transient": peak - net of the real op, "formula": the table's sum, "layout": [real, meta]
    output layouts where they differ} in bytes above the call's start. On CUDA it reads the
    caching allocator (bf16 by default), on the CPU the profiler (the CPU flash kernel, fp32 by
    default). A family this device cannot run (no cuDNN, an old GPU) reads {"error": ...}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"calibrate({device}): this machine has no CUDA device (torch {torch.__version__})")
    families = ("flash", "flash_raw", "cudnn", "efficient", "gemm") if cuda else ("flash_for_cpu",)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    measure = _cuda_trace if cuda else cpu_trace
    report = {}
    for (b, hq, hk, sq, sk, d), layout in ((shape, lay) for shape in shapes for lay in ("bhsd", "sbhd")):
        g = torch.Generator(device=device).manual_seed(0)

        def new(heads, length):
            if layout == "bhsd":
                return torch.randn(b, heads, length, d, generator=g, device=device, dtype=dtype)
            return torch.randn(length, b, heads, d, generator=g, device=device, dtype=dtype).permute(1, 2, 0, 3)

        q, k, v, do = new(hq, sq), new(hk, sk), new(hk, sk), new(hq, sq)
        for family, (first, second) in _calls(q, k, v, do, d ** -0.5).items():
            if family not in families or (hk != hq and family not in GQA_FAMILIES):
                continue
            key, out = f"{family} {layout} {(b, hq, hk, sq, sk, d)}", None
            try:
                out = _compare(report, key, *first, measure, family == "gemm")
                _compare(report, key, *second(out), measure, family == "gemm")
            except RuntimeError as e:  # this device / build lacks the kernel
                report[key] = {"error": str(e).splitlines()[0]}
    return report
