"""The parallel layouts: one record each, the registry every front end reads.

A layout is a value of the recipe's `parallel.layout`. Its record says how it maps the recipe's
sizes onto process groups (`parallel.size` is the TSP axis, the TP axis or ignored;
`parallel.context_size`, `parallel.pipeline_size`, the data-parallel rest), what it builds (the
model builder and its block spec, named as `module:function` so that this base module imports
neither torch nor the layers above; `training/build.py:build_gpt` calls them), and how the
other front ends name it: the planner's layout kinds (`megatron-tsp plan`, one per layout alone
or combined with context parallelism / FSDP, a `Mesh` each) with their labels and spellings, and
bench's row labels. `train` accepts the names of LAYOUTS, `plan` the kinds of PLANNER_KINDS,
`bench` labels its rows from the meshes; code asks a record (`LAYOUTS[name].uses_tsp`) instead
of comparing names. Adding a layout = one record here, its builder and spec module, its tests
(tests/test_layouts.py checks that every record is complete and every front end's list follows).

Plain Python (no torch, no megatron): the planner and the commands' `--help` read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from .config import TSPConfigError


@dataclass(frozen=True)
class GroupSizes:
    """The process-group sizes of one layout: `tsp` (the TSP axis) and `tp` (native tensor
    parallelism) share Megatron's TP slot, at most one of them above 1; `cp` context, `pp`
    pipeline. Data parallelism is the rest of the world (`data`)."""

    tsp: int = 1
    tp: int = 1
    cp: int = 1
    pp: int = 1

    @property
    def axis(self) -> int:
        """Ranks in Megatron's TP slot: the TSP or TP group (1 for data parallelism)."""
        return self.tsp * self.tp

    @property
    def replica(self) -> int:
        """Ranks of one model replica (TSP / TP x CP x PP)."""
        return self.axis * self.cp * self.pp

    def data(self, world: int) -> int:
        """The data-parallel size on `world` ranks (a world the replica divides)."""
        return world // self.replica


@dataclass(frozen=True)
class Mesh:
    """A layout alone or combined with context parallelism (and FSDP over it): one layout kind
    of the planner and one label of bench's rows. Labels and the spelling are format strings over
    the sizes `tsp_size`, `tp`, `cp` (the planner's `Layout` fields)."""

    kind: str
    """The planner's layout kind (`planner.model.Layout.kind`, `megatron-tsp plan --layout`)."""
    context: bool
    """Runs with parallel.context_size > 1."""
    fsdp: bool
    """Runs with parallel.fsdp = true (weights, gradients and optimizer state over data x context)."""
    sizes: Tuple[str, ...]
    """The planner sizes the kind takes (the others are 1): of tsp_size, tp, cp."""
    planner_label: str
    """How `megatron-tsp plan` names it (e.g. `TSP D={tsp_size}`)."""
    spelling: str
    """How `megatron-tsp plan --layout` and `plan validate` spell it (e.g. `tsp{tsp_size}`)."""
    bench_label: str
    """How `megatron-tsp bench` names a row of it (e.g. `TSP D={tsp_size}`)."""
    attention: str
    """The attention kernel shape whose rate the planner's step time uses (a hardware profile's
    `attention.<attention>_tflops`)."""

    def format(self, text: str, tsp_size: int = 1, tp: int = 1, cp: int = 1) -> str:
        return text.format(tsp_size=tsp_size, tp=tp, cp=cp)


