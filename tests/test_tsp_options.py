"""Each TSP option is declared once (issue 29 item 5): `TSPOptions`' fields are the recipe's parallel keys
under the same names, with their one docstring, choices and flag; the recipe (ParallelRecipe inherits
them), `train --help`, pretrain_gpt.py's `--tsp-*` flags and the core read that one declaration. The
old keyword names (`recompute=`, ...) still build one, with a DeprecationWarning."""

import argparse
import ast
import dataclasses
import inspect
import re
import warnings

import pytest

from megatron_tsp import config
from megatron_tsp.config import OLD_OPTION_NAMES, TSP_OPTION_KEYS, ParallelRecipe, TSPConfigError, TSPOptions
from megatron_tsp.megatron_lm.arguments import TSP_FLAGS, add_tsp_args, tsp_options_from_args

KEYS = [f.name for f in dataclasses.fields(TSPOptions)]
# a value other than the default for each option (the recipe, the flags and the core must all carry it)
OTHER = {"tsp_recompute": "full", "tsp_attention_backend": "math_split", "tsp_mlp_exchange": "broadcast",
         "tsp_lm_head": "megatron", "lm_head_chunk_tokens": 7, "mlp_chunk_tokens": 5, "tsp_attention_kv": "streamed",
         "tsp_compute_only": True}


def declarations(name, source=None):
    """The classes of megatron_tsp.config (or of `source`) whose bodies declare a field `name`."""
    tree = ast.parse(source or inspect.getsource(config))
    return [c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for s in c.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.target.id == name]


def test_each_option_is_declared_once_and_is_a_recipe_key():
    assert set(OTHER) == set(KEYS)
    recipe = {f.name: f for f in dataclasses.fields(ParallelRecipe)}
    docs = config.field_docs(TSPOptions)
    for f in dataclasses.fields(TSPOptions):
        assert declarations(f.name) == ["TSPOptions"], f.name
        assert recipe[f.name] is f  # inherited: the same field, default and metadata
        assert len(docs[f.name].split()) > 5 and config.field_docs(ParallelRecipe)[f.name] == docs[f.name]
    # the recipe's key order is unchanged: the layout and sizes, the TSP options, the levers
    names = list(recipe)
    assert names[:5] == ["layout", "size", "pipeline_size", "expert_size", "moe_dispatcher"]
    assert names[5:5 + len(KEYS)] == KEYS
    assert isinstance(ParallelRecipe(), TSPOptions) and ParallelRecipe().tsp_lm_head is None  # null: the layout's


def test_a_second_declaration_is_caught():
    twice = inspect.getsource(config) + '\n\nclass Again:\n    tsp_attention_kv: str = "gathered"\n    """Again."""\n'
    assert declarations("tsp_attention_kv", twice) == ["TSPOptions", "Again"]


def test_train_help_and_the_flags_list_each_option_once():
    from megatron_tsp.training.command import parser

    text = parser().format_help()
    parsed = add_tsp_args(argparse.ArgumentParser(), megatron_lm=True)
    actions = {a.option_strings[0]: a for a in parsed._actions if a.option_strings}
    for key in KEYS:
        assert len(re.findall(rf"^  parallel\.{key} \(default: ", text, re.M)) == 1, key
        flag, choices = TSP_OPTION_KEYS[key]
        assert flag == dataclasses.fields(TSPOptions)[KEYS.index(key)].metadata["flag"]
        if flag is None:  # tsp_compute_only: the benchmarks' switch, no flag
            assert key == "tsp_compute_only" and not any(key.replace("_", "-")[4:] in f for f in actions)
            continue
        assert TSP_FLAGS[f"parallel.{key}"] == flag
        assert actions[flag].help.startswith(f"Recipe key parallel.{key}. ") and actions[flag].choices == choices
    assert sum(f.startswith("--tsp-") for f in actions) == len(KEYS) - 1 + 3  # + --tsp-size, -recipe, -native-spec


def test_the_recipe_and_the_flags_reach_the_core_under_one_name():
    from megatron_tsp.training.recipe import load_recipe

    options = load_recipe(None, [f"parallel.{k}={str(v).lower()}" for k, v in OTHER.items()]).tsp_options()
    assert type(options) is TSPOptions and dataclasses.asdict(options) == OTHER
    argv = [a for k, v in OTHER.items() if TSP_OPTION_KEYS[k][0] for a in (TSP_OPTION_KEYS[k][0], str(v))]
    from_flags = tsp_options_from_args(add_tsp_args(argparse.ArgumentParser(), megatron_lm=True).parse_args(argv))
    assert dataclasses.asdict(from_flags) == {**OTHER, "tsp_compute_only": False}
    assert TSPOptions().tsp_lm_head == "local"  # the core runs the head the recipe's null means


@pytest.mark.parametrize("old", sorted(OLD_OPTION_NAMES))
def test_the_old_keywords_warn_and_mean_the_same(old):
    new = OLD_OPTION_NAMES[old]
    value = OTHER[new] if new != "tsp_compute_only" else True
    with pytest.warns(DeprecationWarning, match=rf"TSPOptions\({old}=\) is deprecated.*\({new}=\)"):
        options = TSPOptions(**{old: value})
    assert options == TSPOptions(**{new: value})
    with pytest.warns(DeprecationWarning):  # dataclasses.replace builds through the same constructor
        assert dataclasses.replace(TSPOptions(), **{old: value}) == options
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TSPOptions(**{new: value})  # the new names never warn
        ParallelRecipe()
    if old != "recompute":  # the recipe never took the old names (its recompute is Megatron's layer recompute)
        with pytest.raises(TypeError):
            ParallelRecipe(**{old: value})


@pytest.mark.parametrize("key", [k for k in KEYS if TSP_OPTION_KEYS[k][1]])
def test_a_bad_value_names_the_recipe_key(key):
    with pytest.raises(TSPConfigError, match=rf"^parallel\.{key} must be one of") as e:
        TSPOptions(**{key: "nonsense"})
    assert e.value.option == f"parallel.{key}"
    old = {v: k for k, v in OLD_OPTION_NAMES.items()}[key]
    with pytest.warns(DeprecationWarning), pytest.raises(TSPConfigError, match=rf"^parallel\.{key} must"):
        TSPOptions(**{old: "nonsense"})
