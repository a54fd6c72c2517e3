"""Issue 17, "On one H200 GPU": TSP prefill at D = 1 of a 7B-width model with few layers at long
contexts, then a few decode steps; peak memory and time to first token.

    python benchmarks/inference_d1.py --seq 128K,256K,512K,1M --layers 4 --new 8 \\
        --out $OUT/inference_d1.jsonl                  # one GPU, world 1
    python benchmarks/inference_d1.py --smoke           # CPU, a tiny float32 model

The model is configs/7b_16k.yaml's (h 4096, 32 heads, SwiGLU f 16384, vocab 32000, bf16) with
`--layers` layers and random weights (the recipe's seed), built as `megatron-tsp generate` builds
it (megatron_tsp.inference.cli.build_and_load, TSP size 1). The decode model (Megatron's GPTModel
on the same parameters) is built before any measurement. Per S: one prompt of S random tokens,
`megatron_tsp.inference.generate` with `--new` greedy tokens; recorded: time to first token
(prefill + cache hand-over + first sample), decode tokens/s, torch.cuda.max_memory_allocated over
the call (weights included), the KV cache's size, and out-of-memory as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

RECIPE = os.path.join(ROOT, "configs", "7b_16k.yaml")
SMOKE = ["model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128", "model.vocab_size=256",
         "model.dtype=float32"]


def parse_seq(text: str) -> int:
    t = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2}.get(t[-1:], 1)
    return int(t[:-1] if scale > 1 else t) * scale


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="128K", help="comma-separated prompt lengths, e.g. 128K,256K,512K,1M")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new", type=int, default=8, help="greedy tokens decoded after the prefill")
    p.add_argument("--out", default=None, help="append one JSON line per S here")
    p.add_argument("--smoke", action="store_true", help="CPU: a tiny float32 model, S = 64, 96")
    args = p.parse_args(argv)

    import torch

    from megatron_tsp.inference import decode_model, generate
    from megatron_tsp.inference.cli import build_and_load
    from megatron_tsp.training.loop import init_groups
    from megatron_tsp.training.recipe import load_recipe
    from megatron_tsp.training.build import init_distributed

    from megatron_tsp.training.cpu import install_cpu_shims

    init_distributed()
    install_cpu_shims()  # CPU (--smoke) only: a no-op with CUDA
    seqs = [64, 96] if args.smoke else [parse_seq(s) for s in args.seq.split(",")]
    overrides = [f"model.num_layers={args.layers}", f"model.seq_length={-(-(max(seqs) + args.new) // 2) * 2}", "parallel.layout=tsp",
                 "parallel.size=1"] + (SMOKE if args.smoke else [])
    recipe = load_recipe(RECIPE, overrides)
    model = build_and_load(recipe, None, init_groups(recipe))
    decode_model(model)  # built once, before the measurements
    cuda = torch.cuda.is_available()
    m = recipe.model
    groups = m.num_query_groups or m.num_attention_heads
    bytes_per = torch.finfo(next(model.parameters()).dtype).bits // 8
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    rows = []
    for S in seqs:
        g = torch.Generator().manual_seed(S)
        prompt = torch.randint(0, m.vocab_size, (S,), generator=g).tolist()
        row = {"S": S, "layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_attention_heads,
               "query_groups": groups, "ffn": m.ffn_hidden_size, "vocab": m.vocab_size, "dtype": m.dtype,
               "new_tokens": args.new, "commit": commit(),
               "device": torch.cuda.get_device_name() if cuda else "cpu", "weights_gib": weights_gib,
               "kv_cache_gib": 2 * m.num_layers * S * groups * (m.hidden_size // m.num_attention_heads) * bytes_per
               / 2**30}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            start = time.perf_counter()
            result = generate(model, [prompt], args.new)
            row.update(status="ok", time_to_first_token_s=result.time_to_first_token, decode_s=result.decode_time,
                       decode_tokens_per_s=(len(result.tokens[0]) - 1) / result.decode_time if result.decode_time else None,
                       wall_s=time.perf_counter() - start, tokens=result.tokens[0])
        except torch.OutOfMemoryError as e:
            row.update(status="oom", error=str(e).splitlines()[0])
        if cuda:
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print("inference_d1 " + json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
