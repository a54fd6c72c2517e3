"""The layout registry (megatron_tsp/layouts.py): every record is complete (no layout can be
half-added: a record without a builder that imports, a planner kind, labels naming its sizes, a
reason when it refuses context parallelism, ... is caught, and the checks catch each planted
omission), and every front end's list is the registry's: the recipe's accepted names, the
planner's kinds, labels and spellings, bench's row labels, build_gpt's layouts, the docs' table."""

import dataclasses
import inspect
import os
import string
import types
from typing import List

import pytest

from megatron_tsp import layouts
from megatron_tsp.layouts import LAYOUTS, PLANNER_KINDS, Mesh, ParallelLayout
from tests.utils import run_with_torch_blocked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_GROUPS = ("tsp", "tp", None)
BUILDER_KEYWORDS = ("pg_collection", "tsp_options", "core_attention")


def _names_in(text: str) -> set:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def _example_sizes(mesh: Mesh) -> dict:
    return {"tsp_size": 4 if "tsp_size" in mesh.sizes else 1, "tp": (2 if "cp" in mesh.sizes else 4)
            if "tp" in mesh.sizes else 1, "cp": (2 if "tp" in mesh.sizes else 4) if "cp" in mesh.sizes else 1}


def problems(records) -> List[str]:
    """What the layout records `records` lack, one line each (empty: complete)."""
    from megatron_tsp.planner import hardware
    from megatron_tsp.training.build import resolve

    families = set.intersection(*(set(hardware.load(h).attention_tflops) for h in hardware.available()))
    out, kinds, spellings = [], {}, {}
    names = {r.name for r in records}
    for r in records:
        for f in dataclasses.fields(ParallelLayout):
            value = getattr(r, f.name)
            if f.name not in ("size_group", "why_no_context", "planned_as") and value in ("", (), None):
                out.append(f"{r.name}: {f.name} is empty")
        if r.size_group not in SIZE_GROUPS:
            out.append(f"{r.name}: size_group {r.size_group!r} is not one of {SIZE_GROUPS}")
        if bool(r.why_no_context) == r.context_parallel:
            out.append(f"{r.name}: why_no_context must say why exactly when context_parallel is false")
        for what, ref in (("builder", r.builder), ("block_spec", r.block_spec)):
            try:
                obj = resolve(ref)
            except (ImportError, AttributeError, ValueError) as e:
                out.append(f"{r.name}: {what} {ref!r} does not resolve ({type(e).__name__}: {e})")
                continue
            if not callable(obj):
                out.append(f"{r.name}: {what} {ref!r} is not callable")
            elif what == "builder":
                params = inspect.signature(obj).parameters
                if not all(k in params for k in BUILDER_KEYWORDS) or not any(
                        p.kind is p.VAR_KEYWORD for p in params.values()):
                    out.append(f"{r.name}: builder {ref!r} must take config, {', '.join(BUILDER_KEYWORDS)} and "
                               "GPTModel's keyword arguments")
        if r.planned_as is not None and r.planned_as not in names:
            out.append(f"{r.name}: planned_as {r.planned_as!r} is no layout")
        elif not any(not m.context and not m.fsdp for m in r.meshes) and r.planned_as is None:
            out.append(f"{r.name}: no planner kind of its own (a mesh without CP) and no planned_as")
        for m in r.meshes:
            for f in dataclasses.fields(Mesh):
                if getattr(m, f.name) in ("", ()):
                    out.append(f"{r.name}: mesh {m.kind!r}: {f.name} is empty")
            if (m.context or m.fsdp) and not r.context_parallel:
                out.append(f"{r.name}: mesh {m.kind!r} runs with CP / FSDP, which the layout refuses")
            g = r.group_sizes(size=3, context_size=5 if m.context else 1)
            given = {k for k, v in (("tsp_size", g.tsp), ("tp", g.tp), ("cp", g.cp)) if v != 1}
            if set(m.sizes) != given:
                out.append(f"{r.name}: mesh {m.kind!r} takes sizes {sorted(m.sizes)}; the layout gives {sorted(given)}")
            for what in ("planner_label", "spelling", "bench_label"):
                if _names_in(getattr(m, what)) != set(m.sizes):
                    out.append(f"{r.name}: mesh {m.kind!r}: {what} {getattr(m, what)!r} must name its sizes "
                               f"{sorted(m.sizes)}")
            if m.attention not in families:
                out.append(f"{r.name}: mesh {m.kind!r}: attention {m.attention!r} is not one of the hardware "
                           f"profiles' {sorted(families)}")
            if m.kind in kinds:
                out.append(f"{r.name}: planner kind {m.kind!r} is {kinds[m.kind]}'s already")
            kinds[m.kind] = r.name
            spelled = m.spelling.format(tsp_size=7, tp=7, cp=7)
            if spelled in spellings:
                out.append(f"{r.name}: mesh {m.kind!r} is spelled as {spellings[spelled]!r}")
            spellings[spelled] = m.kind
    return out


