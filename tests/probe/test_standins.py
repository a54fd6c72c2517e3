"""Memory mode (megatron_tsp/probe/standins.py): a step under the stand-ins allocates what the
real step allocates (the CPU allocator's peak and end state, read from the profiler), leaves
tensors of the same shapes, skips the kernels, and leaves nothing behind.

The bound: on the CPU in fp32 the stand-ins reproduce the peak to the byte (whole steps and
single ops), so the comparisons are exact; a stand-in that forgets a 4 KB log-sum-exp fails
them. bf16 backward is allowed oneDNN's GEMM scratch, which the table does not model."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten, tree_map

from megatron_tsp.probe import standins
from megatron_tsp.probe.standins import KernelStandins, calibrate, cpu_trace, memory_mode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONEDNN_SCRATCH = 256 * 1024  # largest measured: 230 KB (bf16, q/kv blocks 256/512, d 64)

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-allocator test; on the GPU the stand-ins are checked against real steps by scripts/gpu_probe.sh check")



@pytest.fixture(scope="module", autouse=True)
def warm_profiler():
    cpu_trace(lambda: torch.ones(1))  # the first profiled region keeps a few KB of its own


def attention_step(b, hq, hk, s, d, dtype, **kw):
    """SDPA forward and backward; returns the gradients' shapes."""
    def run():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=dtype, requires_grad=True) for h in (hq, hk, hk))
        F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk, **kw).sum().backward()
        return [tuple(t.grad.shape) for t in (q, k, v)]
    return run


def compare(run, mode=KernelStandins, slack=0):
    """Peak and net bytes and the result of `run`, real and under `mode`: equal (peak: the
    stand-ins' within `slack` below the real one)."""
    out, peak, net = cpu_trace(run)
    with mode() as m:
        s_out, s_peak, s_net = cpu_trace(run)
    assert s_out == out, f"results differ: {s_out} vs {out}"
    assert s_net == net, f"bytes left differ: {s_net} vs {net}"
    assert 0 <= peak - s_peak <= slack, f"peak {s_peak} under stand-ins vs {peak} (slack {slack})"
    return m