@dataclass(frozen=True)
class ParallelLayout:
    """One value of `parallel.layout`."""

    name: str
    """The recipe's `parallel.layout` value."""
    title: str
    """Its name in prose and messages (TSP, TP + SP, ...)."""
    doc: str
    """What it is, in one line (`train --help`, docs)."""
    size_group: Optional[str]
    """The group `parallel.size` sets: `tsp` (the TSP axis), `tp` (native tensor parallelism) or
    None (`parallel.size` is ignored: data parallelism)."""
    sequence_parallel: bool
    """The norm / residual regions' tokens are split over the `size_group` (TSP, Megatron's
    sequence parallelism)."""
    context_parallel: bool
    """Combines with parallel.context_size > 1 and parallel.fsdp."""
    why_no_context: str
    """Why it does not combine with context parallelism / FSDP (empty when it does)."""
    builder: str
    """`module:function` building the model: `function(config, *, pg_collection, tsp_options,
    core_attention, **gpt_kwargs)` (GPTModel's keyword arguments), called by `build_gpt`."""
    block_spec: str
    """`module:function` of its decoder block spec (the builder's)."""
    meshes: Tuple[Mesh, ...]
    """Its planner kinds / bench labels: alone (context and fsdp false) and with CP (and FSDP)."""
    planned_as: Optional[str] = None
    """Without CP or FSDP, the planner plans it as this layout at size 1 (data parallelism is TP
    with T = 1); None: it has a mesh of its own."""

    @property
    def uses_tsp(self) -> bool:
        """Its model is TSPGPTModel on the TSP group (Megatron's TP slot)."""
        return self.size_group == "tsp"

    def group_sizes(self, size: int = 1, context_size: int = 1, pipeline_size: int = 1) -> GroupSizes:
        """The groups of `parallel.size`, `context_size`, `pipeline_size` under this layout."""
        return GroupSizes(tsp=size if self.size_group == "tsp" else 1, tp=size if self.size_group == "tp" else 1,
                          cp=context_size, pp=pipeline_size)

    def mesh(self, context_size: int = 1, fsdp: bool = False) -> Optional[Mesh]:
        """The planner kind of this layout with `context_size` and `fsdp` (None: not modelled)."""
        for m in self.meshes:
            if m.context == (context_size > 1) and m.fsdp == bool(fsdp):
                return m
        if self.planned_as and context_size == 1 and not fsdp:
            return LAYOUTS[self.planned_as].mesh()
        return None


_NATIVE_BUILDER = "megatron_tsp.baselines.model:build_native_gpt"
_NATIVE_SPEC = "megatron_tsp.baselines.specs:get_sp_block_spec"

_RECORDS = (
    ParallelLayout(
        "tsp", "TSP", "folded tensor and sequence parallelism on D = parallel.size ranks (the product)",
        size_group="tsp", sequence_parallel=True, context_parallel=False,
        why_no_context="TSP already splits the sequence and the weights over its group",
        builder="megatron_tsp.tsp.model:build_tsp_gpt", block_spec="megatron_tsp.tsp.specs:get_tsp_block_spec",
        meshes=(Mesh("tsp", False, False, ("tsp_size",), "TSP D={tsp_size}", "tsp{tsp_size}", "TSP D={tsp_size}",
                     "square_causal"),)),
    ParallelLayout(
        "dp", "DP", "data parallelism, the weights whole on every rank (parallel.size ignored); the base of CP "
                    "and FSDP",
        size_group=None, sequence_parallel=False, context_parallel=True, why_no_context="",
        builder=_NATIVE_BUILDER, block_spec=_NATIVE_SPEC, planned_as="tp",
        meshes=(Mesh("cp", True, False, ("cp",), "CP {cp}", "cp{cp}", "CP={cp}", "square_causal"),
                Mesh("fsdp_cp", True, True, ("cp",), "FSDP-over-CP {cp}", "fsdp_cp{cp}",
                     "FSDP/ZeRO-3 over CP={cp}", "square_causal"))),
    ParallelLayout(
        "tp", "TP", "Megatron's tensor parallelism on parallel.size ranks, the tokens whole on each",
        size_group="tp", sequence_parallel=False, context_parallel=True, why_no_context="",
        builder=_NATIVE_BUILDER, block_spec=_NATIVE_SPEC,
        meshes=(Mesh("tp", False, False, ("tp",), "TP {tp}", "tp{tp}", "TP={tp}", "square_causal"),)),
    ParallelLayout(
        "tp_sp", "TP + SP", "Megatron's tensor and sequence parallelism on parallel.size ranks",
        size_group="tp", sequence_parallel=True, context_parallel=True, why_no_context="",
        builder=_NATIVE_BUILDER, block_spec=_NATIVE_SPEC,
        meshes=(Mesh("tp_sp", False, False, ("tp",), "TP+SP {tp}", "tp_sp{tp}", "TP={tp}+SP", "square_causal"),
                Mesh("tp_cp", True, False, ("tp", "cp"), "TP+SP {tp} x CP {cp}", "tp{tp}xcp{cp}",
                     "TP={tp}+SP x CP={cp}", "square_causal"))),
)

LAYOUTS: Dict[str, ParallelLayout] = {r.name: r for r in _RECORDS}
"""parallel.layout value -> its record, in the order messages list them."""


