"""A training recipe (configs/*.yaml) read without importing torch or megatron.

The recipe's keys and defaults are the dataclasses of `megatron_tsp.config` (RECIPE_SECTIONS:
declared once, importable without torch); the YAML and the `section.key=value` overrides are
applied as `megatron_tsp.training.recipe.load_recipe` applies them, and an unknown section or
key is a PlanError naming it. The values the planner models are checked where they are used
(ModelSpec, TrainSpec); `megatron-tsp train` runs the recipe's own checks.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import yaml

from ..config import RECIPE_SECTIONS, field_default, read_yaml_file, yaml_problem
from .errors import PlanError

_SECTIONS = tuple(RECIPE_SECTIONS)


def recipe_defaults() -> Dict[str, Dict[str, object]]:
    return {section: {f.name: field_default(f) for f in dataclasses.fields(cls)}
            for section, cls in RECIPE_SECTIONS.items()}


def _parse_override(text: str) -> dict:
    """`a.b=value` -> {'a': {'b': value}}, the value parsed as YAML (as megatron_tsp.training.recipe does)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise PlanError(f"override {text!r} must look like section.key=value (e.g. parallel.size=4)")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise PlanError(f"override {text!r}: the value is not valid YAML ({yaml_problem(e)})") from None
    return {section: {name: value}}


def read_recipe(path: str, overrides: List[str] = ()) -> Dict[str, Dict[str, object]]:
    """{section: {key: value}} of the recipe at `path` with `overrides`, defaults filled in."""
    values = recipe_defaults()
    data = read_yaml_file(path, PlanError)
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
