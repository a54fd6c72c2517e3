"""A training recipe (configs/*.yaml) read without importing torch or megatron.

`megatron_tsp.training.recipe` builds on `megatron_tsp.training.build.ModelShape`, whose module imports torch
and megatron-core (tens of seconds on a loaded machine); the planner only needs the values.
The recipe dataclasses' field names and literal defaults are read from their source with `ast`
(so a key another branch adds to the recipe is known here with its default, with no copy to
keep in step), the YAML and the `section.key=value` overrides are applied as `load_recipe`
applies them, and an unknown section or key is a PlanError naming it. The values the planner
models are checked where they are used (ModelSpec, TrainSpec); `megatron-tsp train` runs the
recipe's own checks.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List

import yaml

from .errors import PlanError

_PKG = os.path.join(os.path.dirname(__file__), "..")
# recipe section -> (source file, class) whose fields it holds; a class's bases in the same files
_SECTIONS = {"model": "ModelRecipe", "parallel": "ParallelRecipe", "train": "TrainRecipe", "data": "DataRecipe"}
_SOURCES = ("training/recipe.py", "training/build.py")
_MISSING = object()  # a field whose default is not a literal (a factory)


def _classes() -> Dict[str, ast.ClassDef]:
    out = {}
    for name in _SOURCES:
        with open(os.path.join(_PKG, name)) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, node)
    return out


def _fields(cls: str, classes: Dict[str, ast.ClassDef]) -> Dict[str, object]:
    node = classes[cls]
    out: Dict[str, object] = {}
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out.update(_fields(base.id, classes))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            try:
                out[stmt.target.id] = ast.literal_eval(stmt.value) if stmt.value is not None else _MISSING
            except ValueError:
                out[stmt.target.id] = _MISSING
    return out


def recipe_defaults() -> Dict[str, Dict[str, object]]:
    classes = _classes()
    return {section: _fields(cls, classes) for section, cls in _SECTIONS.items()}


def _parse_override(text: str) -> dict:
    """`a.b=value` -> {'a': {'b': value}}, the value parsed as YAML (as megatron_tsp.training.recipe does)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise PlanError(f"override {text!r} must look like section.key=value (e.g. parallel.size=4)")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    return {section: {name: yaml.safe_load(raw) if raw.strip() else None}}


def read_recipe(path: str, overrides: List[str] = ()) -> Dict[str, Dict[str, object]]:
    """{section: {key: value}} of the recipe at `path` with `overrides`, defaults filled in."""
    if not os.path.isfile(path):
        raise PlanError(f"recipe file {path!r} does not exist")
    values = recipe_defaults()
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for where, block in [(path, data)] + [("override", _parse_override(o)) for o in overrides]:
        if not isinstance(block, dict):
            raise PlanError(f"{where}: a recipe is a mapping of sections ({', '.join(_SECTIONS)})")
        for section, keys in block.items():
            if section not in values:
                raise PlanError(f"{where}: unknown recipe section {section!r} (valid: {', '.join(_SECTIONS)})")
            if keys is None:
                continue
            if not isinstance(keys, dict):
                raise PlanError(f"{where}: recipe section {section!r} must be a mapping")
            for key, value in keys.items():
                if key not in values[section]:
                    raise PlanError(f"{where}: unknown recipe key {section}.{key}")
                values[section][key] = value
    return values