SHAPES = [(2, 4, 4, 128, 64), (1, 8, 2, 1000, 32), (1, 8, 8, 300, 128), (3, 2, 1, 64, 16)]
KWARGS = [dict(is_causal=True), dict(is_causal=False), dict(attn_mask=torch.rand(64, 64) > 0.3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kw", KWARGS, ids=["causal", "full", "mask"])
def test_sdpa_peak_exact_fp32(shape, kw):
    if "attn_mask" in kw and shape[3] != 64:
        pytest.skip("the mask is 64 x 64")
    m = compare(attention_step(*shape, torch.float32, **kw))
    assert m.calls == {"aten._scaled_dot_product_flash_attention_for_cpu.default": 1,
                       "aten._scaled_dot_product_flash_attention_for_cpu_backward.default": 1}


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_sdpa_peak_bf16_within_onednn_scratch(shape):
    compare(attention_step(*shape, torch.bfloat16, is_causal=True), slack=ONEDNN_SCRATCH)


def test_gemms_peak_exact():
    def run():
        lin = torch.nn.Linear(64, 96)
        x = torch.randn(4, 32, 64, requires_grad=True)
        (lin(x) @ torch.randn(96, 8)).relu().sum().backward()
        return [tuple(x.grad.shape), tuple(lin.weight.grad.shape)]

    m = compare(run, lambda: memory_mode(gemms=True))
    assert set(m.calls) <= {f"aten.{op}.default" for op in ("mm", "addmm", "bmm")} and m.calls


class Spy(TorchDispatchMode):
    """Records the ops that reach it with tensors on a real device (not meta)."""

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in tree_flatten((args, kwargs))[0]):
            self.ran.append(str(func))
        return func(*args, **(kwargs or {}))


def test_kernels_do_not_run():
    """Below the stand-ins, no attention kernel and no GEMM runs on real tensors; the values are
    zeros. Without them, the spy sees the kernels (it can see them)."""
    kernels = lambda ran: [op for op in ran if "attention" in op or op in ("aten.mm.default", "aten.bmm.default")]
    q = torch.randn(1, 2, 256, 32, requires_grad=True)
    for stubbed in (False, True):
        q.grad = None
        with Spy() as spy, (memory_mode(gemms=True) if stubbed else torch.autograd.set_grad_enabled(True)):
            o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            (o @ torch.randn(32, 4)).sum().backward()
        assert bool(kernels(spy.ran)) != stubbed, spy.ran
    assert o.abs().sum() == 0 and q.grad.abs().sum() == 0


@CPU_ONLY
def test_standin_takes_no_time():
    """A 0.13 s attention forward + backward (1 thread) takes 7 ms under stand-ins (the rest:
    randn, autograd), once both are warm (the first stand-in loads the meta kernels: 0.8 s)."""
    run = attention_step(1, 4, 4, 2048, 64, torch.float32, is_causal=True)
    run()
    with memory_mode():
        run()

    def fastest(repeats=3):  # the least of a few: a busy machine (CI's 2 cores) only slows a run down
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return min(times)

    real = fastest()
    with memory_mode():
        stub = fastest()
    assert stub < real / 10, (stub, real)


class ForgetsTransient(KernelStandins):
    def transients(self, func, args, kwargs):
        return []


class ForgetsLogsumexp(KernelStandins):
    def outputs(self, func, args, kwargs):
        out = super().outputs(func, args, kwargs)
        return (out[0], out[1].new_empty(0)) + tuple(out[2:]) if "backward" not in str(func) else out


class ForgetsGradOutCopy(KernelStandins):
    """The backward's contiguous copy of grad_out (a q-sized buffer) is one of the transients."""
    def transients(self, func, args, kwargs):
        return super().transients(func, args, kwargs)[1:] if "backward" in str(func) else []


@pytest.mark.parametrize("broken", [ForgetsTransient, ForgetsLogsumexp, ForgetsGradOutCopy])
def test_a_broken_standin_is_caught(broken):
    """A test of the comparison: each stand-in that misses an allocation fails it."""
    run = attention_step(2, 4, 4, 128, 64, torch.float32, is_causal=True)
    compare(run)
    with pytest.raises(AssertionError):
        compare(run, broken)


def test_leaving_restores_everything():
    stack, sdpa, op = _get_current_dispatch_mode_stack(), F.scaled_dot_product_attention, torch.ops.aten.mm.default
    with pytest.raises(ValueError):
        with memory_mode(gemms=True):
            raise ValueError("leaves by an exception")
    with memory_mode(gemms=True):
        pass
    assert _get_current_dispatch_mode_stack() == stack
    assert F.scaled_dot_product_attention is sdpa and torch.ops.aten.mm.default is op
    q = torch.randn(1, 2, 16, 8)
    ref = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, -1) @ q
    torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), ref)
    torch.testing.assert_close(torch.mm(q[0, 0], q[0, 0].T), q[0, 0] @ q[0, 0].T)


class Wrapper(torch.Tensor):
    """A minimal tensor subclass that unwraps itself for every op (as DTensor does)."""

    @staticmethod
    def __new__(cls, inner):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, strides=inner.stride())
        t.inner = inner
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.inner if isinstance(x, Wrapper) else x
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda x: Wrapper(x) if isinstance(x, torch.Tensor) else x, out)


def test_subclass_handled_by_its_dispatch_then_stubbed():
    a = Wrapper(torch.ones(4, 4))
    with memory_mode(gemms=True) as m:
        out = torch.mm(a, a)
    assert isinstance(out, Wrapper) and out.inner.abs().sum() == 0 and m.calls == {"aten.mm.default": 1}