def test_every_record_is_complete():
    assert not problems(layouts._RECORDS), "\n".join(problems(layouts._RECORDS))
    assert list(LAYOUTS) == [r.name for r in layouts._RECORDS]


def _plant(kind: str):
    tp, tp_sp, tsp = LAYOUTS["tp"], LAYOUTS["tp_sp"], LAYOUTS["tsp"]
    new = dataclasses.replace(tp_sp, name="ulysses", title="Ulysses")
    if kind == "no_doc":
        new = dataclasses.replace(new, doc="")
    elif kind == "builder_missing":
        new = dataclasses.replace(new, builder="megatron_tsp.baselines.model:build_ulysses_gpt")
    elif kind == "builder_signature":
        new = dataclasses.replace(new, builder="megatron_tsp.baselines.specs:get_sp_block_spec")
    elif kind == "no_planner_kind":
        new = dataclasses.replace(new, meshes=())
    elif kind == "kind_taken":
        new = dataclasses.replace(new, meshes=(tp.meshes[0],))
    elif kind == "label_without_size":
        new = dataclasses.replace(new, meshes=(Mesh("ulysses", False, False, ("tp",), "Ulysses", "ulysses{tp}",
                                                    "Ulysses={tp}", "square_causal"),))
    elif kind == "sizes_wrong":
        new = dataclasses.replace(new, meshes=(Mesh("ulysses", False, False, ("cp",), "Ulysses {cp}", "ulysses{cp}",
                                                    "Ulysses={cp}", "square_causal"),))
    elif kind == "spelled_as_another":
        new = dataclasses.replace(new, meshes=(dataclasses.replace(tp_sp.meshes[0], kind="ulysses"),))
    elif kind == "refuses_context_silently":
        new = dataclasses.replace(tsp, name="ulysses", why_no_context="",
                                  meshes=(dataclasses.replace(tsp.meshes[0], kind="ulysses", spelling="u{tsp_size}"),))
    elif kind == "unknown_size_group":
        new = dataclasses.replace(new, size_group="sp", meshes=())
    elif kind == "attention_unknown":
        new = dataclasses.replace(new, meshes=(dataclasses.replace(tp_sp.meshes[0], kind="ulysses",
                                                                   spelling="ulysses{tp}", attention="all_to_all"),))
    else:
        raise AssertionError(kind)
    return layouts._RECORDS + (new,)


@pytest.mark.parametrize("kind", ["no_doc", "builder_missing", "builder_signature", "no_planner_kind", "kind_taken",
                                  "label_without_size", "sizes_wrong", "spelled_as_another",
                                  "refuses_context_silently", "unknown_size_group", "attention_unknown"])
def test_a_half_added_layout_is_caught(kind):
    """Test the test: the registry plus one new record lacking one thing fails the check."""
    found = problems(_plant(kind))
    assert found and all("ulysses" in p for p in found), found


