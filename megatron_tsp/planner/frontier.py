"""`megatron-tsp plan RECIPE --frontier`: per layout, the longest context that fits and, at each
context, the fastest configuration of the memory options (issue 14, FRONTIER_SPEC.md) that fits.

Contexts: powers of two from the recipe's S up to `max_seq` (4M), then, between the last power
of two that fits and the first that does not, the largest multiple of 2 x (GPUs of the layout)
x 1024 that fits. At each context every combination below is planned (memory first, the step
time only of those that fit) and the fastest that fits is kept:

- `parallel.recompute`: none; full uniform with N = 1, 2, 4, ... dividing L (all layers
  recomputed: the same time, N trades checkpointed inputs for a larger rebuilt chunk: the
  smallest N that fits); full block with the smallest N that fits (fewer recomputed layers =
  faster; GPU memory falls as N grows, so it is found by bisection; with offload the host
  memory rises with N, so that N must also fit the host); selective (baselines only).
- `parallel.offload_activations` false / true (with full).
- `train.optimizer_cpu_offload` false / true (bf16 models with Adam, not FSDP-over-CP; with the
  distributed optimizer): the optimizer state on the host, which must then hold it beside the
  offloaded inputs.
- TSP only: `parallel.tsp_recompute` none / full, `parallel.tsp_lm_head` local / megatron and
  `parallel.tsp_attention_kv` gathered / streamed.
- CP layouts only (cp, tp_cp, fsdp_cp): `parallel.cp_comm_type` all_gather / p2p (ring attention).

Ties go to the first in that order (the simpler configuration).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from .formulas import GIB, memory
from .model import Cluster, Layout, ModelSpec, PlanError, TrainSpec, candidate_layouts, check_layout
from .plan import fits, plan_layout

MAX_SEQ = 4 * 2**20
CONTEXTS_REPORTED = (65536, 131072, 262144)


def options_of(train: TrainSpec, lay: Layout) -> Dict[str, object]:
    """The recipe keys (parallel.*) of one configuration."""
    out: Dict[str, object] = {"recompute": train.recompute}
    if train.recompute == "full":
        out["recompute_method"] = train.recompute_method
        out["recompute_num_layers"] = train.recompute_num_layers
        out["offload_activations"] = train.offload_activations
    if train.mlp_chunk_tokens:
        out["mlp_chunk_tokens"] = train.mlp_chunk_tokens
    if train.optimizer_cpu_offload:
        out["optimizer_cpu_offload"] = True  # a train.* key (with train.distributed_optimizer = true)
        if train.optimizer_offload_fraction != 1:
            out["optimizer_offload_fraction"] = train.optimizer_offload_fraction
    if lay.record.uses_tsp:
        out["tsp_recompute"] = train.tsp_recompute
        out["tsp_lm_head"] = train.tsp_lm_head
        out["tsp_attention_kv"] = train.tsp_attention_kv
        if train.tsp_lm_head == "local":
            out["lm_head_chunk_tokens"] = train.lm_head_chunk_tokens
    if lay.cp > 1:
        out["cp_comm_type"] = train.cp_comm_type
    return out


def describe(opts: Dict[str, object]) -> str:
    """One short line: `full block N=12, offload, tsp_recompute full, head local`."""
    if opts["recompute"] == "full":
        parts = [f"full {opts['recompute_method']} N={opts['recompute_num_layers']}"]
        if opts.get("offload_activations"):
            parts.append("offload")
    else:
        parts = [f"recompute {opts['recompute']}"]
    if "tsp_recompute" in opts:
        parts += [f"tsp_recompute {opts['tsp_recompute']}", f"head {opts['tsp_lm_head']}"]
        if opts.get("tsp_attention_kv") == "streamed":
            parts.append("K/V streamed")
    if opts.get("cp_comm_type") == "p2p":
        parts.append("K/V ring (p2p)")
    if opts.get("mlp_chunk_tokens"):
        parts.append(f"MLP chunks of {opts['mlp_chunk_tokens']}")
    if opts.get("optimizer_cpu_offload"):
        parts.append("optimizer on host")
    return ", ".join(parts)


class _Search:
    def __init__(self, m: ModelSpec, base: TrainSpec, lay: Layout, cluster: Cluster, hw):
        self.m, self.base, self.lay, self.cluster, self.hw = m, base, lay, cluster, hw

    def _train(self, S: int, **kw) -> TrainSpec:
        return dataclasses.replace(self.base, seq_length=S, global_batch_size=None, **kw)

    def _fits(self, t: TrainSpec) -> bool:
        return fits(memory(self.m, t, self.lay, self.cluster), self.cluster, self.hw)

    def _fits_gpu(self, t: TrainSpec) -> bool:
        """GPU memory only: monotone in block's N (host memory for offload rises with N)."""
        return fits(memory(self.m, t, self.lay, self.cluster), dataclasses.replace(self.cluster, host_memory_gib=None),
                    dataclasses.replace(self.hw, host_memory_gib=None))

    def families(self) -> List[dict]:
        inner = [{}]
        if self.lay.record.uses_tsp:
            inner = [{"tsp_recompute": r, "tsp_lm_head": h, "tsp_attention_kv": kv} for kv in ("gathered", "streamed")
                     for r in ("none", "full") for h in ("local", "megatron")]
        elif self.lay.cp > 1:  # all_gather first: ties go to it
            inner = [{"cp_comm_type": kind} for kind in ("all_gather", "p2p")]
        host_adam = self.base.optimizer == "adam" and self.m.dtype_bytes < 4 and not self.lay.mesh.fsdp
        optimizer = [{"optimizer_cpu_offload": False}]
        if host_adam:
            optimizer.append({"optimizer_cpu_offload": True, "distributed_optimizer": True})
        return [{**o, **f} for o in optimizer for f in inner]

    def fitting(self, S: int) -> List[TrainSpec]:
        """The configurations worth timing at S: every family's fitting ones (the smallest fitting
        N of uniform and of block)."""
        L = self.m.num_layers
        out: List[TrainSpec] = []
        for fam in self.families():
            plain = self._train(S, recompute="none", recompute_method="uniform", recompute_num_layers=None,
                                offload_activations=False, **fam)
            if self._fits(plain):
                out.append(plain)
                continue  # recomputing only costs time
            if not self.lay.record.uses_tsp:
                sel = dataclasses.replace(plain, recompute="selective")
                if self._fits(sel):
                    out.append(sel)
                    continue
            for offload in (False, True):
                full = dict(recompute="full", offload_activations=offload, **fam)
                # block: GPU memory falls as N grows (a recomputed layer keeps only its input), the
                # host memory of offload rises: the smallest N that fits the GPU, if it fits the host
                lo, hi = 1, L - 1
                if hi >= 1 and self._fits_gpu(self._train(S, recompute_method="block", recompute_num_layers=hi, **full)):
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if self._fits_gpu(self._train(S, recompute_method="block", recompute_num_layers=mid, **full)):
                            hi = mid
                        else:
                            lo = mid + 1
                    t = self._train(S, recompute_method="block", recompute_num_layers=lo, **full)
                    if self._fits(t):
                        out.append(t)
                n = 1
                while n <= L:
                    t = self._train(S, recompute_method="uniform", recompute_num_layers=n, **full)
                    if L % n == 0 and self._fits(t):
                        out.append(t)
                        break
                    n *= 2
        return out

    def best(self, S: int):
        """(Plan, TrainSpec) of the fastest configuration that fits at S, or None."""
        try:
            check_layout(self.m, self._train(S), self.lay, self.cluster)
        except PlanError:
            return None
        best = None
        for t in self.fitting(S):
            p = plan_layout(self.m, t, self.lay, self.cluster, self.hw)
            if best is None or p.time["tokens_per_s_per_gpu"] > best[0].time["tokens_per_s_per_gpu"] * (1 + 1e-9):
                best = (p, t)
        return best


