"""The layout is the architecture (docs/architecture.md): each folder of megatron_tsp may import
only the layers below it, no module imports itself around a circle, and the planner runs without
torch or megatron. Read from the source with `ast` (every import, at module level or inside a
function), so a future violation fails here before anyone runs it."""

import ast
import os
import re
import sys
from typing import Dict, Set

import pytest

from tests.utils import run_with_torch_blocked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "megatron_tsp"

# folder -> the folders it may import ("" = the package's base: config, layouts, compat, parallel_state, patches,
# output, cli, __init__). Lower layers first; see docs/architecture.md.
ALLOWED = {
    "": {""},
    "tsp": {"", "tsp"},
    "baselines": {"", "tsp", "baselines"},
    "planner": {"", "planner"},
    # training -> planner: the driver's host-memory check counts with the planner's (torch-free) formulas
    "training": {"", "tsp", "baselines", "training", "planner"},
    "megatron_lm": {"", "tsp", "baselines", "training", "megatron_lm"},
    "bench": {"", "tsp", "baselines", "training", "planner", "bench"},
    "inference": {"", "tsp", "training", "inference"},
    "probe": {"", "tsp", "baselines", "training", "inference", "planner", "bench", "probe"},
}
# Known exceptions, each with the reason and when it goes.
EXCEPTIONS = set()
# the planner is imported by `megatron-tsp plan` and runs where torch is not installed (a laptop)
NO_TORCH = ("planner",)


def modules() -> Dict[str, str]:
    """module name -> file path, for every module of the package."""
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, PKG)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports_of(name: str, path: str, known) -> Set[str]:
    """The modules `name` imports (package modules resolved; others by their top-level name)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:  # `from pkg import submodule` imports the submodule
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return out


def graph():
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}, known


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED and parts[1]) else ""


def test_layers_import_only_below():
    g, known = graph()
    bad = []
    for m, deps in g.items():
        for d in deps:
            if d in known and d != PKG and layer(d) not in ALLOWED[layer(m)] and (m, d) not in EXCEPTIONS:
                bad.append(f"{m} imports {d} ({layer(m) or 'base'} may import {sorted(ALLOWED[layer(m)])})")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    g, known = graph()
    g = {m: {d for d in deps if d in known} for m, deps in g.items()}
    # Tarjan's strongly connected components: a component of two or more modules is a circle
    index, low, stack, on, comps, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]; n[0] += 1
        stack.append(v); on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    circles = [sorted(c) for c in comps if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def test_planner_imports_no_torch_in_source():
    g, _ = graph()
    bad = [f"{m} imports {d}" for m, deps in g.items() if layer(m) in NO_TORCH
           for d in deps if d.split(".")[0] in ("torch", "megatron")]
    assert not bad, "\n".join(bad)


# Layers that take their process groups as arguments (a ProcessGroupCollection or a group): none
# reads Megatron's global group getters or builds a collection from them. The base layer builds the
# collection once where the groups are made (parallel_state.py); megatron_lm/ is Megatron-LM's glue,
# which builds its groups itself and reads them where Megatron-LM passes none.
GROUPS_PASSED = ("tsp", "baselines", "training", "inference", "probe", "bench")
COLLECTION_FROM_GLOBALS = ("use_mpu_process_groups", "tsp_process_groups")
_GETTER = re.compile(r"^(get_\w*(group|groups|group_gloo|world_size|rank|ranks)|is_pipeline_(first|last)_stage"
                     r"|is_rank_in_\w+|get_\w+_src_rank)$")


def global_group_reads(layers=GROUPS_PASSED):
    """`module:line reads name` for every use of a Megatron global group getter (by name, as an
    attribute or a bare name) in the modules of `layers`."""
    from megatron.core import parallel_state as mpu

    getters = {name for name in vars(mpu) if _GETTER.match(name)} | set(COLLECTION_FROM_GLOBALS)
    assert {"get_tensor_model_parallel_group", "get_data_parallel_rank", "get_context_parallel_group"} <= getters
    bad = []
    for name, path in modules().items():
        if layer(name) not in layers:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            called = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if called in getters:
                bad.append(f"{name}:{node.lineno} reads {called}")
    return bad


def test_layers_read_no_global_groups():
    bad = global_group_reads()
    assert not bad, "\n".join(bad)




def test_plan_runs_with_torch_and_megatron_blocked():
    """`megatron-tsp plan` and every planner module, in a process where importing torch or
    megatron raises; the finder is tested too (torch does fail to import there)."""
    code = """
import importlib, pkgutil
import megatron_tsp.planner as planner
for m in pkgutil.walk_packages(planner.__path__, "megatron_tsp.planner."):
    importlib.import_module(m.name)
from megatron_tsp import cli
rc = cli.main(["plan", "configs/7b_128k.yaml"])
assert rc in (0, None), rc
try:
    import torch
except ImportError:
    print("TORCH BLOCKED")
"""
    out = run_with_torch_blocked(code, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TORCH BLOCKED" in out.stdout
    assert "TSP D=4" in out.stdout  # the plan was printed


@pytest.mark.parametrize("bad", ["tsp_imports_training", "circle", "training_reads_a_global_group",
                                 "bench_collects_the_global_groups"])
def test_the_rules_catch_a_violation(tmp_path, monkeypatch, bad):
    """Test the test: a copy of the package with one violation fails the check."""
    import shutil
    shutil.copytree(os.path.join(REPO, PKG), tmp_path / PKG)
    if bad == "training_reads_a_global_group":
        with open(tmp_path / PKG / "training" / "loop.py", "a") as f:
            f.write("\n\ndef _x():\n    from megatron.core import parallel_state as mpu\n"
                    "    return mpu.get_data_parallel_rank()\n")
        check = test_layers_read_no_global_groups
    elif bad == "bench_collects_the_global_groups":
        with open(tmp_path / PKG / "bench" / "worker.py", "a") as f:
            f.write("\n\ndef _x():\n    return ProcessGroupCollection.use_mpu_process_groups()  # noqa\n")
        check = test_layers_read_no_global_groups
    elif bad == "tsp_imports_training":
        with open(tmp_path / PKG / "tsp" / "rope.py", "a") as f:
            f.write("\n\ndef _x():\n    from ..training import loop  # noqa\n")
        check = test_layers_import_only_below
    else:
        with open(tmp_path / PKG / "config.py", "a") as f:
            f.write("\n\ndef _x():\n    from .parallel_state import initialize_model_parallel  # noqa\n")
        check = test_no_import_circle
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    with pytest.raises(AssertionError):
        check()