def _planner_kinds() -> Dict[str, Tuple[ParallelLayout, Mesh]]:
    # the layouts alone first, then with CP, then with FSDP over CP (plan's candidate order)
    meshes = [(r, m) for r in _RECORDS for m in r.meshes]
    return {m.kind: (r, m) for r, m in sorted(meshes, key=lambda rm: (rm[1].context, rm[1].fsdp))}


PLANNER_KINDS: Dict[str, Tuple[ParallelLayout, Mesh]] = _planner_kinds()
"""The planner's layout kind -> (its layout, its mesh)."""


def get_layout(name: str, key: str = "parallel.layout", error=TSPConfigError) -> ParallelLayout:
    """The record of `name`; `error` (naming `key` and the valid names) when there is none."""
    if name not in LAYOUTS:
        raise error(f"{key} = {name!r} is not one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def names(predicate=None) -> Tuple[str, ...]:
    """The layout names (those whose record satisfies `predicate`), in registry order."""
    return tuple(n for n, r in LAYOUTS.items() if predicate is None or predicate(r))


def planner_layout(parallel: Mapping) -> Optional[Tuple[str, Dict[str, int]]]:
    """(kind, {tsp_size, tp, cp}) of a recipe's `parallel` section (a mapping with layout, size,
    context_size, fsdp): the planner's `Layout(kind, **sizes)`; None when the planner has no model
    of that combination (or the layout is unknown)."""
    record = LAYOUTS.get(parallel["layout"])
    if record is None:
        return None
    cp = parallel.get("context_size", 1)
    mesh = record.mesh(cp, parallel.get("fsdp", False))
    if mesh is None:
        return None
    g = record.group_sizes(parallel.get("size", 1), cp)
    return mesh.kind, {"tsp_size": g.tsp, "tp": g.tp, "cp": g.cp}


def _mesh_name(parallel: Mapping, which: str) -> Optional[str]:
    found = planner_layout(parallel)
    if found is None:
        return None
    kind, sizes = found
    mesh = PLANNER_KINDS[kind][1]
    return mesh.format(getattr(mesh, which), **sizes)


def bench_label(parallel: Mapping) -> Optional[str]:
    """Bench's label of a recipe's `parallel` section (None where no mesh names it)."""
    return _mesh_name(parallel, "bench_label")


def planner_spelling(parallel: Mapping) -> Optional[str]:
    """The planner's `--layout` spelling (`tsp4`, `tp2xcp2`, ...) of a recipe's `parallel` section
    (None where the planner has no model of it)."""
    return _mesh_name(parallel, "spelling")



def inventory() -> str:
    """docs/architecture.md's table of the layouts: one row per record, its planner kinds and
    bench labels shown at example sizes."""
    out = ["| `parallel.layout` | what | `parallel.size` sets | model builder (block spec) | `plan` kinds: "
           "`--layout`, label (e.g.) | bench label (e.g.) |", "|---|---|---|---|---|---|"]
    sets = {"tsp": "the TSP group (Megatron's TP slot)", "tp": "the TP group", None: "nothing (ignored)"}
    short = lambda ref: ref.replace("megatron_tsp.", "").replace(":", ".")  # noqa: E731
    for r in _RECORDS:
        meshes = [(m, "") for m in r.meshes]
        if r.planned_as:
            meshes.insert(0, (LAYOUTS[r.planned_as].mesh(), f"as {r.planned_as} at size 1: "))
        kinds, bench = [], []
        for m, where in meshes:
            where = where or (("with CP and FSDP: " if m.fsdp else "with CP: ") if m.context else "")
            ex = {"tsp_size": 4, "tp": 1 if where.startswith("as ") else 2 if "cp" in m.sizes else 4,
                  "cp": 2 if "tp" in m.sizes else 4}
            kinds.append(f"{where}`{m.kind}`: `{m.format(m.spelling, **ex)}`, {m.format(m.planner_label, **ex)}")
            bench.append(f"{where}{m.format(m.bench_label, **ex)}")
        out.append(f"| `{r.name}` | {r.title}: {r.doc} | {sets[r.size_group]} | `{short(r.builder)}` "
                   f"(`{short(r.block_spec)}`) | {'; '.join(kinds)} | {'; '.join(bench)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(inventory(), end="")