def _row(S: int, found) -> dict:
    if found is None:
        return {"seq_len": S, "fits": False}
    p, t = found
    return {"seq_len": S, "fits": True, "options": options_of(t, p.layout),
            "tokens_per_s_per_gpu": p.time["tokens_per_s_per_gpu"], "step_time_s": p.time["as_implemented"],
            "mfu": p.time["mfu"], "peak_gib": p.memory.peak / GIB, "peak_point": p.memory.peak_point,
            "peak_breakdown_gib": {k: v / GIB for k, v in p.memory.at_peak.items()},
            "host_offload_gib": p.memory.host_offload / GIB, "host_optimizer_gib": p.memory.host_optimizer / GIB,
            "notes": p.notes}


def layout_frontier(m: ModelSpec, train: TrainSpec, lay: Layout, cluster: Cluster, hw,
                    max_seq: int = MAX_SEQ) -> dict:
    """The frontier of one layout (see the module docstring)."""
    search = _Search(m, train, lay, cluster, hw)
    contexts: List[dict] = []
    S, last_fit, first_miss = train.seq_length, None, None
    while S <= max_seq:
        found = search.best(S)
        contexts.append(_row(S, found))
        if found is None and first_miss is None:
            first_miss = S
        if found is not None and first_miss is None:
            last_fit = contexts[-1]
        S *= 2
    unit = 2 * lay.size * 1024
    if first_miss is not None:  # the largest multiple of `unit` below the first misfit that fits
        lo = (last_fit["seq_len"] // unit) if last_fit else 0  # fits (0: nothing yet)
        hi = (first_miss - 1) // unit  # candidates up to here
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if search.best(mid * unit) is not None:
                lo = mid
            else:
                hi = mid - 1
        if lo and (last_fit is None or lo * unit > last_fit["seq_len"]):
            last_fit = _row(lo * unit, search.best(lo * unit))
    out = {"layout": lay.label, "kind": lay.kind, "size": lay.size, "data_parallel": cluster.world // lay.size,
           "max_seq_len": last_fit["seq_len"] if last_fit else None,
           "capped": first_miss is None,  # fits up to max_seq: the frontier is beyond it
           "at_max": last_fit, "contexts": contexts}
    return out


def frontier(m: ModelSpec, train: TrainSpec, cluster: Cluster, hw, layouts: Optional[Sequence[Layout]] = None,
             max_seq: int = MAX_SEQ) -> Tuple[List[dict], List[dict]]:
    """([per-layout frontier], [skipped layouts with reasons]) for every candidate layout (or the
    given ones). A layout is skipped when it cannot run the model at all (heads, vocab...)."""
    if max_seq < train.seq_length:
        raise PlanError(f"--max-seq-len = {max_seq} is below the recipe's context {train.seq_length}")
    out, skipped = [], []
    for lay in layouts or candidate_layouts(cluster):
        try:  # divisibility of the model by the layout (the context is checked per S)
            check_layout(m, dataclasses.replace(train, global_batch_size=None), lay, cluster)
        except PlanError as e:
            if layouts:
                raise
            skipped.append({"layout": lay.label, "reason": str(e)})
            continue
        out.append(layout_frontier(m, train, lay, cluster, hw, max_seq))
    return out, skipped


def render(m: ModelSpec, train: TrainSpec, cluster: Cluster, hw, rows: List[dict], skipped: List[dict]) -> str:
    from .report import _table

    cap = cluster.gpu_memory_gib or hw.gpu_memory_gib
    head = (f"{m.name}: L={m.num_layers} h={m.hidden_size} heads={m.num_attention_heads} kv_groups={m.groups} "
            f"ffn={m.f} V={m.vocab_size} "
            f"{m.dtype} | {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs, {cap:.1f} GiB each, hardware "
            f"{hw.name} (host copies {hw.host_gb_s:g} GB/s, host memory "
            f"{_host(cluster, hw)}) | norms {train.norm}, micro-batch {train.micro_batch_size}, "
            f"{'no optimizer' if train.optimizer == 'none' else 'Adam'}"
            f"{' (distributed)' if train.distributed_optimizer else ''} | predictions, not measurements")
    lines = [head, "", "Longest context that fits, and the fastest configuration there"]
    rows_max = []
    for r in rows:
        a = r["at_max"]
        if a is None:
            rows_max.append([r["layout"], r["data_parallel"], "none fits", "", "", "", ""])
            continue
        bd = a["peak_breakdown_gib"]
        state = bd.get("params", 0) + bd.get("grads", 0) + bd.get("optimizer", 0)
        rest = ", ".join(f"{k} {v:.1f}" for k, v in bd.items() if k not in ("params", "grads", "optimizer") and v)
        rows_max.append([r["layout"], r["data_parallel"], _seq(a["seq_len"]) + ("+" if r["capped"] else ""),
                         describe(a["options"]), f"{a['peak_gib']:.1f}", f"state {state:.1f}, {rest}",
                         f"{a['tokens_per_s_per_gpu']:.0f}"])
    lines.append(_table(["layout", "DP", "max S", "options", "peak", "peak GiB breakdown", "tok/s/GPU"], rows_max))
    lines += ["", "Fastest fitting configuration per context (tokens/s/GPU; - : nothing fits)"]
    seqs = sorted({c["seq_len"] for r in rows for c in r["contexts"]})
    table = []
    for r in rows:
        by = {c["seq_len"]: c for c in r["contexts"]}
        table.append([r["layout"]] + [f"{by[s]['tokens_per_s_per_gpu']:.0f}" if s in by and by[s]["fits"] else "-"
                                      for s in seqs])
    lines.append(_table(["layout"] + [_seq(s) for s in seqs], table))
    if skipped:
        lines += ["", "Not applicable:"] + [f"  {s['layout']}: {s['reason']}" for s in skipped]
    lines += ["", "+: fits at the largest context searched (--max-seq-len). Options: parallel.* recipe keys "
                  "(optimizer on host: train.optimizer_cpu_offload); docs/frontier.md."]
    return "\n".join(lines)


def _seq(s: int) -> str:
    if s % 2**20 == 0:
        return f"{s // 2**20}M"
    return f"{s // 1024}K" if s % 1024 == 0 else str(s)


def _host(cluster: Cluster, hw) -> str:
    host = cluster.host_memory_gib if cluster.host_memory_gib is not None else hw.host_memory_gib
    return "unchecked" if host is None else f"{host:g} GiB per node"
