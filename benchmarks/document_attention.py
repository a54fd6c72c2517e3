"""Packed-sequence attention on one GPU (issue 27, item 5): per TSP rank, the document-masked
chunk attention (forward + backward) against the unmasked causal one, beside the share of the
causal work the documents leave (sum of doc_len^2 / S^2, counted exactly on the rank's chunks).

    python benchmarks/document_attention.py --seq 128K,1M --world 1,4 --out rows.jsonl

Shapes: the 7B's attention (32 heads MHA, head dim 128, bf16), micro-batch 1; documents of
uniform random lengths in [--min-doc, --max-doc] (4K-64K), the last one cut at S. Rank 0 of D holds
the zigzag chunks 0 and 2D-1 of c = S / 2D tokens, each against its causal prefix, as
`tsp.attention.AttentionShard` runs them (`key_range`: for flex every key of the causal prefix, the
block mask skipping what the documents hide). Masked: the `flex` kernel (FlexAttention, block mask from the document ids); unmasked:
cuDNN (what `auto` picks) and flex without documents. Also a correctness check of flex against
float32 math with the dense mask. Timed with CUDA events (median). One row per (S, D) in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from measure_hardware import (
    timed,  # this folder's timing helper (median of CUDA-event timings)
)

from megatron_tsp.bench.rows import parse_seq
from megatron_tsp.tsp.documents import chunk_mask
from megatron_tsp.tsp.kernels import chunk_backward, chunk_forward


DEVICE = "cuda"


def _timed(fn, warmup, iters):
    if DEVICE == "cuda":
        return timed(fn, warmup=warmup, iters=iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def documents(S: int, lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    """Document ids [1, S] (int32, non-decreasing) of lengths uniform in [lo, hi], the last cut at S."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < S:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        lengths.append(min(n, S - total))
        total += lengths[-1]
    ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
    return ids.unsqueeze(0).to(DEVICE)


def pairs(doc_ids: torch.Tensor, start: int, c: int) -> tuple:
    """(causal pairs, document-masked pairs) of queries [start, start + c) over keys [0, start + c)."""
    q = torch.arange(start, start + c, device=doc_ids.device)
    causal = int((q + 1).sum())
    first = torch.searchsorted(doc_ids[0].contiguous(), doc_ids[0, start:start + c].contiguous(), right=False)
    return causal, int((q + 1 - first).sum())


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_flex(S=8192, D=2, d=128, heads=4):
    """flex (bf16, compiled) against float32 math with the dense document mask, rank 0's chunk 1."""
    doc = documents(S, 256, 2048, seed=1)
    c = S // (2 * D)
    start = (2 * D - 1) * c
    lo = 0  # as key_range gives flex
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype, generator=g)  # noqa: E731
    q, k, v, do = mk(1, heads, c, d), mk(1, heads, start + c - lo, d), mk(1, heads, start + c - lo, d), mk(1, heads, c, d)
    scale = d ** -0.5
    ids = (doc[:, start:start + c], doc[:, lo:start + c])
    o, lse = chunk_forward(q, k, v, scale, "flex", mask=ids)
    grads = chunk_backward(do, q, k, v, o, lse, scale, "flex", mask=ids)
    dense = chunk_mask(doc, start, c, lo, start + c)
    f = [t.float() for t in (q, k, v, do)]
    o_ref, lse_ref = chunk_forward(f[0], f[1], f[2], scale, "math", mask=dense)
    ref = chunk_backward(f[3], f[0], f[1], f[2], o_ref, lse_ref, scale, "math", mask=dense)
    return {"o": rel(o, o_ref), "lse": rel(lse, lse_ref), "dq": rel(grads[0], ref[0]), "dk": rel(grads[1], ref[1]),
            "dv": rel(grads[2], ref[2])}


def time_rank(S, D, doc, heads=32, d=128, repeats=3):
    """Forward + backward of rank 0's two chunks: masked (flex), unmasked (cudnn, flex)."""
    c = S // (2 * D)
    starts = (0, (2 * D - 1) * c)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype)  # noqa: E731
    k, v = mk(1, heads, S, d), mk(1, heads, S, d)
    qs = [mk(1, heads, c, d) for _ in starts]
    dos = [mk(1, heads, c, d) for _ in starts]
    scale = d ** -0.5

    def step(backend, masked):
        for q, do, s in zip(qs, dos, starts):
            kk, vv = k[:, :, :s + c], v[:, :, :s + c]
            kw = {"mask": (doc[:, s:s + c], doc[:, :s + c])} if masked else {}
            o, lse = chunk_forward(q, kk, vv, scale, backend, **kw)
            chunk_backward(do, q, kk, vv, o, lse, scale, backend, **kw)

    row = {}
    unmasked = "cudnn" if DEVICE == "cuda" else "math"  # the CPU smoke run: the math kernel
    runs = [(unmasked, unmasked, False), ("flex", "flex", False), ("flex_documents", "flex", True)]
    if S > 256 * 1024:  # an unmasked step takes seconds there: cuDNN once, flex unmasked not
        runs, repeats = [runs[0], runs[2]], 1
    for name, backend, masked in runs:
        t0 = time.time()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row[f"{name}_s"] = _timed(lambda b=backend, m=masked: step(b, m), warmup=1, iters=repeats)
        if DEVICE == "cuda":
            row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row[f"{name}_wall_s"] = time.time() - t0
    causal = masked = 0
    for s in starts:
        a, b = pairs(doc, s, c)
        causal, masked = causal + a, masked + b
    row.update({"causal_pairs": causal, "document_pairs": masked, "work_share": masked / causal})
    row["masked_over_unmasked"] = row["flex_documents_s"] / row[f"{unmasked}_s"]
    row["bound"] = 1.25 * row["work_share"]  # the issue's: at most 1.25 x (sum doc^2 / S^2) x unmasked
    row["within_bound"] = row["masked_over_unmasked"] <= row["bound"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", default="128K,1M")
    p.add_argument("--world", default="1,4")
    p.add_argument("--cases", default=None, help="S:D pairs (e.g. 128K:1,128K:4,1M:4) instead of --seq x --world")
    p.add_argument("--min-doc", default="4K")
    p.add_argument("--max-doc", default="64K")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (math for the unmasked "
                   "kernel, wall-clock timing), tiny shapes only")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    info = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "commit": os.environ.get("TSP_COMMIT", "unknown")}
    err = check_flex(S=8192 if DEVICE == "cuda" else 1024)
    print(f"[document_attention] flex vs float32 math (rel. error): {err}", flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps({"check": err, **info}) + "\n")
    lo, hi = parse_seq(args.min_doc), parse_seq(args.max_doc)
    cases = ([(parse_seq(a), int(b)) for a, b in (x.split(":") for x in args.cases.split(","))] if args.cases
             else [(parse_seq(s), int(d)) for s in args.seq.split(",") for d in args.world.split(",")])
    for S, D in cases:
        doc = documents(S, lo, hi)
        try:
            row = time_rank(S, D, doc, heads=args.heads)
        except torch.OutOfMemoryError as e:
            row = {"oom": str(e).splitlines()[0]}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        row.update({"seq_len": S, "world": D, "documents": int(doc.max()) + 1, "doc_tokens": [lo, hi], **info})
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[document_attention] S={S // 1024}K D={D}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            if k not in info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
