"""Recipes: the embedded default equals configs/tiny.yaml; bad keys, types and layouts are one
clear error naming the key and listing what is valid."""

import dataclasses
import glob
import os

import pytest
import torch

from megatron_tsp.training.recipe import Recipe, RecipeError, load_recipe
from megatron_tsp.training.loop import parser

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def test_tiny_yaml_is_the_embedded_default():
    assert dataclasses.asdict(load_recipe(os.path.join(CONFIGS, "tiny.yaml"))) == dataclasses.asdict(Recipe())


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))))
def test_every_recipe_loads(path):
    load_recipe(path)


@pytest.mark.parametrize("override,message", [
    (["model.hidden=64"], r"unknown key model.hidden; valid keys of model: num_layers, hidden_size"),
    (["optim.lr=1"], r"unknown section 'optim'; valid sections: model, parallel, train, data"),
    (["train.lr=fast"], r"train.lr = 'fast' has the wrong type: expected float"),
    (["train.steps=2.5"], r"train.steps = 2.5 has the wrong type: expected int"),
    (["parallel.layout=cp"], r"parallel.layout = 'cp' is not one of tsp, dp, tp, tp_sp"),
    (["parallel.size=3"], r"model.num_attention_heads = 4 must be divisible by parallel.size = 3"),
    (["parallel.layout=tp_sp", "parallel.size=1"], r"parallel.layout = tp_sp needs parallel.size >= 2: sequence"),
    (["model.seq_length=66"], r"model.seq_length = 66 must be divisible by 2 x parallel.size = 4"),
    (["steps=3"], r"override 'steps=3' must look like section.key=value"),
    (["train.resume=true"], r"train.resume = true needs train.save_dir"),
    (["parallel.gemm_sm_carveout=-1"], r"parallel.gemm_sm_carveout = -1 must be >= 0"),
    (["parallel.tsp_lm_head=fused"], r"parallel.tsp_lm_head must be one of local, megatron, got 'fused'"),
    (["parallel.lm_head_chunk_tokens=0"], r"parallel.lm_head_chunk_tokens must be a positive integer, got 0"),
    (["parallel.mlp_chunk_tokens=-1"], r"parallel.mlp_chunk_tokens must be a non-negative integer \(0: untiled\), got -1"),
    (["parallel.tsp_attention_kv=ring"], r"parallel.tsp_attention_kv must be one of gathered, streamed, got 'ring'"),
    (["parallel.layout=tp", "parallel.tsp_attention_kv=streamed"],
     r"parallel.tsp_attention_kv = streamed needs parallel.layout = tsp \(got tp\)"),
    (["parallel.layout=tp", "parallel.tsp_lm_head=local"], r"parallel.tsp_lm_head = local needs parallel.layout = tsp"),
    (["parallel.layout=dp", "parallel.context_size=2", "parallel.cp_comm_type=a2a"],
     r"parallel.cp_comm_type = 'a2a' is not one of all_gather, p2p"),
    (["parallel.layout=dp", "parallel.cp_comm_type=p2p"],
     r"parallel.cp_comm_type = p2p \(ring attention over the context-parallel group\) needs parallel.context_size > 1"),
] + ([] if torch.cuda.is_available() else [  # the CPU machine (CI): GPU-only keys are refused
    (["parallel.gemm_sm_carveout=8"], r"parallel.gemm_sm_carveout needs GPUs"),
    (["parallel.high_priority_comm=true"], r"parallel.high_priority_comm = true needs NCCL process groups"),
]))
def test_bad_overrides(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, override)


def test_lm_head_keys_reach_the_tsp_options():
    assert load_recipe(None, []).tsp_options().tsp_lm_head == "local"
    options = load_recipe(None, ["parallel.tsp_lm_head=megatron", "parallel.lm_head_chunk_tokens=7"]).tsp_options()
    assert (options.tsp_lm_head, options.lm_head_chunk_tokens) == ("megatron", 7)
    assert load_recipe(None, ["parallel.layout=dp", "parallel.tsp_lm_head=megatron"]).parallel.layout == "dp"


def test_attention_kv_reaches_the_tsp_options():
    assert load_recipe(None, []).tsp_options().tsp_attention_kv == "gathered"
    assert load_recipe(None, ["parallel.tsp_attention_kv=streamed"]).tsp_options().tsp_attention_kv == "streamed"


def test_mlp_chunk_tokens_reaches_the_options_of_every_layout():
    assert load_recipe(None, []).tsp_options().mlp_chunk_tokens == 0  # untiled by default
    for layout in ("tsp", "dp", "tp", "tp_sp"):
        recipe = load_recipe(None, [f"parallel.layout={layout}", "parallel.mlp_chunk_tokens=4096"])
        assert recipe.tsp_options().mlp_chunk_tokens == 4096


def test_world_size_and_batch_checks():
    with pytest.raises(RecipeError, match=r"world size 3 does not fit the layout"):
        Recipe().check(world_size=3)
    with pytest.raises(RecipeError, match=r"train.global_batch_size = 4 must be a multiple of train.micro_batch_size \(2\) x data-parallel size \(4\)"):
        Recipe().check(world_size=8)


def test_help_lists_the_keys():
    text = parser().format_help()
    assert ("parallel.layout (default: tsp)\n" in text and "parallel.size (default: 2)\n" in text
            and "parallel.pipeline_size (default: 1)\n" in text and "--resume" in text)


@pytest.mark.parametrize("text,where", [
    ("model:\n  hidden_size: 64\n  num_layers: [2\ntrain:\n  steps: 3\n",
     "line 4, column 6: expected ',' or ']', but got ':' (while parsing a flow sequence started at line 3)"),
    ("model:\n  num_layers: 2\n hidden_size: 64\n", "line 3, column 2: expected <block end>, but found "
     "'<block mapping start>' (while parsing a block mapping started at line 1)"),
    ("\tmodel: {}\n", "line 1, column 1: found character '\\t' that cannot start any token"),
])
def test_malformed_yaml_is_one_line_naming_the_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path))
    assert str(e.value) == f"recipe file {str(path)!r} is not valid YAML: {where}"
    with pytest.raises(RecipeError, match=r"override 'model.num_layers=\[2': the value is not valid YAML \(line 1"):
        load_recipe(None, ["model.num_layers=[2"])
