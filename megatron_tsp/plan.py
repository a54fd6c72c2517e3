"""`megatron-tsp plan`: per-GPU memory, communication and predicted step time of TSP, TP,
TP+SP, CP, TP x CP and FSDP-over-CP for a model, context length and cluster.

    megatron-tsp plan configs/7b_16k.yaml --gpus-per-node 4 --hardware h200x4
    megatron-tsp plan --layers 32 --hidden 4096 --heads 32 --ffn 16384 --vocab 32000 \\
        --seq-len 131072 --gpus-per-node 8 --gpu-memory-gb 192 --json
    megatron-tsp plan validate      # regenerate docs/plan_validation.md from benchmarks/results/*.json

Formulas: docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .config import AUTO_TOKENS_BELOW, MLP_EXCHANGES, TSPConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-tsp plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Subcommand: `megatron-tsp plan validate [--out FILE]`. Formulas: docs/planner.md")
    p.add_argument("recipe", nargs="?", help="a training recipe (configs/*.yaml); flags below override it")
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    m = p.add_argument_group("model (without a recipe: --layers, --hidden, --heads are required)")
    m.add_argument("--layers", type=int)
    m.add_argument("--hidden", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--kv-groups", type=int, help="KV groups (GQA); default: --heads (MHA)")
    m.add_argument("--ffn", type=int, help="MLP width f; default 4 x hidden")
    m.add_argument("--vocab", type=int)
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    m.add_argument("--no-gated", action="store_true", help="GELU MLP instead of SwiGLU")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, help="context length S (default: the recipe's)")
    t.add_argument("--micro-batch", type=int, default=1)
    t.add_argument("--global-batch", type=int, help="sequences per step (default: micro-batch x data parallel)")
    t.add_argument("--optimizer", default="adam")
    t.add_argument("--distributed-optimizer", action="store_true",
                   help="shard fp32 master params and Adam state over data parallel (x CP)")
    t.add_argument("--recompute", choices=["auto", "none", "full"], default="auto",
                   help="auto: as each layout runs today (TSP recomputes each block, baselines none); "
                        "none: TSP saves per-shard activations, baselines no recompute; full: TSP block "
                        "recompute, baselines Megatron full-layer recompute")
    t.add_argument("--norm", choices=["torch", "fused"], default="torch",
                   help="torch: composite torch norm (no Transformer Engine, what runs here); fused: TE/apex")
    t.add_argument("--tsp-mlp-exchange", choices=list(MLP_EXCHANGES),
                   help="how TSP's MLP meets its weights (default: the recipe's parallel.tsp_mlp_exchange, else "
                        f"auto: tokens below {AUTO_TOKENS_BELOW} tokens per rank, else ring)")
    c = p.add_argument_group("cluster")
    c.add_argument("--gpus-per-node", type=int, help="default: the hardware profile's")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpu-memory-gb", type=float, help="usable GiB per GPU (default: the hardware profile's)")
    c.add_argument("--hardware", default="h200x4", help="configs/hardware/NAME.yaml or a path (default h200x4)")
    o = p.add_argument_group("output")
    o.add_argument("--layout", action="append", help="only these layouts (repeatable): tsp4, tp4, tp_sp4, cp4, "
                                                      "tp2xcp4, fsdp_cp4")
    o.add_argument("--json", action="store_true", help="JSON instead of tables")
    o.add_argument("--detail", action="store_true", help="also per-layout communication items and activations")
    return p


def build_inputs(args):
    from .planner import Cluster, Layout, ModelSpec, PlanError, TrainSpec, hardware
    from .planner.model import recipe_tsp_options

    hw = hardware.load(args.hardware)
    seq = None
    tsp = {"mlp_exchange": "auto"}
    if args.recipe:
        model, seq = ModelSpec.from_recipe(args.recipe, args.overrides)
        tsp = recipe_tsp_options(args.recipe, args.overrides)
        kw = {k: v for k, v in dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_groups=args.kv_groups,
                                    ffn=args.ffn, vocab=args.vocab, dtype=args.dtype).items() if v is not None}
        if kw or args.no_gated:
            import dataclasses

            model = dataclasses.replace(model, **kw, **({"gated": False} if args.no_gated else {}))
    else:
        if args.overrides:
            raise PlanError(f"overrides {args.overrides} need a recipe")
        missing = [f for f in ("layers", "hidden", "heads") if getattr(args, f) is None]
        if missing:
            raise PlanError("without a recipe give the model: missing " + ", ".join("--" + f for f in missing))
        model = ModelSpec(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_groups=args.kv_groups,
                          ffn=args.ffn, vocab=args.vocab or 32000, dtype=args.dtype or "bfloat16",
                          gated=not args.no_gated, name="model")
    seq = args.seq_len or seq
    if seq is None:
        raise PlanError("--seq-len is required without a recipe")
    train = TrainSpec(seq_len=seq, micro_batch=args.micro_batch, global_batch=args.global_batch,
                      optimizer=args.optimizer, distributed_optimizer=args.distributed_optimizer,
                      recompute=args.recompute, norm=args.norm,
                      mlp_exchange=args.tsp_mlp_exchange or tsp["mlp_exchange"])
    cluster = Cluster(gpus_per_node=args.gpus_per_node or hw.gpus_per_node, nodes=args.nodes,
                      gpu_memory_gib=args.gpu_memory_gb)
    layouts = [Layout.parse(x) for x in args.layout] if args.layout else None
    return model, train, cluster, hw, layouts


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "validate":
        from .planner.validate import main as validate_main

        return validate_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        from .planner import plan_all
        from .planner.report import render, render_detail, to_json

        model, train, cluster, hw, layouts = build_inputs(args)
        plans, skipped = plan_all(model, train, cluster, hw, layouts)
    except TSPConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(model, train, cluster, hw, plans, skipped), indent=1))
    else:
        print(render(model, train, cluster, hw, plans, skipped))
        if args.detail:
            for p in plans:
                print("\n" + render_detail(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
