"""`megatron-tsp plan`: per-GPU memory, communication and predicted step time of TSP, TP,
TP+SP, CP, TP x CP and FSDP-over-CP for a model, context length and cluster.

    megatron-tsp plan configs/7b_16k.yaml --gpus-per-node 4 --hardware h200x4
    megatron-tsp plan --layers 32 --hidden 4096 --heads 32 --ffn 16384 --vocab 32000 \\
        --seq-len 131072 --gpus-per-node 8 --gpu-memory-gb 192 --json
    megatron-tsp plan configs/7b_16k.yaml --frontier --gpus-per-node 8 --json   # the longest contexts
    megatron-tsp plan configs/7b_16k.yaml --layout tsp4 --layout tp2xcp2   # two layouts on the default h200x4
    megatron-tsp plan configs/olmoe_1b_7b_4k.yaml --gpus-per-node 4 --expert-size 2   # MoE: experts on 2 GPUs
    megatron-tsp plan validate      # regenerate docs/plan_validation.md from benchmarks/results/*.json

Formulas: docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ..config import ATTENTION_KV, AUTO_TOKENS_BELOW, CP_COMM_TYPES, MLP_EXCHANGES, TSPConfigError
from .model import LAYER_RECOMPUTE, LM_HEADS, NORMS, RECOMPUTE_METHODS, RECOMPUTE_MODES, TrainSpec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-tsp plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples (each runs as written; tests/planner/test_plan_help.py runs them):\n"
                                       + __doc__.split("\n\n")[1].rstrip()
                                       + "\n\nSubcommand: `megatron-tsp plan validate [--out FILE]`. Formulas: docs/planner.md")
    p.add_argument("recipe", nargs="?", help="a training recipe (configs/*.yaml); flags below override it")
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    m = p.add_argument_group("model (without a recipe: --layers, --hidden, --heads are required)")
    # dest: the ModelSpec field (the recipe's model.<key>) each flag sets
    m.add_argument("--layers", type=int, dest="num_layers", help="model.num_layers")
    m.add_argument("--hidden", type=int, dest="hidden_size", help="model.hidden_size")
    m.add_argument("--heads", type=int, dest="num_attention_heads", help="model.num_attention_heads")
    m.add_argument("--kv-groups", type=int, dest="num_query_groups",
                   help="model.num_query_groups: KV groups (GQA); default: --heads (MHA)")
    m.add_argument("--ffn", type=int, dest="ffn_hidden_size", help="model.ffn_hidden_size: MLP width f; default 4 x hidden")
    m.add_argument("--vocab", type=int, dest="vocab_size", help="model.vocab_size (default without a recipe: 32000)")
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    m.add_argument("--no-gated", action="store_true", help="GELU MLP instead of SwiGLU")
    t = p.add_argument_group("training")
    # dest: the TrainSpec field (the recipe's parallel.<key> / train.<key> of that name) each flag sets
    t.add_argument("--seq-len", type=int, dest="seq_length", help="model.seq_length: context length S (default: "
                                                                   "the recipe's)")
    t.add_argument("--micro-batch", type=int, dest="micro_batch_size",
                   help="train.micro_batch_size: sequences per micro-batch (default: the recipe's, else 1)")
    t.add_argument("--global-batch", type=int, dest="global_batch_size",
                   help="sequences per step (default: micro-batch x data parallel)")
    t.add_argument("--optimizer", default="adam", help="adam, or none (forward + backward only)")
    t.add_argument("--distributed-optimizer", action="store_true", default=None,
                   help="shard fp32 master params and Adam state over data parallel (x CP) (default: the "
                        "recipe's train.distributed_optimizer)")
    t.add_argument("--optimizer-cpu-offload", action=argparse.BooleanOptionalAction, default=None,
                   dest="optimizer_cpu_offload",
                   help="train.optimizer_cpu_offload: fp32 main weights and Adam state on the host (bf16 model, "
                        "needs --distributed-optimizer; default: the recipe's). --frontier tries it either way")
    t.add_argument("--optimizer-offload-fraction", type=float, dest="optimizer_offload_fraction",
                   help="train.optimizer_offload_fraction: the offloaded share of the state, in (0, 1] (default 1)")
    t.add_argument("--recompute", choices=list(LAYER_RECOMPUTE),
                   help="parallel.recompute: Megatron's layer recompute for every layout (full: keep each "
                        "checkpointed layer's input only; selective: core attention, baselines only)")
    t.add_argument("--recompute-method", choices=list(RECOMPUTE_METHODS), help="parallel.recompute_method")
    t.add_argument("--recompute-num-layers", type=int,
                   help="parallel.recompute_num_layers: uniform: layers per checkpointed chunk (default 1); "
                        "block: the first N layers are recomputed (default all)")
    t.add_argument("--tsp-recompute", choices=list(RECOMPUTE_MODES),
                   help="parallel.tsp_recompute: TSP's in-layer mode (none: save per-shard activations; full: "
                        "recompute each shard from the block input)")
    t.add_argument("--offload-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="parallel.offload_activations: checkpointed layer inputs to pinned host memory (needs "
                        "--recompute full)")
    t.add_argument("--tsp-lm-head", choices=list(LM_HEADS),
                   help="parallel.tsp_lm_head: local (sequence-local head, chunked logits) or megatron (S x V/D "
                        "logits); TSP layouts only, the baselines run Megatron's")
    t.add_argument("--lm-head-chunk-tokens", type=int,
                   help=f"parallel.lm_head_chunk_tokens (default {TrainSpec.lm_head_chunk_tokens})")
    t.add_argument("--mlp-chunk-tokens", type=int,
                   help="parallel.mlp_chunk_tokens: the token-tiled MLP of every layout (0: untiled, the default): "
                        "the MLP keeps only its input and its backward works on one chunk of this many local tokens")
    t.add_argument("--tsp-attention-kv", choices=list(ATTENTION_KV),
                   help="parallel.tsp_attention_kv: gathered (each head shard's K/V of all S tokens on every rank) or "
                        "streamed (ring attention inside the shard: two ranks' K/V at a time); TSP layouts only")
    t.add_argument("--cp-comm-type", choices=list(CP_COMM_TYPES),
                   help="parallel.cp_comm_type: all_gather (the CP baseline gathers all S tokens' K/V on every CP "
                        "rank) or p2p (ring attention over the CP group: two ranks' K/V at a time); CP layouts only")
    t.add_argument("--document-length", type=int,
                   help="packed documents of this many tokens under document masks (data.reset_attention_mask): "
                        "attention FLOPs inside documents only, as a kernel that skips masked blocks "
                        "(0: one document per sequence, the default)")
    t.add_argument("--norm", choices=list(NORMS), default="lean",
                   help="lean: TSPNorm keeps its input + per-token fp32 statistics (issue 14); torch: torch's "
                        "composite norm (two fp32 copies; TSPNorm before lean norms); fused: TE's kernel")
    t.add_argument("--tsp-mlp-exchange", choices=list(MLP_EXCHANGES),
                   help="how TSP's MLP meets its weights (default: the recipe's parallel.tsp_mlp_exchange, else "
                        f"auto: tokens below {AUTO_TOKENS_BELOW} tokens per rank, else ring)")
    t.add_argument("--expert-size", type=int,
                   help="parallel.expert_size: expert-parallel size EP of an MoE model, for every layout planned "
                        "(E / EP experts per GPU; TSP: D or D x k)")
    c = p.add_argument_group("cluster")
    c.add_argument("--gpus-per-node", type=int, help="default: the hardware profile's")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpu-memory-gb", type=float, help="usable GiB per GPU (default: the hardware profile's)")
    c.add_argument("--host-memory-gb", type=float,
                   help="host GiB per node for what is offloaded (activations, optimizer state) (default: the "
                        "profile's host.memory_gib)")
    c.add_argument("--hardware", default="h200x4", help="configs/hardware/NAME.yaml or a path (default h200x4)")
    o = p.add_argument_group("output")
    o.add_argument("--layout", action="append", help="only these layouts (repeatable), named with their sizes: e.g. on "
                                                      "4 GPUs tsp4, tp4, tp_sp4, cp4, tp2xcp2, fsdp_cp4 "
                                                      "(tp2xcp4 needs 8 GPUs: --gpus-per-node 8)")
    o.add_argument("--json", action="store_true", help="JSON instead of tables")
    o.add_argument("--frontier", action="store_true",
                   help="per layout the longest context that fits (powers of two from the recipe's S to "
                        "--max-seq-len, then refined) and the fastest fitting recompute / offload / LM-head "
                        "configuration at each context (docs/frontier.md)")
    o.add_argument("--max-seq-len", type=int, default=4 * 2**20, help="--frontier: largest context searched (4M)")
    i = p.add_argument_group("inference (issue 17; docs/inference.md)")
    i.add_argument("--inference", action="store_true",
                   help="per layout (tsp, tp, tp with chunked prefill, cp) weights, KV cache, prefill working "
                        "set, peak and prefill time per GPU instead of training")
    i.add_argument("--prompt-tokens", type=int, help="--inference: prompt length (default: --seq-len / the recipe's)")
    i.add_argument("--new-tokens", type=int, default=0, help="--inference: tokens to decode (static cache size)")
    i.add_argument("--batch", type=int, default=1, help="--inference: prompts per batch")
    i.add_argument("--chunk-tokens", type=int, default=8192, help="--inference: TP chunked-prefill chunk (8192)")
    o.add_argument("--detail", action="store_true", help="also per-layout communication items and activations")
    return p


# the TrainSpec fields a flag sets (argparse dest = field name); a flag given overrides the recipe's key
_TRAIN_FLAGS = ("micro_batch_size", "distributed_optimizer", "recompute", "recompute_method", "recompute_num_layers",
                "tsp_recompute", "offload_activations", "tsp_lm_head", "lm_head_chunk_tokens", "tsp_mlp_exchange",
                "mlp_chunk_tokens", "expert_size", "tsp_attention_kv", "cp_comm_type", "optimizer_cpu_offload",
                "optimizer_offload_fraction", "document_length")
_MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
                "dtype")


def check_flags(args) -> None:
    """The flags the planner's inputs do not check themselves: a value no cluster or run can have
    is an error naming the flag (never a plan of nonsense, never a silent default)."""
    import math

    from . import PlanError
    from .model import check_seq_len

    for flag, value in (("--gpu-memory-gb", args.gpu_memory_gb), ("--host-memory-gb", args.host_memory_gb)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise PlanError(f"{flag} must be a positive number of GiB, got {value!r}")
    if args.frontier:
        check_seq_len("--max-seq-len", args.max_seq_len)
    if args.inference:
        for flag, value, least in (("--batch", args.batch, 1), ("--new-tokens", args.new_tokens, 0),
                                   ("--chunk-tokens", args.chunk_tokens, 0)):
            if value < least:
                raise PlanError(f"{flag} must be >= {least}, got {value}")
        if args.prompt_tokens is not None:
            check_seq_len("--prompt-tokens", args.prompt_tokens)


def build_inputs(args):
    from . import Cluster, Layout, ModelSpec, PlanError, TrainSpec, hardware
    from .model import recipe_train_options

    check_flags(args)

    hw = hardware.load(args.hardware)
    seq = None
    tsp = {}
    kw = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    if args.no_gated:
        kw["swiglu"] = False
    if args.recipe:
        model, seq = ModelSpec.from_recipe(args.recipe, args.overrides)
        tsp = recipe_train_options(args.recipe, args.overrides)
        if kw:
            import dataclasses

            model = dataclasses.replace(model, **kw)
    else:
        if args.overrides:
            raise PlanError(f"overrides {args.overrides} need a recipe")
        missing = [flag for flag, k in (("--layers", "num_layers"), ("--hidden", "hidden_size"),
                                        ("--heads", "num_attention_heads")) if k not in kw]
        if missing:
            raise PlanError("without a recipe give the model: missing " + ", ".join(missing))
        model = ModelSpec(**kw, name="model")
    seq = args.seq_length if args.seq_length is not None else seq
    if seq is None:
        raise PlanError("--seq-len is required without a recipe")
    for name in _TRAIN_FLAGS:
        if getattr(args, name) is not None:
            tsp[name] = getattr(args, name)
    train = TrainSpec(seq_length=seq, global_batch_size=args.global_batch_size, optimizer=args.optimizer,
                      norm=args.norm, **tsp)
    cluster = Cluster(gpus_per_node=hw.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node,
                      nodes=args.nodes,
                      gpu_memory_gib=args.gpu_memory_gb, host_memory_gib=args.host_memory_gb)
    layouts = [Layout.parse(x) for x in args.layout] if args.layout else None
    return model, train, cluster, hw, layouts


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "validate":
        from .validate import main as validate_main

        return validate_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        from . import plan_all
        from .report import render, render_detail, to_json

        if args.inference:
            return _inference(args)
        model, train, cluster, hw, layouts = build_inputs(args)
        if args.frontier:
            from . import frontier as fr

            rows, skipped_fr = fr.frontier(model, train, cluster, hw, layouts, args.max_seq_len)
        else:
            plans, skipped = plan_all(model, train, cluster, hw, layouts)
    except TSPConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.frontier:
        if args.json:
            import dataclasses

            print(json.dumps({"model": dataclasses.asdict(model), "train": dataclasses.asdict(train),
                              "cluster": dataclasses.asdict(cluster), "hardware": hw.name,
                              "host_copy_gb_s": hw.host_gb_s, "max_seq_len_searched": args.max_seq_len,
                              "gpu_memory_gib": cluster.gpu_memory_gib or hw.gpu_memory_gib,
                              "prediction": "planner model, not a measurement",
                              "layouts": rows, "skipped": skipped_fr}, indent=1))
        else:
            print(fr.render(model, train, cluster, hw, rows, skipped_fr))
        return 0
    if args.json:
        print(json.dumps(to_json(model, train, cluster, hw, plans, skipped), indent=1))
    else:
        print(render(model, train, cluster, hw, plans, skipped))
        if args.detail:
            for p in plans:
                print("\n" + render_detail(p))
    return 0


def _inference(args) -> int:
    """`--inference`: one row per layout (planner.prefill)."""
    from . import Layout, PlanError
    from .prefill import prefill_plan

    if args.prompt_tokens is not None:
        args.seq_length = args.prompt_tokens
    model, train, cluster, hw, layouts = build_inputs(args)
    if model.is_moe:
        raise PlanError(f"--inference models dense models: model.num_experts = {model.num_experts} (MoE prefill is "
                        "not modelled)")
    n = cluster.world
    runs = []
    for lay in layouts or [Layout("tsp", tsp_size=n), Layout("tp", tp=n), Layout("cp", cp=n)]:
        if lay.kind not in ("tsp", "tp", "cp"):
            raise PlanError(f"--inference models tsp, tp and cp layouts, not --layout {lay.kind}")
        runs.append((lay, None))
        if lay.kind == "tp" and args.chunk_tokens and args.chunk_tokens < train.seq_length:
            runs.append((lay, args.chunk_tokens))
    rows = [prefill_plan(model, lay, train.seq_length, hw, cluster, args.batch, args.new_tokens, chunk)
            for lay, chunk in runs]
    if args.json:
        print(json.dumps({"prompt_tokens": train.seq_length, "batch": args.batch, "new_tokens": args.new_tokens,
                          "hardware": hw.name, "prediction": "planner model, not a measurement",
                          "layouts": rows}, indent=1))
        return 0
    head = ("layout", "weights GiB", "KV cache GiB", "working set GiB", "peak GiB", "prefill s")
    print(f"{model.name}: prefill of {train.seq_length} tokens x {args.batch}, {hw.name} (planner model, per GPU)")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["layout"]] + [f"{r[k]:.2f}" for k in ("weights_gib", "kv_cache_gib", "working_set_gib",
                                                                   "peak_gib", "prefill_s")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
