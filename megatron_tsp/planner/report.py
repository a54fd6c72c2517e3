"""Readable tables and JSON of the planner's results."""

from __future__ import annotations

from typing import List

from .comm import volume_per_layer
from .formulas import GIB
from .model import Cluster, ModelSpec, Skipped, TrainSpec
from .plan import Plan

MB = 1e6


def plan_to_dict(p: Plan) -> dict:
    return {
        "layout": p.layout.label, "kind": p.layout.kind, "tsp": p.layout.tsp_size, "tp": p.layout.tp, "cp": p.layout.cp,
        "data_parallel": p.dp, "micro_batches": p.micro_batches, "fits": p.fits, "fastest": p.fastest,
        "memory_gib": p.memory.as_gib(),
        "activation_detail_gib": {k: v / GIB for k, v in p.memory.detail.items()},
        "comm_per_layer_bytes": {"fwd": volume_per_layer(p.comm, "fwd"), "bwd": volume_per_layer(p.comm, "bwd")},
        "comm": [{"name": i.name, "phase": i.phase, "collective": i.collective, "bytes": i.volume, "group": i.group,
                  "link": i.link, "overlapped": i.overlapped, "per": "layer" if i.per_layer else "step"}
                 for i in p.comm],
        "flops": p.flops,
        "step_time_s": {k: p.time[k] for k in ("no_overlap", "as_implemented", "full_overlap")},
        "time_breakdown_s": {k: p.time[k] for k in ("matmul_s", "attention_s", "elementwise_s", "comm_s",
                                                    "comm_exposed_s", "optimizer_s", "host_optimizer_s",
                                                    "dp_sync_s")},
        "tokens_per_s_per_gpu": p.time["tokens_per_s_per_gpu"], "mfu": p.time["mfu"], "notes": p.notes,
    }


def to_json(model: ModelSpec, train: TrainSpec, cluster: Cluster, hw, plans: List[Plan], skipped: List[Skipped]) -> dict:
    import dataclasses

    return {
        "model": dataclasses.asdict(model), "params_total": model.total_params, "train": dataclasses.asdict(train),
        "cluster": dataclasses.asdict(cluster), "hardware": hw.name,
        "gpu_memory_gib": cluster.gpu_memory_gib or hw.gpu_memory_gib,
        "plans": [plan_to_dict(p) for p in plans],
        "skipped": [{"layout": s.layout.label, "reason": s.reason} for s in skipped],
    }


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _links(p: Plan) -> str:
    links = sorted({i.link for i in p.comm if i.per_layer})
    return "+".join(links) if links else "-"


def render(model: ModelSpec, train: TrainSpec, cluster: Cluster, hw, plans: List[Plan], skipped: List[Skipped]) -> str:
    cap = cluster.gpu_memory_gib or hw.gpu_memory_gib
    head = (f"{model.name}: L={model.num_layers} h={model.hidden_size} heads={model.num_attention_heads} "
            f"kv_groups={model.groups} "
            f"ffn={model.f}{' gated' if model.swiglu else ''} V={model.vocab_size} {model.dtype}, "
            f"{model.total_params / 1e9:.2f}B params | S={train.seq_length} micro-batch={train.micro_batch_size} "
            f"| {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs, {cap:.1f} GiB each, hardware {hw.name} "
            f"| Adam{' (distributed)' if train.distributed_optimizer else ''}"
            f"{' state on the host' if train.optimizer_cpu_offload else ''}, recompute={train.recompute}, "
            f"TSP MLP exchange={train.tsp_mlp_exchange}")
    mem_rows, time_rows = [], []
    for p in plans:
        g = p.memory.as_gib()
        mark = ("fastest" if p.fastest else "") if p.fits else "OOM"
        mem_rows.append([p.layout.label, p.dp, f"{g['params']:.1f}", f"{g['grads']:.1f}", f"{g['optimizer']:.1f}",
                         f"{g['activations']:.1f}", f"{g['comm_buffers']:.2f}", f"{g['logits']:.2f}",
                         f"{g['other_transient']:.2f}", f"{g['peak']:.1f}", "yes" if p.fits else "NO", g["peak_point"]])
        t = p.time
        time_rows.append([p.layout.label, f"{volume_per_layer(p.comm, 'fwd') / MB:.0f}",
                          f"{volume_per_layer(p.comm, 'bwd') / MB:.0f}", _links(p),
                          f"{t['no_overlap']:.3f}", f"{t['as_implemented']:.3f}", f"{t['full_overlap']:.3f}",
                          f"{t['tokens_per_s_per_gpu']:.0f}", f"{100 * t['mfu']:.0f}%", mark])
    out = [head, "", "Per-GPU memory (GiB = 2^30 bytes; what torch.cuda.max_memory_allocated reports)",
           _table(["layout", "DP", "params", "grads", "optim", "activ", "comm buf", "logits", "scratch", "peak", "fits",
                   "peak at"], mem_rows),
           "", "Communication per layer per GPU (MB received) and predicted step time (s)",
           _table(["layout", "fwd MB", "bwd MB", "link", "no overlap", "as run", "overlap", "tok/s/GPU", "MFU", ""],
                  time_rows)]
    if skipped:
        out += ["", "Not applicable:"] + [f"  {s.layout.label}: {s.reason}" for s in skipped]
    out += ["", "as run: the overlap the code has today; overlap: all communication hidden behind compute. "
                "Formulas: docs/planner.md."]
    return "\n".join(out)


def render_detail(p: Plan) -> str:
    rows = [[i.name, i.phase, i.collective, f"{i.volume / MB:.1f}", i.group, i.link, "yes" if i.overlapped else "no",
             "layer" if i.per_layer else "step"] for i in p.comm]
    act = [[k, f"{v / GIB:.2f}"] for k, v in p.memory.detail.items()]
    return "\n".join([f"{p.layout.label}:", _table(["communication", "phase", "collective", "MB", "group", "link",
                                                     "overlapped", "per"], rows) if rows else "  no communication",
                      _table(["activations saved for backward", "GiB"], act)])
