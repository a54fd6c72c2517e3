"""Measure the rates the planner uses and write a hardware profile (configs/hardware/*.yaml).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc-per-node 4 benchmarks/measure_hardware.py configs/hardware/h200x4.yaml

Under torchrun with N GPUs (one node; on several nodes the collectives are also measured over
one rank per node and written as `links.inter_node`), in well under a minute:

- matmul: bf16 8192^3 (peak) and the 7B layer's GEMM shapes at 4096 local tokens (sustained,
  what the planner uses), forward GEMMs, median of timed repeats, CUDA events;
- attention: torch SDPA, bf16, head_dim 128, 8 heads, forward + backward, FLOPs of the unmasked
  area (backward = 2.5 x forward): a square causal 16K block and a 2K chunk against a 16K
  causal prefix (lower-right mask), each with the default dispatch (what the layouts run) and
  with the flash and cuDNN backends forced where available;
- HBM: a 1 GiB device-to-device copy (read + write bytes);
- NCCL bus bandwidth (nccl-tests convention), 64 MiB per rank: all-gather, reduce-scatter,
  all-reduce, broadcast, reduce, ring send/recv (batch_isend_irecv).

Rank 0 writes the YAML (keeping the existing profile's calibrated `elementwise_efficiency`
and anything not measured) and prints a summary.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml


def timed(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def matmul_rates(dev):
    def rate(m, k, n):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        return 2 * m * k * n / timed(lambda: F.linear(x, w)) / 1e12

    peak = rate(8192, 8192, 8192)
    tokens, h, f = 4096, 4096, 16384  # 7B layer at 16K / D=4 local tokens; full-width shards
    shapes = [(tokens, h, 3 * h), (tokens, h, h), (tokens, h, 2 * f), (tokens, f, h)]
    flops = [2 * m * k * n for m, k, n in shapes]
    secs = [fl / (rate(m, k, n) * 1e12) for fl, (m, k, n) in zip(flops, shapes)]
    return peak, sum(flops) / sum(secs) / 1e12


def attention_rates(dev):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    heads, hd = 8, 128
    out = {}

    def run(q_len, k_len, backend, lower_right):
        q = torch.randn(1, heads, q_len, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, heads, k_len, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, heads, k_len, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        mask = causal_lower_right(q_len, k_len) if lower_right else None
        g = torch.randn(1, heads, q_len, hd, device=dev, dtype=torch.bfloat16)

        def step():
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not lower_right)
            o.backward(g)

        ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
        try:
            with ctx:
                t = timed(step, warmup=2, iters=5)
        except RuntimeError:
            return None
        area = q_len * k_len - q_len * (q_len - 1) / 2  # unmasked (q, k) pairs, lower-right causal
        return 4 * area * hd * heads * 3.5 / t / 1e12  # forward 4 * area * hd, backward 2.5 x

    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION,
                "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}
    for fam, (ql, kl, lr) in {"square_causal": (16384, 16384, False),
                              "rect_lower_right": (2048, 16384, True)}.items():
        for name, be in backends.items():
            if name != "default" and be is None:
                continue
            r = run(ql, kl, be, lr)
            if r is not None:
                out[f"{fam}_{name}"] = r
    return out


def hbm_rate(dev):
    n = 2**30 // 2
    a = torch.empty(n, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / timed(lambda: b.copy_(a)) / 1e12


def nccl_rates(group, dev, nbytes=64 * 2**20):
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    elems = nbytes // 2
    x = torch.randn(elems, device=dev, dtype=torch.bfloat16)
    full = torch.empty(elems * n, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    g = lambda r: dist.get_global_rank(group, r)  # noqa: E731
    out = {}
    t = timed(lambda: dist.all_gather_into_tensor(full, x, group=group))
    out["all_gather"] = nbytes * n / t * (n - 1) / n / 1e9
    t = timed(lambda: dist.reduce_scatter_tensor(y, full, group=group))
    out["reduce_scatter"] = nbytes * n / t * (n - 1) / n / 1e9
    full_out = torch.empty_like(full)
    t = timed(lambda: dist.all_to_all_single(full_out, full, group=group))  # the MoE dispatcher's collective
    out["all_to_all"] = nbytes * n / t * (n - 1) / n / 1e9
    t = timed(lambda: dist.all_reduce(x, group=group))
    out["all_reduce"] = nbytes / t * 2 * (n - 1) / n / 1e9
    t = timed(lambda: dist.broadcast(x, src=g(0), group=group))
    out["broadcast"] = nbytes / t / 1e9
    t = timed(lambda: dist.reduce(x, dst=g(0), group=group))
    out["reduce"] = nbytes / t / 1e9

    def ring():
        ops = [dist.P2POp(dist.isend, x, g((rank + 1) % n), group), dist.P2POp(dist.irecv, y, g((rank - 1) % n), group)]
        for r in dist.batch_isend_irecv(ops):
            r.wait()

    t = timed(ring)
    out["send_recv"] = nbytes / t / 1e9
    # every rank's numbers: report the slowest rank's (a collective ends when the last does)
    vals = torch.tensor([out[k] for k in sorted(out)], device=dev, dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MIN, group=group)
    return {k: float(v) for k, v in zip(sorted(out), vals.tolist())}


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "hardware_profile.yaml"
    t0 = time.time()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // per_node
    props = torch.cuda.get_device_properties(dev)

    intra = None
    for node in range(nodes):
        grp = dist.new_group(list(range(node * per_node, (node + 1) * per_node)))
        if rank in range(node * per_node, (node + 1) * per_node):
            intra = grp
    links = {"intra_node": nccl_rates(intra, dev)} if per_node > 1 else {}
    if nodes > 1:
        inter = None
        for lr in range(per_node):
            grp = dist.new_group([n * per_node + lr for n in range(nodes)])
            if rank % per_node == lr:
                inter = grp
        links["inter_node"] = nccl_rates(inter, dev)
    dist.barrier()
    if rank == 0:
        peak, sustained = matmul_rates(dev)
        attn = attention_rates(dev)
        hbm = hbm_rate(dev)
    dist.barrier()
    if rank == 0:
        prof = {}
        if os.path.isfile(out_path):
            with open(out_path) as f:
                prof = yaml.safe_load(f) or {}
        when = datetime.date.today().isoformat()
        where = (f"measured by benchmarks/measure_hardware.py on {world} x {props.name} ({nodes} node(s)), "
                 f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {when}")
        prof["name"] = prof.get("name") or os.path.basename(out_path).rsplit(".", 1)[0]
        prof["gpus_per_node"] = per_node
        prof["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        prof["matmul"] = {"bf16_tflops": round(sustained, 1), "peak_bf16_tflops": round(peak, 1),
                          "source": where + "; bf16_tflops: the 7B layer's GEMM shapes at 4096 tokens; "
                                            "peak: one 8192^3 GEMM"}
        att = {"square_causal_tflops": round(attn["square_causal_default"], 1),
               "rect_lower_right_tflops": round(attn["rect_lower_right_default"], 1)}
        att.update({f"{k}_tflops": round(v, 1) for k, v in attn.items() if not k.endswith("_default")})
        att["source"] = (where + "; SDPA bf16, 8 heads x 128, fwd + bwd, unmasked-area FLOPs (bwd 2.5 x fwd); "
                         "square: 16K causal; rect: 2K chunk vs 16K prefix, lower-right; the family rates are the "
                         "default dispatch, *_flash / *_cudnn forced backends")
        prof["attention"] = att
        mem = prof.get("memory") or {}
        eff = mem.get("elementwise_efficiency", 0.485)
        prof["memory"] = {"hbm_tb_s": round(hbm, 2), "elementwise_efficiency": eff,
                          "source": where + "; hbm_tb_s: 1 GiB device-to-device copy (read + write). "
                          "elementwise_efficiency is not measured here: it is kept from the previous profile "
                          "(calibrated on a profiled step, docs/planner.md)"}
        lk = {}
        for name, rates in links.items():
            lk[name] = {f"{k}_gb_s": round(v, 1) for k, v in rates.items()}
            lk[name]["source"] = where + "; NCCL bus bandwidth (nccl-tests convention), 64 MiB per rank, slowest rank"
        lk.setdefault("inter_node", None)
        prof["links"] = lk
        with open(out_path, "w") as f:
            f.write("# Written by benchmarks/measure_hardware.py; see its docstring for what each number is.\n")
            yaml.safe_dump(prof, f, sort_keys=False, width=100)
        print(yaml.safe_dump(prof, sort_keys=False, width=100))
        print(f"wrote {out_path} in {time.time() - t0:.1f} s")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
