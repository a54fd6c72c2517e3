"""Every bad configuration is one clear error naming the option at fault: the core says its recipe key
(parallel.size), pretrain_gpt.py's glue (apply_tsp_args) the flag (--tsp-size)."""

import argparse
import sys

import pytest
from megatron.core.transformer import TransformerConfig

import megatron_tsp
from megatron_tsp import TSPConfigError, tsp_transformer_config, validate_transformer_config
from megatron_tsp.megatron_lm.arguments import add_tsp_args, apply_tsp_args


def _config(D=2, **kw):
    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                tensor_model_parallel_size=D, sequence_parallel=D > 1, use_cpu_initialization=True,
                attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("kw,D,message", [
    (dict(num_attention_heads=6, tensor_model_parallel_size=1, sequence_parallel=False), 4,
     r"--num-attention-heads = 6 must be divisible by parallel.size = 4"),
    (dict(num_attention_heads=8, num_query_groups=2), 4,
     r"--num-query-groups = 2 must be divisible by parallel.size = 4"),
    (dict(ffn_hidden_size=66), 4, r"--ffn-hidden-size = 66 must be divisible by parallel.size = 4"),
    (dict(qk_layernorm=True), 2, r"--qk-layernorm"),
    (dict(attention_dropout=0.1), 2, r"--attention-dropout"),
    (dict(sequence_parallel=False), 2, r"sequence_parallel must be True"),
])
def test_transformer_config_errors(kw, D, message):
    if "sequence_parallel" not in kw:
        kw["sequence_parallel"] = True
    with pytest.raises(TSPConfigError, match=message):
        validate_transformer_config(_config(D, **kw), D)


def test_sequence_length_error():
    with pytest.raises(TSPConfigError, match=r"--seq-length = 30 must be divisible by 2 x parallel.size = 4"):
        validate_transformer_config(_config(2), 2, seq_length=30)


def test_tsp_transformer_config_refuses_native_tp_and_cp():
    with pytest.raises(TSPConfigError, match=r"--tensor-model-parallel-size = 2 cannot be combined with parallel.size"):
        tsp_transformer_config(2, num_layers=1, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=2)
    with pytest.raises(TSPConfigError, match=r"--context-parallel-size = 2 cannot be combined with parallel.size"):
        tsp_transformer_config(2, num_layers=1, hidden_size=32, num_attention_heads=4, context_parallel_size=2)
    config = tsp_transformer_config(2, num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                    attention_dropout=0.0)
    assert config.tensor_model_parallel_size == 2 and config.sequence_parallel


@pytest.mark.parametrize("kwargs,message", [
    (dict(tsp_size=3), r"world size 1 is not divisible by parallel.size \(3\) x --pipeline-model-parallel-size \(1\)"),
    (dict(tsp_size=1, pipeline_model_parallel_size=2), r"world size 1 is not divisible"),
    (dict(tsp_size=1, tensor_model_parallel_size=2), r"--tensor-model-parallel-size = 2 cannot be combined"),
    (dict(tsp_size=1, context_parallel_size=2), r"--context-parallel-size = 2 cannot be combined"),
    (dict(tsp_size=0), r"parallel.size must be a positive integer"),
])
def test_initialize_model_parallel_errors(kwargs, message):
    with pytest.raises(TSPConfigError, match=message):
        megatron_tsp.initialize_model_parallel(**kwargs)


