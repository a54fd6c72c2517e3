"""`megatron-tsp plan`: per-GPU memory, communication and step time of TSP and its baselines.

    from megatron_tsp.planner import ModelSpec, TrainSpec, Cluster, Layout, plan_all, hardware
    model = ModelSpec(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=16384, vocab_size=32000)
    plans, skipped = plan_all(model, TrainSpec(seq_length=16384), Cluster(gpus_per_node=4), hardware.load("h200x4"))

The inputs (`model`: ModelSpec, TrainSpec, Layout, Cluster) take the recipe's keys; the formulas
(`formulas`: memory and FLOPs; `comm`: communication) and the plan (`plan`: step time, what fits)
read them; `frontier` searches the memory options, `cli` is the command line. Formulas and their
symbols: docs/planner.md; validation: docs/plan_validation.md. This module only re-exports.
"""

from . import hardware
from .comm import CommItem, comm_items, volume_per_layer
from .formulas import GIB, Memory, flops, memory, mlp_exchange, param_counts
from .model import (Cluster, Layout, ModelSpec, PlanError, Skipped, TrainSpec, candidate_layouts, check_layout,
                    usable_layouts)
from .plan import Plan, fits, host_need_per_node, plan_all, plan_layout, step_time

__all__ = ["fits", "host_need_per_node", "Cluster", "Layout", "ModelSpec", "PlanError", "TrainSpec", "Plan", "Memory",
           "CommItem", "hardware", "Skipped", "plan_layout", "plan_all", "candidate_layouts", "check_layout", "memory",
           "comm_items", "flops", "step_time", "volume_per_layer", "param_counts", "mlp_exchange", "GIB",
           "usable_layouts"]