def test_group_sizes():
    assert LAYOUTS["tsp"].group_sizes(4, 1, 2) == layouts.GroupSizes(tsp=4, pp=2)
    assert LAYOUTS["tp_sp"].group_sizes(2, 2) == layouts.GroupSizes(tp=2, cp=2)
    assert LAYOUTS["tp"].group_sizes(4).axis == 4 and LAYOUTS["dp"].group_sizes(4, 2).axis == 1
    g = LAYOUTS["tp_sp"].group_sizes(2, 2, 2)
    assert (g.axis, g.replica, g.data(16)) == (2, 8, 2)
    for r in LAYOUTS.values():
        g = r.group_sizes(3, 5, 7)
        assert g.tsp * g.tp == (1 if r.size_group is None else 3) and min(g.tsp, g.tp) == 1 and (g.cp, g.pp) == (5, 7)
        assert r.uses_tsp == (g.tsp == 3)


# -- every front end's list is the registry's ----------------------------------------------------

def test_the_recipe_accepts_the_registry_names():
    from megatron_tsp.config import ParallelRecipe, field_docs
    from megatron_tsp.training.recipe import LAYOUTS as RECIPE_LAYOUTS, RecipeError, load_recipe

    assert RECIPE_LAYOUTS == tuple(LAYOUTS)
    doc = field_docs(ParallelRecipe)["layout"]
    for name, r in LAYOUTS.items():
        recipe = load_recipe(None, [f"parallel.layout={name}", "parallel.size=2"])
        assert recipe.layout() is r and recipe.group_sizes() == r.group_sizes(2)
        assert recipe.axis_size == (1 if r.size_group is None else 2)
        words = doc.replace(",", " ").replace("(", " ").split()
        assert name in words, f"ParallelRecipe.layout's docstring names no {name}"
    with pytest.raises(RecipeError, match=f"parallel.layout = 'ulysses' is not one of {', '.join(LAYOUTS)}$"):
        load_recipe(None, ["parallel.layout=ulysses"])
    for name, r in LAYOUTS.items():  # CP with the layouts that refuse it: their reason, the others named
        if not r.context_parallel:
            with pytest.raises(RecipeError, match=f"parallel.context_size = 2 cannot be combined with parallel.layout "
                                                  f"= {name}: {r.why_no_context}"):
                load_recipe(None, [f"parallel.layout={name}", "parallel.context_size=2"])


def test_the_planner_kinds_are_the_registry_meshes():
    import importlib

    from megatron_tsp.planner.model import LAYOUT_KINDS, Layout

    assert tuple(PLANNER_KINDS) == LAYOUT_KINDS
    planner = importlib.import_module("megatron_tsp.planner")  # its table: planner/__init__.py, or its plan module
    family = (getattr(planner, "ATTENTION_FAMILY", None)
              or importlib.import_module("megatron_tsp.planner.plan").ATTENTION_FAMILY)
    assert family == {kind: mesh.attention for kind, (_, mesh) in PLANNER_KINDS.items()}
    for kind, (record, mesh) in PLANNER_KINDS.items():
        sizes = _example_sizes(mesh)
        lay = Layout(kind, **sizes)
        assert lay.label == mesh.format(mesh.planner_label, **sizes)
        assert Layout.parse(mesh.format(mesh.spelling, **sizes)) == lay
        assert lay.sequence_parallel == (record.sequence_parallel and lay.weight_shards > 1), kind
        assert lay.token_shards == (lay.weight_shards if record.sequence_parallel else 1) * lay.cp, kind


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_planner_reads_a_recipe_as_the_registry(name):
    """planner.model.recipe_layout (its torch-free recipe reader) gives the registry's kind and sizes
    for every layout alone, with CP, with FSDP and with both (where the recipe takes them), or
    refuses where the registry has no mesh."""
    from megatron_tsp.planner.errors import PlanError
    from megatron_tsp.planner.model import recipe_layout

    for cp in (1, 2):
        for fsdp in (False, True):
            if (cp > 1 or fsdp) and not LAYOUTS[name].context_parallel:
                continue  # the recipe refuses it
            parallel = {"layout": name, "size": 2, "context_size": cp, "fsdp": fsdp}
            over = [f"parallel.{k}={str(v).lower()}" for k, v in parallel.items()]
            want = layouts.planner_layout(parallel)
            if want is None:
                with pytest.raises(PlanError):
                    recipe_layout(os.path.join(REPO, "configs", "tiny.yaml"), over)
                continue
            lay = recipe_layout(os.path.join(REPO, "configs", "tiny.yaml"), over)
            assert (lay.kind, {"tsp_size": lay.tsp_size, "tp": lay.tp, "cp": lay.cp}) == want, parallel