def test_no_meta_kernel_runs_for_real():
    lib = torch.library.Library("standins_test", "DEF")  # an op with a CPU kernel only
    lib.define("double(Tensor x) -> Tensor")
    lib.impl("double", lambda x: x * 2, "CPU")
    op = torch.ops.standins_test.double.default
    mode = KernelStandins()
    mode.table[op] = standins._none
    with mode:
        out = op(torch.ones(3))
    assert out.tolist() == [2.0] * 3 and mode.fallbacks == {"standins_test.double.default": 1} and not mode.calls


@CPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_calibrate_cpu(dtype):
    """On the CPU the calibration measures the CPU flash kernel: the formulas are exact in fp32,
    and in bf16 off only by oneDNN's GEMM scratch (backward)."""
    report = calibrate("cpu", dtype=dtype, shapes=[(1, 4, 4, 256, 256, 64), (2, 4, 2, 128, 512, 32)])
    assert len(report) == 8  # 2 shapes x 2 layouts x forward, backward
    for key, row in report.items():
        assert not row["layout"], key
        slack = ONEDNN_SCRATCH if dtype == torch.bfloat16 and "backward" in key else 0
        assert 0 <= row["transient"] - row["formula"] <= slack, (key, row)
        assert 0 <= row["real"][0] - row["standin"][0] <= slack and row["real"][1] == row["standin"][1], (key, row)


@pytest.mark.parametrize("hk", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("layout", ["bhsd", "sbhd"])
def test_cuda_ops_through_their_standins_on_meta(layout, hk):
    """The GPU kernels' stand-ins run here on meta tensors (their outputs from the meta kernels,
    their formulas on the arguments): each op is answered, none falls back, the shapes are the
    kernels' (GQA: dk, dv at the key/value heads)."""
    b, hq, sq, sk, d = 2, 8, 128, 256, 64
    new = lambda h, s: (torch.empty(b, h, s, d, dtype=torch.bfloat16, device="meta") if layout == "bhsd" else
                        torch.empty(s, b, h, d, dtype=torch.bfloat16, device="meta").permute(1, 2, 0, 3))
    q, k, v, do = new(hq, sq), new(hk, sk), new(hk, sk), new(hq, sq)
    for family, (first, second) in standins._calls(q, k, v, do, 0.125).items():
        if family == "flash_for_cpu" or (hk != hq and family not in standins.GQA_FAMILIES):
            continue
        with KernelStandins(gemms=True) as mode:
            op, args, kwargs = first
            out = op(*args, **kwargs)
            op2, args2, kwargs2 = second(out)
            grads = op2(*args2, **kwargs2)
        assert sum(mode.calls.values()) == 2 and not mode.fallbacks, (family, mode.calls, mode.fallbacks)
        if family != "gemm":
            assert mode.transients(op2, args2, kwargs2), family
            assert [g.shape[2 if family == "flash_raw" else 1] for g in grads[:3]] == [hq, hk, hk], family


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_calibrate_cuda_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="CUDA"):
        calibrate("cuda")


@CPU_ONLY
@pytest.mark.parametrize("world, gemms, overrides", [
    (2, True, ["parallel.layout=tsp", "parallel.size=2"]),
    (2, False, ["parallel.layout=tp_sp", "parallel.size=2"]),
    (4, True, ["parallel.layout=dp", "parallel.context_size=4", "train.global_batch_size=2"]),
], ids=["tsp", "tp_sp", "cp"])
def test_training_step_same_peak(world, gemms, overrides):
    """Rank 0 of the tiny recipe under the fake process group (tests/probe/step_memory.py): one
    step real, one under memory mode; same peak and end state to the byte, same gradients'
    shapes. (On the CPU TSP and CP attention run the `math` backend: only GEMMs are stubbed.)"""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.join(REPO, "tests", "probe", "step_memory.py"), str(world), str(int(gemms))]
    res = subprocess.run(cmd + overrides, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["stub"] == out["real"] and out["calls"] and not out["fallbacks"], out
