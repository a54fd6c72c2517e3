"""`megatron-tsp train --help` gives every recipe key its meaning and default, from the one option
definition (the dataclasses of megatron_tsp.config): a key added without a docstring fails here."""

import dataclasses
import re
from typing import Optional

import pytest

from megatron_tsp import config
from megatron_tsp.training.command import parser
from tests.utils import run_with_torch_blocked


def undocumented(help_text: str):
    """The recipe keys whose default or meaning `help_text` lacks."""
    missing = []
    for section, cls in config.RECIPE_SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            default = config._yaml_value(config.field_default(f))
            m = re.search(rf"^  {re.escape(key)} \(default: {re.escape(default)}\)\n((?:      \S.*\n)+)",
                          help_text + "\n", re.M)
            if m is None or len(m.group(1).split()) < 2:
                missing.append(key)
    return missing


def test_train_help_gives_every_recipe_key_a_meaning_and_its_default():
    text = parser().format_help()
    assert undocumented(text) == []
    keys = config.recipe_keys()
    assert len(keys) > 40 and all(meaning for _, meaning in keys.values())
    # the docstrings' named numbers are rendered (the threshold is typed once, in config)
    flat = " ".join(text.split())
    assert f"below {config.AUTO_TOKENS_BELOW} tokens per rank" in flat and "AUTO_TOKENS_BELOW" not in text


def test_a_key_without_a_docstring_fails_the_help_check(monkeypatch):
    @dataclasses.dataclass
    class Extra(config.DataRecipe):
        """The data, and one more key."""

        documented: int = 3
        """A key with its meaning."""
        undocumented_key: Optional[str] = None

    monkeypatch.setitem(config.RECIPE_SECTIONS, "data", Extra)
    text = parser().format_help()
    assert "data.documented (default: 3)" in text
    assert undocumented(text) == ["data.undocumented_key"]


@pytest.mark.parametrize("key", ["train.steps", "parallel.tsp_recompute"])
def test_the_help_default_is_the_recipe_default(key):
    from megatron_tsp.training.recipe import Recipe

    section, name = key.split(".")
    default = getattr(getattr(Recipe(), section), name)
    assert f"{key} (default: {config._yaml_value(default)})" in parser().format_help()


@pytest.mark.parametrize("command", [["train", "--help"], ["generate", "--help"], ["bench", "--help"], ["run", "--help"], ["probe", "--help"]])
def test_help_imports_neither_torch_nor_megatron(command):
    """`megatron-tsp COMMAND --help` in a process where importing torch or megatron raises (the
    planner's check, tests/test_layering.py): the help comes from the option dataclasses, and for
    `train` it still gives every recipe key its meaning and default."""
    code = f"""
from megatron_tsp import cli
try:
    rc = cli.main({command!r})
except SystemExit as e:  # argparse's --help
    rc = e.code
assert rc in (0, None), rc
try:
    import torch
except ImportError:
    print("TORCH BLOCKED", file=sys.stderr)
"""
    out = run_with_torch_blocked(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TORCH BLOCKED" in out.stderr  # the blocker works: the help really ran without torch
    assert out.stdout.startswith("usage: ") and command[0] in out.stdout.splitlines()[0]
    if command[0] == "train":
        assert undocumented(out.stdout) == []
        assert len(re.findall(r"^  \w+\.\w+ \(default: ", out.stdout, re.M)) == len(config.recipe_keys())
