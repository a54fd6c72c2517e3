"""Chunk-attention kernels on one GPU: correctness against fp32 math, and speed of the TSP
chunk shapes (each zigzag chunk against its causal prefix), flash vs cudnn.

    python benchmarks/attention_kernels.py --out results.json

Shapes: D = 4 TSP ranks, 32 heads (8 per shard, MHA) or 8 KV groups (2 per shard, GQA),
head dim 128, bf16, micro-batch 1. Rank r holds chunks r and 2D-1-r of length c = S / 2D;
per rank, forward + backward of both chunks is timed with CUDA events (median of repeats).
FLOPs of a chunk at start s: forward 4 * heads * hn * c * (s + (c + 1) / 2) (QK^T and PV over
the visible keys), backward 2.5x forward (the usual flash accounting, no recompute counted).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from measure_hardware import timed  # this folder's timing helper (median of CUDA-event timings)

from megatron_tsp.bench.worker import measure_peak
from megatron_tsp.tsp.kernels import chunk_backward, chunk_forward


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(backend, hq, hk, c, L, d=128):
    g = torch.Generator(device="cuda").manual_seed(hq * 7 + L)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v, do = mk(1, hq, c, d), mk(1, hk, L, d), mk(1, hk, L, d), mk(1, hq, c, d)
    scale = d ** -0.5
    o, lse = chunk_forward(q, k, v, scale, backend)
    dq, dk, dv = chunk_backward(do, q, k, v, o, lse, scale, backend)
    f = [t.float() for t in (q, k, v, do)]
    o_ref, lse_ref = chunk_forward(f[0], f[1], f[2], scale, "math")
    grads_ref = chunk_backward(f[3], f[0], f[1], f[2], o_ref, lse_ref, scale, "math")
    return {"o": rel(o, o_ref), "lse": rel(lse, lse_ref), "dq": rel(dq, grads_ref[0]),
            "dk": rel(dk, grads_ref[1]), "dv": rel(dv, grads_ref[2])}


def time_rank(backend, S, D, r, hq, hk, d=128, repeats=5):
    c = S // (2 * D)
    starts = (r * c, (2 * D - 1 - r) * c)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    k, v = mk(1, hk, S, d), mk(1, hk, S, d)
    qs = [mk(1, hq, c, d) for _ in starts]
    dos = [mk(1, hq, c, d) for _ in starts]
    scale = d ** -0.5

    def run():
        for q, do, s in zip(qs, dos, starts):
            o, lse = chunk_forward(q, k[:, :, : s + c], v[:, :, : s + c], scale, backend)
            chunk_backward(do, q, k[:, :, : s + c], v[:, :, : s + c], o, lse, scale, backend)

    t = timed(run, warmup=1, iters=repeats)
    flops = sum(3.5 * 4 * hq * d * c * (s + (c + 1) / 2) for s in starts)
    return {"backend": backend, "S": S, "rank": r, "heads": hq, "kv_heads": hk, "seconds": t,
            "tflops": flops / t / 1e12}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", default="16384,65536,131072")
    args = ap.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "matmul_bf16_tflops": measure_peak(torch.device("cuda"))[0] / 1e12, "checks": [], "timings": []}
    for backend in ("flash", "cudnn"):
        for hq, hk in ((8, 8), (8, 2)):
            for c, L in ((256, 256), (256, 1280), (512, 3584)):
                try:
                    errs = check(backend, hq, hk, c, L)
                except Exception as e:  # a kernel the build lacks: record, go on
                    errs = {"error": f"{type(e).__name__}: {e}"[:300]}
                result["checks"].append({"backend": backend, "heads": hq, "kv_heads": hk, "c": c, "L": L, **errs})
                print(result["checks"][-1], flush=True)
    for S in [int(s) for s in args.seq.split(",")]:
        for hq, hk in ((8, 8), (8, 2)):
            for backend in ("flash", "cudnn"):
                for r in (0, 3):
                    try:
                        row = time_rank(backend, S, 4, r, hq, hk)
                    except Exception as e:
                        row = {"backend": backend, "S": S, "rank": r, "heads": hq, "kv_heads": hk,
                               "error": f"{type(e).__name__}: {e}"[:300]}
                    result["timings"].append(row)
                    print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
