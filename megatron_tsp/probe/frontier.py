"""`megatron-tsp probe RECIPE --frontier --world N`: per layout, the longest context whose
measured per-rank peak fits a capacity, full depth, in memory mode.

For the frontier every layout runs its leanest memory options (each trades time for memory, so
the leanest reaches furthest): Megatron's full recompute, uniform, with the checkpointed inputs
offloaded to the host, one layer per checkpoint or, where the node's host memory
(`--host-memory-gb` per node, shared by its GPUs) does not hold them, the fewest layers per
checkpoint (N = 2, 4, ...) whose inputs it holds (the planner's count of the offloaded bytes,
which is exact: 2h bytes per local token and checkpoint); without offload when none fits. For
TSP also its in-layer recompute and sequence-local LM head; for every layout the token-tiled MLP
with `--mlp-chunk-tokens`; with `--optimizer-cpu-offload` the optimizer state on the host too
(train.optimizer_cpu_offload with the distributed optimizer; not FSDP, which steps its own), its
host share counted with the offloaded inputs against the node's host memory, and dropped where the
host cannot hold it. The context is searched over multiples of 2 x GPUs x 1024: from the
start up by a factor (doubling; 6% from the planner's guess, `--start-seq auto`) while it fits,
down while it does not, then bisection to 2%. Each probe is one warm-up step and one measured
step of rank 0 in memory mode "all" (kernels stood in, `probe.standins`), its peak against the
allocator's limit (`--gpu-memory-gb`). Every probe is a JSON line in `--out` (a later run with
the same file skips what it holds).

Step time at the frontier is not measured there (memory mode skips the arithmetic): it is
extrapolated from a real step at `--time-at` tokens: the non-attention time scales with S, the
attention time with S^2 (the causal area), and is labelled extrapolated.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Dict, List, Optional

from . import GIB, ProbeError

LEAN = ["parallel.recompute=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=1"]
LEAN_TSP = ["parallel.tsp_recompute=full", "parallel.tsp_lm_head=local"]
DEFAULT_LAYOUTS = "tsp,tp_sp,cp4,tp2_cp2,fsdp_cp4"


def bench_layout(name: str):
    """The bench layout `name` (megatron_tsp.bench.rows.LAYOUTS: its registry layout, sizes and
    overrides); ProbeError naming the known ones."""
    from ..bench.rows import LAYOUTS

    if name not in LAYOUTS:
        raise ProbeError(f"--layouts: unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def layout_overrides(name: str, world: int) -> List[str]:
    """A bench layout name (megatron_tsp.bench.rows.LAYOUTS) as recipe overrides on `world` GPUs."""
    return [o.format(n=world, half=world // 2) for o in bench_layout(name).overrides]


def host_optimizer(name: str) -> bool:
    """Whether the optimizer state can go to the host in bench layout `name` (not under FSDP,
    which steps its own sharded state on the GPU)."""
    return not bench_layout(name).fsdp


def granularity(start: int, world: int) -> int:
    """Contexts are multiples of 2 x GPUs x 1024 (zigzag chunks for TSP and CP, the TP sequence
    split inside), or of a smaller power of two for contexts under 8 such units (small models)."""
    m = 1024
    while m > 1 and 2 * world * m * 8 > start:
        m //= 2
    return 2 * world * m


OPTIMIZER_ON_HOST = ["train.distributed_optimizer=true", "train.optimizer_cpu_offload=true"]


def is_context_parallel(name: str) -> bool:
    """A CP layout of bench.rows (cp4, tp2_cp2, tp2_cp4, tp4_cp2, fsdp_cp4)."""
    return bench_layout(name).context_size != "1"


def lean(name: str, offload: bool, every: int = 1, mlp_chunk_tokens: int = 0,
         attention_kv: str = "gathered", optimizer_offload: bool = False,
         cp_comm_type: str = "all_gather") -> List[str]:
    """The leanest options of a layout: full recompute, uniform, a checkpoint every `every` layers
    (with offload, a larger N keeps fewer inputs on the host and a larger chunk on the GPU); the
    token-tiled MLP when `mlp_chunk_tokens` (every layout: TSP's and Megatron's MLP); TSP's
    streamed K/V attention when `attention_kv` is streamed; the CP layouts' ring attention when
    `cp_comm_type` is p2p; the optimizer state on the host when `optimizer_offload` (not for FSDP
    layouts)."""
    tsp = bench_layout(name).record.uses_tsp
    base = LEAN[:2] + [f"parallel.recompute_num_layers={every}"]
    tiled = [f"parallel.mlp_chunk_tokens={mlp_chunk_tokens}"] if mlp_chunk_tokens else []
    streamed = ["parallel.tsp_attention_kv=streamed"] if tsp and attention_kv == "streamed" else []
    if cp_comm_type == "p2p" and is_context_parallel(name):
        streamed.append("parallel.cp_comm_type=p2p")
    host_adam = OPTIMIZER_ON_HOST if optimizer_offload and host_optimizer(name) else []
    return (base + (["parallel.offload_activations=true"] if offload else []) + (LEAN_TSP if tsp else []) + tiled
            + streamed + host_adam)


class Search:
    """The frontier of one layout. `probe(S, overrides)` -> the measured dict (probe.measure's);
    `offload_gib(S, overrides)` -> the host GiB per rank that offload needs (the planner's:
    offloaded inputs + optimizer state). `optimizer_offload`: try the optimizer state on the host
    first (dropped at an S where the host cannot hold it with the fewest offloaded inputs)."""

    def __init__(self, name: str, world: int, host_per_rank_gib: Optional[float], probe: Callable,
                 offload_gib: Callable, log: Callable = None, layers: int = 32, mlp_chunk_tokens: int = 0,
                 attention_kv: str = "gathered", optimizer_offload: bool = False, cp_comm_type: str = "all_gather"):
        self.name, self.world, self.host, self.layers = name, world, host_per_rank_gib, layers
        self.chunk, self.kv, self.cp_comm_type = mlp_chunk_tokens, attention_kv, cp_comm_type
        self.optimizer_offload = optimizer_offload and host_optimizer(name)
        self.probe, self.offload_gib = probe, offload_gib
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.tried: Dict[int, dict] = {}

    def _holds(self, S: int, opts: List[str]) -> bool:
        if self.host is None:
            return True
        need = self.offload_gib(S, opts)
        return need is not None and need <= self.host

    def options(self, S: int) -> List[str]:
        """Offload with the smallest N (1, 2, 4, ... dividing the layers) whose offloaded inputs the
        host holds; without offload (N = 1) when none does. With the optimizer on the host first
        (`optimizer_offload`), and without it when the host cannot hold even its state alone."""
        for host_adam in ([True, False] if self.optimizer_offload else [False]):
            n = 1
            while n <= self.layers:
                opts = lean(self.name, True, n, self.chunk, self.kv, host_adam, self.cp_comm_type)
                if self.layers % n == 0 and self._holds(S, opts):
                    return opts
                n *= 2
            opts = lean(self.name, False, 1, self.chunk, self.kv, host_adam, self.cp_comm_type)
            if not host_adam or self._holds(S, opts):
                return opts
        raise AssertionError("unreachable: the last try is without the optimizer on the host")

    def fits(self, S: int) -> bool:
        if S not in self.tried:
            opts = self.options(S)
            m = self.probe(S, opts)
            self.tried[S] = {"seq_len": S, "options": opts, "measured": m}
            peak = "OOM" if m.get("oom") else f"{m['peak_allocated_gib']:.2f} GiB"
            self.log(f"[probe --frontier] {self.name} S={S}: {peak} ({', '.join(o.split('.', 1)[1] for o in opts)})")
        return not self.tried[S]["measured"].get("oom")

    def run(self, start: int, max_seq: int, unit: int, growth: float = 2.0) -> dict:
        """From `start` (a multiple of `unit`): up by `growth` while it fits (doubling from a small
        start; from the planner's guess a few percent), down by it while it does not, then
        bisection between the last fit and the first miss until they are within 2%."""
        lo, hi = 0, None  # in units: lo fits (0: none yet), hi does not
        k = max(1, start // unit)
        if not self.fits(k * unit):
            hi = k
            while k > 1:
                k = max(1, min(k - 1, int(k / growth)))
                if self.fits(k * unit):
                    lo = k
                    break
                hi = k
        else:
            lo = k
            while hi is None:
                k = max(k + 1, int(k * growth))
                if k * unit > max_seq:
                    break
                if self.fits(k * unit):
                    lo = k
                else:
                    hi = k
        if hi is not None:
            while hi - lo > 1 and (lo == 0 or hi / lo > 1.02):
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.fits(mid * unit) else (lo, mid)
        best = self.tried.get(lo * unit)
        return {"layout": self.name, "max_seq_len": lo * unit if lo else None, "capped": hi is None,
                "first_miss": hi * unit if hi else None, "at_max": best,
                "probes": [self.tried[s] for s in sorted(self.tried)]}


class ProbeLog:
    """The JSON lines of earlier probes (`--out`): a probe already there is read, not re-run."""

    def __init__(self, path: Optional[str]):
        self.path, self.rows = path, {}
        if path and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    if "key" in row:
                        self.rows[row["key"]] = row

    def get(self, key: str) -> Optional[dict]:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        row = dict(row, key=key)
        self.rows[key] = row
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def extrapolated_time(real_s: float, memory_mode_s: float, S0: int, S: int) -> dict:
    """Step time at S from one real step and one memory-mode step (attention stood in, GEMMs real)
    at S0: the non-attention part grows with S, the attention part (the difference) with S^2."""
    attention = max(0.0, real_s - memory_mode_s)
    r = S / S0
    return {"step_time_s": memory_mode_s * r + attention * r * r, "from_seq_len": S0,
            "attention_s_at_from": attention, "other_s_at_from": memory_mode_s, "extrapolated": True}


def summary_line(row: dict) -> str:
    a = row.get("at_max")
    if a is None:
        return f"{row['layout']}: nothing fits from the start context"
    m = a["measured"]
    plus = "+" if row["capped"] else ""
    return (f"{row['layout']}: {row['max_seq_len'] // 1024}K{plus} tokens ({row['max_seq_len'] // row['world'] // 1024}K "
            f"per GPU), peak {m['peak_allocated_gib']:.2f} GiB"
            + (f", first miss {row['first_miss'] // 1024}K" if row.get("first_miss") else "")
            + f"; {', '.join(o.split('.', 1)[1] for o in a['options'])}")


__all__ = ["Search", "ProbeLog", "extrapolated_time", "layout_overrides", "bench_layout", "host_optimizer",
           "granularity", "lean", "GIB", "DEFAULT_LAYOUTS", "OPTIMIZER_ON_HOST", "summary_line"]