def _parser():
    """A stand-in for Megatron's parser: the flags apply_tsp_args reads."""
    p = argparse.ArgumentParser()
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--num-attention-heads", type=int, default=32)
    p.add_argument("--group-query-attention", action="store_true")
    p.add_argument("--num-query-groups", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--reset-attention-mask", action="store_true")
    p.add_argument("--num-experts", type=int, default=None)
    return add_tsp_args(p)


def test_packed_sequences_pass_under_tsp_size():
    """--reset-attention-mask runs under --tsp-size (document ids from the EOD tokens; the runner's own
    refusals of combinations it cannot honour: tests/megatron_lm/test_arguments.py)."""
    args = apply_tsp_args(_parser().parse_args(["--tsp-size", "4", "--reset-attention-mask"]))
    assert args.tsp and args.reset_attention_mask


def test_tsp_size_maps_to_the_tp_slot():
    args = apply_tsp_args(_parser().parse_args(["--tsp-size", "4", "--group-query-attention", "--num-query-groups", "8"]))
    assert args.tsp and args.tensor_model_parallel_size == 4 and args.sequence_parallel
    plain = apply_tsp_args(_parser().parse_args([]))
    assert not plain.tsp and plain.tensor_model_parallel_size == 1 and not plain.sequence_parallel


@pytest.mark.parametrize("argv,message", [
    (["--tsp-size", "4", "--tensor-model-parallel-size", "2"], r"--tensor-model-parallel-size = 2 cannot be combined"),
    (["--tsp-size", "4", "--context-parallel-size", "2"], r"--context-parallel-size = 2 cannot be combined"),
    # MoE runs under --tsp-size; Megatron-LM's default dispatcher (allgather) gathers the sequence
    (["--tsp-size", "4", "--num-experts", "8"], r"--moe-token-dispatcher-type = 'allgather' \(Megatron-LM's default\)"),
    (["--tsp-size", "3", "--num-attention-heads", "32"], r"--num-attention-heads = 32 must be divisible by --tsp-size = 3"),
    (["--tsp-size", "4", "--group-query-attention", "--num-query-groups", "2"], r"--num-query-groups = 2"),
    (["--tsp-size", "4", "--seq-length", "4100"], r"--seq-length = 4100 must be divisible by 2 x --tsp-size = 8"),
])
def test_tsp_args_conflicts(argv, message):
    with pytest.raises(TSPConfigError, match=message):
        apply_tsp_args(_parser().parse_args(argv))


def test_one_core_check_in_each_front_ends_spelling(tmp_path, monkeypatch, capsys):
    """TSPOptions' check of parallel.mlp_chunk_tokens (the core names the recipe key and sets
    `option`) raised through each front end: the YAML recipe says the recipe key, every door of
    pretrain_gpt.py's glue (the parser, the model builder, the runner) says its flag."""
    from megatron_tsp import TSPOptions
    from megatron_tsp.megatron_lm import build, hooks, run
    from megatron_tsp.megatron_lm.arguments import TSP_FLAGS, in_flags, install_tsp_parsing
    from megatron_tsp.training.recipe import RecipeError, load_recipe

    key, flag = "parallel.mlp_chunk_tokens", "--tsp-mlp-chunk-tokens"
    why = " must be a non-negative integer (0: untiled), got -4"
    with pytest.raises(TSPConfigError) as core:
        TSPOptions(mlp_chunk_tokens=-4)
    assert str(core.value) == key + why and core.value.option == key

    with pytest.raises(RecipeError) as recipe:
        load_recipe(None, [f"{key}=-4"], devices=False)
    assert str(recipe.value) == key + why and recipe.value.option == key

    with pytest.raises(TSPConfigError) as parsed:
        apply_tsp_args(_parser().parse_args(["--tsp-size", "2", flag, "-4"]))
    assert str(parsed.value) == flag + why and parsed.value.option == key and parsed.value.flag == flag
    with pytest.raises(SystemExit) as exit_:
        install_tsp_parsing(_parser()).parse_args(["--tsp-size", "2", flag, "-4"])
    assert exit_.value.code == 2 and capsys.readouterr().err.endswith(f"error: {flag}{why}\n")

    bad = argparse.Namespace(tsp=True, tsp_size=2, tsp_native_spec="megatron", tsp_mlp_chunk_tokens=-4)
    with pytest.raises(TSPConfigError) as built:  # the builder checks what reached it before building
        build.build_gpt_model(bad, None, {})
    assert str(built.value) == flag + why

    script = tmp_path / "pretrain_gpt.py"  # a core error at run time (in the model, say): the runner's line
    script.write_text("from megatron_tsp import TSPOptions\nTSPOptions(mlp_chunk_tokens=-4)\n")
    monkeypatch.setattr(hooks, "install", lambda: None)
    path = list(sys.path)
    try:
        assert run.main([str(script)]) == 2
    finally:
        sys.path[:] = path
    assert capsys.readouterr().err == f"megatron_tsp.megatron_lm.run: error: {flag}{why}\n"

    # every key the mapping knows is a flag pretrain_gpt.py declares; a key without one stays a key
    declared = {a for action in _parser()._actions for a in action.option_strings}
    assert set(TSP_FLAGS.values()) <= declared and TSP_FLAGS["parallel.size"] == "--tsp-size"
    e = in_flags(TSPConfigError("parallel.tsp_compute_only = true with parallel.size = 2", option="parallel.size"))
    assert str(e) == "parallel.tsp_compute_only = true with --tsp-size = 2" and e.flag == "--tsp-size"
