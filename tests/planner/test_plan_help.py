"""Every example `megatron-tsp plan --help` shows runs as written (exit 0, output produced), in
this process (the planner imports no torch): the layout list names layouts the default profile
can hold, and a layout it cannot hold is an error, not an empty table."""

import os
import shlex

import pytest

from megatron_tsp.planner.cli import main as plan_main
from megatron_tsp.planner.cli import parser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def help_examples():
    text = parser().format_help()
    block = text.split("examples (")[1].split("\n\n")[0].replace("\\\n", " ")
    return [ln.split("#")[0].strip() for ln in block.splitlines()[1:] if ln.strip().startswith("megatron-tsp plan")]


def test_help_has_examples():
    assert len(help_examples()) >= 4


@pytest.mark.parametrize("command", help_examples())
def test_help_example_runs(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    argv = shlex.split(command)[2:]
    if argv[:1] == ["validate"]:
        argv += ["--out", str(tmp_path / "plan_validation.md")]  # not the checkout's docs/
    assert plan_main(argv) in (0, None), capsys.readouterr()
    assert capsys.readouterr().out.strip()


def test_layout_too_big_for_the_profile_is_an_error(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    rc = plan_main(["configs/7b_16k.yaml", "--layout", "tp2xcp4"])
    assert rc not in (0, None)
    assert "needs 8 GPUs" in capsys.readouterr().err
