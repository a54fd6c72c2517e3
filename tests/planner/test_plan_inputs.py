"""The planner speaks the recipe (issue 29 item 3): its inputs take their fields from the recipe's
dataclasses (declared once, in megatron_tsp.config), declare none of them again and alias none;
every input is a flag whose help is the recipe's docstring, and the planner's first spellings
still work; the package's __init__ only re-exports. Read from the source with `ast` where a
future violation would not show at run time."""

import ast
import dataclasses
import inspect
import os

import pytest

from megatron_tsp.config import RECIPE_SECTIONS, field_docs
from megatron_tsp.planner import model as planner_model
from megatron_tsp.planner.cli import parser
from megatron_tsp.planner.model import MODEL_KEYS, TRAIN_KEYS, ModelSpec, TrainSpec

PLANNER = os.path.dirname(planner_model.__file__)


def _recipe_field(name, section):
    return {f.name: f for f in dataclasses.fields(RECIPE_SECTIONS[section])}[name]


@pytest.mark.parametrize("spec, keys", [(ModelSpec, MODEL_KEYS), (TrainSpec, TRAIN_KEYS)])
def test_inputs_take_the_recipe_fields(spec, keys):
    fields = {f.name: f for f in dataclasses.fields(spec)}
    for name, section in keys.items():
        assert fields[name].type == _recipe_field(name, section).type, name
    own = [f for f in fields if f not in keys]
    assert own == list(spec.__dict__["__annotations__"])[len(keys):]  # the class body declares only these
    assert not set(own) & {f.name for cls in RECIPE_SECTIONS.values() for f in dataclasses.fields(cls)} - \
        {"global_batch_size"}, own  # (the planner's global batch is not the recipe's: it plans every DP size)


def _classes(tree):
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def redeclared_and_aliases(source: str):
    """[problem] of the planner's input classes in `source`: an annotated field named as a recipe
    key, or a property that only returns another field (`return self.x`)."""
    keys = {f.name for cls in RECIPE_SECTIONS.values() for f in dataclasses.fields(cls)} - {"global_batch_size"}
    out = []
    for name, cls in _classes(ast.parse(source)).items():
        if name not in ("ModelSpec", "TrainSpec"):
            continue
        fields = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
        out += [f"{name}.{f} re-declares a recipe key" for f in fields & keys]
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef) and any(getattr(d, "id", None) == "property" for d in fn.decorator_list):
                body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
                if (len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Attribute)
                        and getattr(body[0].value.value, "id", None) == "self"):
                    out.append(f"{name}.{fn.name} aliases self.{body[0].value.attr}")
    return out


def test_no_field_declared_twice_and_no_alias():
    assert redeclared_and_aliases(open(inspect.getsourcefile(planner_model)).read()) == []
    planted = '''
class ModelSpec:
    hidden_size: int = 4096
    name: str = "model"

    @property
    def hidden(self) -> int:
        """h"""
        return self.hidden_size

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads
'''
    assert redeclared_and_aliases(planted) == ["ModelSpec.hidden_size re-declares a recipe key",
                                               "ModelSpec.hidden aliases self.hidden_size"]


def test_every_input_is_a_flag_with_the_recipe_docstring():
    actions = {a.dest: a for a in parser()._actions}
    for keys in (MODEL_KEYS, TRAIN_KEYS):
        for name, section in keys.items():
            a = actions[name]
            assert "--" + name.replace("_", "-") in a.option_strings, name
            doc = field_docs(RECIPE_SECTIONS[section])[name]
            assert a.help.startswith(f"{section}.{name}. {doc}".replace("%", "%%")), name
            assert a.default is None  # not given: the recipe's value, else the input's default


# every flag `megatron-tsp plan` had before its flags came from the recipe (and its docs use), with a value
OLD_FLAGS = {"--layers": "2", "--hidden": "64", "--heads": "4", "--kv-groups": "2", "--ffn": "128", "--vocab": "256",
             "--dtype": "float32", "--no-gated": None, "--seq-len": "128", "--micro-batch": "2",
             "--global-batch": "4", "--optimizer": "adam", "--distributed-optimizer": None,
             "--optimizer-cpu-offload": None, "--no-optimizer-cpu-offload": None,
             "--optimizer-offload-fraction": "0.5", "--recompute": "full", "--recompute-method": "block",
             "--recompute-num-layers": "1", "--tsp-recompute": "full", "--offload-activations": None,
             "--no-offload-activations": None, "--tsp-lm-head": "megatron", "--lm-head-chunk-tokens": "64",
             "--mlp-chunk-tokens": "32", "--tsp-attention-kv": "streamed", "--cp-comm-type": "p2p",
             "--document-length": "16", "--norm": "torch", "--tsp-mlp-exchange": "ring", "--expert-size": "1",
             "--gpus-per-node": "4", "--nodes": "2", "--gpu-memory-gb": "80", "--host-memory-gb": "100",
             "--hardware": "h100", "--layout": "tsp4", "--json": None, "--frontier": None,
             "--max-seq-len": "4096", "--inference": None, "--prompt-tokens": "64", "--new-tokens": "2",
             "--batch": "2", "--chunk-tokens": "16", "--detail": None}


@pytest.mark.parametrize("flag", sorted(OLD_FLAGS))
def test_old_flag_spellings_still_parse(flag):
    value, p = OLD_FLAGS[flag], parser()
    args, plain = vars(p.parse_args([flag] + ([value] if value is not None else []))), vars(p.parse_args([]))
    assert {k for k in args if args[k] != plain[k]}, f"{flag} set nothing"


def test_package_init_only_reexports():
    tree = ast.parse(open(os.path.join(PLANNER, "__init__.py")).read())
    for node in tree.body:
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)) or (
            isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]), ast.dump(node)[:80]
    # and no module of the planner imports a name back from the package (only its submodules)
    modules = {f[:-3] for f in os.listdir(PLANNER) if f.endswith(".py")}
    for f in sorted(os.listdir(PLANNER)):
        if f.endswith(".py") and f != "__init__.py":
            for node in ast.walk(ast.parse(open(os.path.join(PLANNER, f)).read())):
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
                    assert {a.name for a in node.names} <= modules, f"{f} imports {[a.name for a in node.names]}"
