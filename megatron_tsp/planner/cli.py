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
import dataclasses
import json
import sys
from typing import Dict, List, Optional

from ..config import RECIPE_SECTIONS, TSPConfigError, _yaml_value, field_docs
from .model import CHOICES, FLAG_ALIASES, MODEL_KEYS, NULL_MEANS, TRAIN_KEYS, ModelSpec, TrainSpec

# TrainSpec's own settings without a flag: the driver always reduces gradients in fp32
_NO_FLAG = ("grad_reduce_in_fp32",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-tsp plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples (each runs as written; tests/planner/test_plan_help.py runs them):\n"
                                       + __doc__.split("\n\n")[1].rstrip()
                                       + "\n\nSubcommand: `megatron-tsp plan validate [--out FILE]`. "
                                       "Formulas: docs/planner.md")
    p.add_argument("recipe", nargs="?", help="a training recipe (configs/*.yaml); flags below override it")
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    add_input_flags(p.add_argument_group(
        "model: the recipe's model keys, each flag overrides the recipe's (without a recipe --layers, --hidden, "
        "--heads are required)"), ModelSpec, MODEL_KEYS)
    add_input_flags(p.add_argument_group(
        "training: the recipe's keys (the recipe's value, else the default shown), then the planner's own"),
        TrainSpec, {**TRAIN_KEYS, **{f.name: None for f in dataclasses.fields(TrainSpec)
                                     if f.name not in TRAIN_KEYS and f.name not in _NO_FLAG}})
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
                        "--max-seq-len, then refined) and the fastest fitting configuration of the memory options at "
                        "each context: recompute, offload, the optimizer state on the host (either way, whatever "
                        "--optimizer-cpu-offload says), TSP's LM head and K/V, the CP ring (docs/frontier.md)")
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


def add_input_flags(group, spec, keys: Dict[str, Optional[str]]) -> None:
    """A flag per field `keys` names of the planner's input `spec` ({field: its recipe section, or
    None for the planner's own}): `--name-in-dashes` (and its short spelling, FLAG_ALIASES), the
    field's type, CHOICES, and as help the field's docstring: the recipe's (megatron_tsp.config,
    as `megatron-tsp train --help` prints it) or the planner's own (model.py). Every flag defaults
    to None: not given (the recipe's value, else the field's default)."""
    fields = {f.name: f for f in dataclasses.fields(spec)}
    docs = {section: field_docs(RECIPE_SECTIONS[section]) for section in set(keys.values()) if section}
    docs[None] = field_docs(spec)
    for name, section in keys.items():
        f = fields[name]
        doc = docs[section][name]
        default = "required" if f.default is dataclasses.MISSING else _yaml_value(f.default)
        if name in NULL_MEANS and f.default is None:
            default += f": {NULL_MEANS[name]}"
        text = (f"{section}.{name}. {doc} (default: the recipe's, else {default})" if section
                else f"{doc} (default: {default})")
        flags = ["--" + name.replace("_", "-")] + ([FLAG_ALIASES[name]] if name in FLAG_ALIASES else [])
        kind = f.type.replace("Optional[", "").rstrip("]")
        if kind == "bool":
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=text.replace("%", "%%"))
        else:
            group.add_argument(*flags, dest=name, type={"int": int, "float": float, "str": str}[kind],
                               choices=CHOICES.get(name), default=None, help=text.replace("%", "%%"))


def check_flags(args) -> None:
    """The flags the planner's inputs do not check themselves: a value no cluster or run can have
    is an error naming the flag (never a plan of nonsense, never a silent default)."""
    import math

    from .model import PlanError, check_seq_len

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
    from . import hardware
    from .model import Cluster, Layout, PlanError, recipe_train_options

    check_flags(args)

    hw = hardware.load(args.hardware)
    seq = None
    train = {}
    model = {k: getattr(args, k) for k in MODEL_KEYS if getattr(args, k) is not None}
    if args.recipe:
        spec, seq = ModelSpec.from_recipe(args.recipe, args.overrides)
        train = recipe_train_options(args.recipe, args.overrides)
        model = dataclasses.replace(spec, **model)
    else:
        if args.overrides:
            raise PlanError(f"overrides {args.overrides} need a recipe")
        missing = [FLAG_ALIASES[k] for k in ("num_layers", "hidden_size", "num_attention_heads") if k not in model]
        if missing:
            raise PlanError("without a recipe give the model: missing " + ", ".join(missing))
        model = ModelSpec(**model, name="model")
    seq = args.seq_length if args.seq_length is not None else seq
    if seq is None:
        raise PlanError("--seq-len is required without a recipe")
    for f in dataclasses.fields(TrainSpec):
        if f.name != "seq_length" and getattr(args, f.name, None) is not None:
            train[f.name] = getattr(args, f.name)
    train = TrainSpec(seq_length=seq, **train)
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
        from .plan import plan_all
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
    from .model import Layout, PlanError
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
        if lay.tp_without_sp and args.chunk_tokens and args.chunk_tokens < train.seq_length:
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