def test_the_bench_labels_are_the_registry_labels():
    from megatron_tsp.bench.rows import LAYOUTS as ROWS

    for n in (2, 4, 8):
        half = max(n // 2, 1)
        for key, row in ROWS.items():
            assert row.overrides[0] == f"parallel.layout={row.layout}" and row.layout in LAYOUTS, key
            parallel = {"layout": row.layout, "size": int(row.size.format(n=n, half=half)),
                        "context_size": int(row.context_size.format(n=n, half=half)), "fsdp": row.fsdp}
            want = layouts.bench_label(parallel) + (f", {row.suffix}" if row.suffix else "")
            assert row.label.format(n=n, half=half) == want, key


def test_build_gpt_takes_the_registry_names():
    """build_gpt's layout is a registry name (the refusal before any group is read), and data
    parallelism refuses a TP group of more than one rank."""
    from megatron_tsp.config import ModelShape, TSPConfigError
    from megatron_tsp.training.build import build_gpt

    with pytest.raises(TSPConfigError, match=f"build_gpt: layout = 'native' is not one of {', '.join(LAYOUTS)}$"):
        build_gpt(ModelShape(), layout="native", pg_collection=None)
    group = types.SimpleNamespace(size=lambda: 2, rank=lambda: 0)
    pgs = types.SimpleNamespace(tp=group, cp=types.SimpleNamespace(size=lambda: 1), pp=group)
    with pytest.raises(TSPConfigError, match=r"layout = 'dp' \(DP\) runs on a TP group of one rank; "
                                             r"pg_collection.tp has 2"):
        build_gpt(ModelShape(), layout="dp", pg_collection=pgs)


def test_the_docs_table_is_the_registry():
    doc = open(os.path.join(REPO, "docs", "architecture.md")).read()
    begin, end = "<!-- layouts.inventory() -->\n", "<!-- end of layouts.inventory() -->"
    assert begin in doc and end in doc
    assert doc.split(begin, 1)[1].split(end, 1)[0] == layouts.inventory(), (
        "docs/architecture.md's layout table differs from the registry: regenerate it with "
        "`python -m megatron_tsp.layouts`")


def test_the_registry_imports_no_torch():
    """The planner and `--help` read it where torch is not installed."""
    out = run_with_torch_blocked("from megatron_tsp import layouts\nprint(layouts.inventory(), end='')\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == layouts.inventory()


def test_the_checkpoint_names_the_layout_by_its_groups():
    """A checkpoint that does not match the run names both layouts by the record's groups (dp: no
    TP axis whatever parallel.size says); a layout this version does not know keeps its size."""
    from megatron_tsp.training.checkpoint import _layout_text

    assert _layout_text({"layout": "dp", "size": 4, "context_size": 2}, 8) == "dp 1 x pipeline 1 x context 2 x data 4"
    assert _layout_text({"layout": "tsp", "size": 4, "pipeline_size": 2}, 16) == "tsp 4 x pipeline 2 x data 2"
    assert _layout_text({"layout": "ulysses", "size": 4}, 8) == "ulysses 4 x pipeline 1 x data 2"
