"""Megatron-LM integration without Megatron-LM: the TSP flags on a plain argparse parser (mapping,
conflicts, recipes), the runner's usage errors, the model builder's delegation, the patch files
and every shell script's syntax."""

import argparse
import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest

from megatron_tsp import TSPConfigError
from megatron_tsp.megatron_lm.arguments import expand_tsp_recipe, load_flag_recipe, tsp_options_from_args
from megatron_tsp.megatron_lm.hooks import SUPPORTED_TAGS, check_built_model, tsp_extra_args_provider, tsp_gpt_builder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _megatron_like_parser():
    """The Megatron flags the mapping reads, then the TSP ones as Megatron-LM gets them."""
    p = argparse.ArgumentParser(prog="pretrain_gpt.py")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--num-attention-heads", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    p.add_argument("--moe-token-dispatcher-type", default="allgather")  # Megatron-LM's default
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    p.add_argument("--moe-shared-expert-gate", action="store_true")
    p.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--reset-attention-mask", action="store_true")
    p.add_argument("--reset-position-ids", action="store_true")
    p.add_argument("--eod-mask-loss", action="store_true")
    p.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                   dest="create_attention_mask_in_dataloader")
    p.add_argument("--allow-ambiguous-pad-tokens", action="store_true")
    p.add_argument("--dataloader-inter-document-masking", action="store_true")  # core_v0.19
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion")
    p.add_argument("--sft", action="store_true")
    p.add_argument("--yaml-cfg", default=None)
    p.add_argument("--spec", nargs="*", default=None)
    p.add_argument("--mtp-num-layers", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--data-path", nargs="*", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--use-precision-aware-optimizer", action="store_true")
    p.add_argument("--optimizer-cpu-offload", action="store_true")
    p.add_argument("--optimizer-offload-fraction", type=float, default=1.0)
    return tsp_extra_args_provider()(p)


def test_tsp_size_maps_at_parse_time():
    args = _megatron_like_parser().parse_args(["--tsp-size", "4"])
    assert args.tsp and args.tsp_size == 4
    assert args.tensor_model_parallel_size == 4 and args.sequence_parallel
    assert args.tsp_native_spec == "megatron" and args.tsp_recipe is None


@pytest.mark.parametrize("argv", [[], ["--tsp-size", "1"]])
def test_without_tsp_the_arguments_are_megatrons(argv):
    args = _megatron_like_parser().parse_args(argv + ["--tensor-model-parallel-size", "4", "--sequence-parallel"])
    assert not args.tsp and args.tensor_model_parallel_size == 4 and args.sequence_parallel


def test_megatron_optimizer_cpu_offload_passes_through():
    """Megatron-LM's own optimizer offload (issue 26 item 3) with the TSP model: not refused, untouched."""
    args = _megatron_like_parser().parse_args(["--tsp-size", "4", "--bf16", "--use-distributed-optimizer",
                                               "--use-precision-aware-optimizer", "--optimizer-cpu-offload",
                                               "--optimizer-offload-fraction", "0.5"])
    assert args.tsp_size == 4 and args.optimizer_cpu_offload and args.use_precision_aware_optimizer
    assert args.use_distributed_optimizer and args.optimizer_offload_fraction == 0.5


def test_parse_known_args_maps_too():
    args, extra = _megatron_like_parser().parse_known_args(["--tsp-size", "2", "--unknown-flag"])
    assert args.tensor_model_parallel_size == 2 and extra == ["--unknown-flag"]


MOE = ["--tsp-size", "2", "--disable-bias-linear", "--num-experts", "8", "--expert-model-parallel-size", "2",
       "--moe-token-dispatcher-type", "alltoall"]


@pytest.mark.parametrize("ep", ["2", "4"])
def test_moe_maps_at_parse_time(ep, monkeypatch):
    """EP = D (the expert group is the TSP group) or D x k; expert TP set to 1 (Megatron-LM would
    default it to the TP size, i.e. D: its all-gather would gather tokens)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = _megatron_like_parser().parse_args(["--tsp-size", "2", "--num-experts", "8", "--expert-model-parallel-size",
                                               ep, "--moe-token-dispatcher-type", "alltoall"])
    assert args.tsp and args.tensor_model_parallel_size == 2 and args.sequence_parallel
    assert args.expert_tensor_parallel_size == 1 and args.expert_model_parallel_size == int(ep)


def test_gated_shared_expert_is_accepted(monkeypatch):
    """--moe-shared-expert-gate (Qwen2-MoE) runs under TSP (tests/tsp/test_moe_native.py): the
    flag passes through to Megatron's config as Megatron-LM parsed it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = _megatron_like_parser().parse_args(MOE + ["--moe-shared-expert-intermediate-size", "32",
                                                     "--moe-shared-expert-gate"])
    assert args.tsp and args.moe_shared_expert_gate and args.moe_shared_expert_intermediate_size == 32


def test_moe_expert_parallel_must_fit_the_world(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        _megatron_like_parser().parse_args(MOE[:6] + ["4", "--moe-token-dispatcher-type", "alltoall"])
    assert "--expert-model-parallel-size = 4 does not fit the world: the 2 ranks" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--tsp-size", "4", "--tensor-model-parallel-size", "4"], r"--tensor-model-parallel-size = 4 cannot be combined with --tsp-size"),
    (["--tsp-size", "4", "--context-parallel-size", "2"], r"--context-parallel-size = 2 cannot be combined"),
    (["--tsp-size", "4", "--num-experts", "8"], r"--moe-token-dispatcher-type = 'allgather' \(Megatron-LM's default\)"
                                                r".*whole sequence; pass --moe-token-dispatcher-type alltoall"),
    (MOE[:3] + ["--num-experts", "8", "--moe-token-dispatcher-type", "flex"], r"--moe-token-dispatcher-type = 'flex'"),
    (MOE + ["--expert-tensor-parallel-size", "2"], r"--expert-tensor-parallel-size = 2 cannot be combined"),
    (MOE[:3] + ["--num-experts", "8", "--expert-model-parallel-size", "3", "--moe-token-dispatcher-type", "alltoall"],
     r"--expert-model-parallel-size = 3 must be --tsp-size = 2 or a multiple"),
    (MOE[:3] + ["--num-experts", "6", "--expert-model-parallel-size", "4", "--moe-token-dispatcher-type", "alltoall"],
     r"--num-experts = 6 must be divisible by --expert-model-parallel-size = 4"),
    (MOE + ["--moe-shared-expert-intermediate-size", "33"], r"--moe-shared-expert-intermediate-size = 33"),
    (MOE + ["--moe-shared-expert-gate"], r"--moe-shared-expert-gate gates the shared expert: it needs "
                                         r"--moe-shared-expert-intermediate-size"),
    (MOE + ["--moe-router-topk", "9"], r"--moe-router-topk = 9 must be between 1 and --num-experts = 8"),
    (["--tsp-size", "2", "--expert-model-parallel-size", "2"], r"--expert-model-parallel-size = 2 needs --num-experts"),
    (["--tsp-size", "4", "--reset-attention-mask", "--pipeline-model-parallel-size", "2"],
     r"--reset-attention-mask cannot be combined with --tsp-size and --pipeline-model-parallel-size = 2: the "
     r"document ids come from the tokens"),
    (["--tsp-size", "4", "--reset-attention-mask", "--tsp-attention-backend", "flash"],
     r"--reset-attention-mask cannot run on --tsp-attention-backend flash \(no document mask"),
    (["--tsp-size", "4", "--reset-attention-mask", "--allow-ambiguous-pad-tokens"],
     r"--allow-ambiguous-pad-tokens cannot be combined with --reset-attention-mask under --tsp-size"),
    (["--tsp-size", "4", "--dataloader-inter-document-masking"],
     r"--dataloader-inter-document-masking \(THD, cu_seqlens\) cannot be combined with --tsp-size: use "
     r"--reset-attention-mask"),
    (["--tsp-native-spec", "sdpa", "--reset-attention-mask", "--pipeline-model-parallel-size", "2"],
     r"--reset-attention-mask cannot be combined with --tsp-native-spec sdpa and --pipeline-model-parallel-size"),
    (["--tsp-native-spec", "sp_norm", "--reset-attention-mask"],
     r"--reset-attention-mask with --tsp-native-spec sp_norm needs --no-masked-softmax-fusion: Megatron's fused "
     r"causal softmax ignores the dataset's mask"),
    (["--tsp-size", "4", "--sft"], r"--sft \(packed sequences"),
    (["--tsp-size", "4", "--yaml-cfg", "x.yaml"], r"--yaml-cfg cannot be combined with --tsp-size"),
    (["--tsp-size", "4", "--spec", "m", "f"], r"--spec cannot be combined with --tsp-size"),
    (["--tsp-size", "4", "--mtp-num-layers", "1"], r"--mtp-num-layers cannot be combined"),
    (["--tsp-size", "4", "--seq-length", "100"], r"--seq-length = 100 must be divisible by 2 x --tsp-size = 8"),
    (["--tsp-size", "3"], r"--num-attention-heads = 32 must be divisible by --tsp-size = 3"),
    (["--tsp-size", "0"], r"--tsp-size must be a positive integer"),
    (["--tsp-size", "2", "--tsp-lm-head-chunk-tokens", "0"], r"--tsp-lm-head-chunk-tokens must be a positive integer"),
    (["--tsp-size", "2", "--tsp-mlp-chunk-tokens", "-4"], r"--tsp-mlp-chunk-tokens must be a non-negative integer"),
    (["--tsp-mlp-chunk-tokens", "4096"], r"--tsp-mlp-chunk-tokens needs the plugin's model"),
    (["--tsp-attention-kv", "streamed"], r"--tsp-attention-kv streamed needs --tsp-size > 1"),
])
def test_conflicts_are_one_error_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _megatron_like_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"^pretrain_gpt.py: error: .*" + message, err, re.M), err
    assert err.count("\n") == 1, "one line, not Megatron's whole usage"


def test_packed_documents_pass_through_and_drop_the_dataset_mask():
    """Megatron's packed-sequence flags under --tsp-size (issue 27): kept as given (the dataset
    restarts the positions and masks the EOD loss; the model reads the documents from the EOD
    tokens), the dataset's [b, 1, S, S] mask turned off."""
    packed = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
    args = _megatron_like_parser().parse_args(["--tsp-size", "2"] + packed)
    assert args.reset_attention_mask and args.reset_position_ids and args.eod_mask_loss
    assert args.create_attention_mask_in_dataloader is False
    for backend in ("auto", "math", "math_split", "flex"):
        _megatron_like_parser().parse_args(["--tsp-size", "2", "--tsp-attention-backend", backend] + packed)
    # the mask is never read by TSP attention: off for unpacked runs too; --pipeline-model-parallel-size
    # and --allow-ambiguous-pad-tokens only matter with the document mask
    args = _megatron_like_parser().parse_args(["--tsp-size", "2", "--reset-position-ids", "--allow-ambiguous-pad-tokens",
                                               "--pipeline-model-parallel-size", "2"])
    assert args.create_attention_mask_in_dataloader is False and not args.reset_attention_mask
    # the TP + SP baselines: SDPA (the plugin's spec) reads the ids too, so no mask; Megatron's own
    # attention (its spec, or the local one with sequence-parallel norms) applies the dataset's
    tp_sp = packed + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    args = _megatron_like_parser().parse_args(["--tsp-native-spec", "sdpa"] + tp_sp)
    assert args.create_attention_mask_in_dataloader is False and args.reset_attention_mask
    for argv in ([], ["--tsp-size", "1"], ["--tsp-native-spec", "sp_norm", "--no-masked-softmax-fusion"]):
        args = _megatron_like_parser().parse_args(argv + tp_sp)
        assert args.create_attention_mask_in_dataloader is True and args.reset_attention_mask


def test_packed_documents_take_the_tokenizers_eod():
    import numpy

    from megatron_tsp.megatron_lm.build import tokenizer_eod_id

    args = argparse.Namespace(tokenizer_type="NullTokenizer")
    assert tokenizer_eod_id(args, 128, argparse.Namespace(eod=127)) == 127
    assert tokenizer_eod_id(args, 128, argparse.Namespace(eod=numpy.int64(0))) == 0
    for eod in (128, -1, None, 3.0):
        with pytest.raises(TSPConfigError, match=rf"--reset-attention-mask: the tokenizer's EOD id {eod!r} "
                                                 r"\(--tokenizer-type NullTokenizer\) is outside the vocabulary "
                                                 r"\[0, 128\)"):
            tokenizer_eod_id(args, 128, argparse.Namespace(eod=eod))

    class NoEOD:
        @property
        def eod(self):
            raise NotImplementedError

    with pytest.raises(TSPConfigError, match=r"the tokenizer \(--tokenizer-type NullTokenizer\) has no EOD token"):
        tokenizer_eod_id(args, 128, NoEOD())


def test_native_spec_choices(capsys):
    assert _megatron_like_parser().parse_args(["--tsp-native-spec", "sdpa"]).tsp_native_spec == "sdpa"
    with pytest.raises(SystemExit):
        _megatron_like_parser().parse_args(["--tsp-native-spec", "te"])
    assert "--tsp-native-spec" in capsys.readouterr().err


def test_help_lists_the_tsp_flags(capsys):
    with pytest.raises(SystemExit):
        _megatron_like_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--tsp-size", "--tsp-recipe", "--tsp-native-spec", "--tsp-lm-head", "--tsp-lm-head-chunk-tokens",
                 "--tsp-mlp-chunk-tokens", "--tsp-attention-kv"):
        assert flag in out


def test_flags_are_added_once():
    parser = _megatron_like_parser()
    assert tsp_extra_args_provider()(parser) is parser  # runner on a patched script: no clash
    assert parser.parse_args(["--tsp-size", "2"]).tensor_model_parallel_size == 2


# -- recipes --------------------------------------------------------------------------------

def _recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_recipe_expands_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_PREFIX", "/data/x")
    monkeypatch.setenv("ALREADY_SET", "mine")
    monkeypatch.delenv("TSP_TEST_NEW", raising=False)
    path = _recipe(tmp_path, """\
        ENV_VARS:
          TSP_TEST_NEW: 1
          ALREADY_SET: recipe
        MODEL_ARGS:
          --tsp-size: 4
          --lr: 3.0e-4
          --bf16: true
          --sequence-parallel: false
          --data-path: [1, "${DATA_PREFIX}_a"]
        """)
    argv, env = expand_tsp_recipe(["--lr", "1e-3", "--tsp-recipe", path, "--seq-length", "64"])
    assert argv == ["--tsp-size", "4", "--bf16", "--data-path", "1", "/data/x_a", "--lr", "1e-3", "--seq-length", "64"]
    assert env == {"TSP_TEST_NEW": "1", "ALREADY_SET": "recipe"}
    args = _megatron_like_parser().parse_args([f"--tsp-recipe={path}", "--tsp-size", "2", "--seq-length", "64"])
    assert args.tsp_size == 2 and args.tensor_model_parallel_size == 2 and args.lr == 3e-4 and args.bf16
    assert args.data_path == ["1", "/data/x_a"] and args.sequence_parallel  # false in the recipe: left out; TSP sets it
    assert args.tsp_recipe == path
    assert os.environ["TSP_TEST_NEW"] == "1" and os.environ["ALREADY_SET"] == "mine"


@pytest.mark.parametrize("text,message", [
    ("MODEL_ARGS: [1]\n", r"expected a mapping with a MODEL_ARGS"),
    ("MODEL_ARGS:\n  --lr: 1\nOTHER: 1\n", r"unknown section\(s\) OTHER"),
    ("MODEL_ARGS:\n  lr: 1\n", r"'MODEL_ARGS lr' is not a flag"),
    ("MODEL_ARGS:\n  --lr: {a: 1}\n", r"MODEL_ARGS --lr is a mapping"),
    ("MODEL_ARGS:\n  --tsp-recipe: x.yaml\n", r"cannot include another"),
    ("MODEL_ARGS:\n  --data-path: ${TSP_TEST_UNSET}\n", r"MODEL_ARGS --data-path uses \$\{TSP_TEST_UNSET\}, which is not set"),
    ("MODEL_ARGS: {--lr: 1\n", r"not valid YAML"),
])
def test_bad_recipes_name_the_flag_and_key(tmp_path, text, message, monkeypatch):
    monkeypatch.delenv("TSP_TEST_UNSET", raising=False)
    path = _recipe(tmp_path, text)
    with pytest.raises(TSPConfigError, match=r"--tsp-recipe .*" + message):
        load_flag_recipe(path)


def test_recipe_usage_errors(tmp_path, capsys):
    with pytest.raises(TSPConfigError, match=r"--tsp-recipe .*missing.yaml: cannot read it"):
        expand_tsp_recipe(["--tsp-recipe", str(tmp_path / "missing.yaml")])
    with pytest.raises(TSPConfigError, match=r"--tsp-recipe takes exactly one FILE"):
        expand_tsp_recipe(["--tsp-recipe"])
    path = _recipe(tmp_path, "MODEL_ARGS:\n  --lr: 1\n")
    with pytest.raises(TSPConfigError, match=r"--tsp-recipe is given more than once"):
        expand_tsp_recipe(["--tsp-recipe", path, "--tsp-recipe", path])
    with pytest.raises(SystemExit):  # through the parser: one error line
        _megatron_like_parser().parse_args(["--tsp-recipe", str(tmp_path / "missing.yaml")])
    assert "error: --tsp-recipe" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "megatron_lm", "*.yaml"))))
def test_shipped_recipes_parse_and_map(path):
    flags, env = load_flag_recipe(path)
    assert env.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1"
    for flag in ("--transformer-impl", "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--mock-data"):
        assert flag in flags, f"{path}: {flag} (runs without Transformer Engine / apex)"
    p = argparse.ArgumentParser(prog="pretrain_gpt.py")
    for flag, values in flags.items():  # every flag as Megatron declares it: bare or with values
        if flag.startswith("--tsp-"):
            continue
        if flag in ("--num-attention-heads", "--seq-length"):  # read as ints by the mapping
            p.add_argument(flag, type=int)
        elif values:
            p.add_argument(flag, nargs="*")
        else:
            p.add_argument(flag, action="store_true")
    args = tsp_extra_args_provider()(p).parse_args(["--tsp-recipe", path])
    D = int(flags["--tsp-size"][0])
    assert args.tsp and args.tensor_model_parallel_size == D and args.sequence_parallel


# -- runner, builder -------------------------------------------------------------------------

def _run(capsys, *argv):
    from megatron_tsp.megatron_lm.run import main

    path = list(sys.path)
    try:
        rc = main(list(argv))
    finally:
        sys.path[:] = path
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_runner_usage_errors(tmp_path, capsys):
    rc, _, err = _run(capsys)
    assert rc == 2 and "usage: python -m megatron_tsp.megatron_lm.run" in err
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and "--tsp-size" in out
    rc, _, err = _run(capsys, "--tsp-size", "2")
    assert rc == 2 and "must be Megatron-LM's pretrain_gpt.py" in err
    rc, _, err = _run(capsys, str(tmp_path / "pretrain_gpt.py"))
    assert rc == 2 and "no such file" in err
    (tmp_path / "pretrain_gpt.py").write_text("raise SystemExit('must not run')\n")
    rc, _, err = _run(capsys, str(tmp_path / "pretrain_gpt.py"))
    assert rc == 2 and "Megatron-LM (gpt_builders.py, megatron/training) cannot be imported" in err, err
    assert "core_v0.16.1, core_v0.17.1, core_v0.18.2, core_v0.19.0" in err


def test_runner_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "megatron_tsp.megatron_lm.run"], capture_output=True, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert result.returncode == 2 and "usage: python -m megatron_tsp.megatron_lm.run" in result.stderr


def test_builder_delegates_without_tsp():
    calls = []

    def megatron_builder(*args, **kwargs):
        calls.append((args, kwargs))
        return "megatron's model"

    args = argparse.Namespace(tsp=False, tsp_native_spec="megatron")
    assert tsp_gpt_builder(megatron_builder)(args, True, False, 1, config="c", pg_collection="pg") == "megatron's model"
    assert calls == [((args, True, False, 1), {"config": "c", "pg_collection": "pg"})]


@pytest.mark.parametrize("name,flag", [("num_experts", "--num-experts"), ("spec", "--spec"), ("use_legacy_models", "--use-legacy-models")])
def test_builder_refuses_megatron_specs(name, flag):
    args = argparse.Namespace(tsp=False, tsp_native_spec="sdpa", **{name: 8 if name == "num_experts" else True})
    with pytest.raises(TSPConfigError, match=f"{flag} cannot be combined with --tsp-native-spec sdpa"):
        tsp_gpt_builder(lambda *a, **k: None)(args, True, True)


def test_builder_lets_the_tsp_model_run_experts(monkeypatch):
    """--num-experts reaches the TSP model through the builder hook (core_v0.16-0.18) and the
    model-builder path (build_gpt_model); the native specs still refuse it."""
    from megatron_tsp.megatron_lm import hooks
    from megatron_tsp.megatron_lm.build import _check_builder_args

    monkeypatch.setattr(hooks, "build_gpt_model", lambda args, config, kwargs: "the TSP model")
    monkeypatch.setattr(hooks, "_model_kwargs", lambda *a: {})
    args = argparse.Namespace(tsp=True, tsp_size=2, tsp_native_spec="sdpa", num_experts=8)
    assert tsp_gpt_builder(lambda *a, **k: None)(args, True, True, config="c") == "the TSP model"
    _check_builder_args(args, "--tsp-size", tsp=True)
    with pytest.raises(TSPConfigError, match="--num-experts cannot be combined with --tsp-native-spec sdpa"):
        _check_builder_args(args, "--tsp-native-spec sdpa")


# -- patches and scripts ------------------------------------------------------------------------

def _bare(cls):
    """An instance of the nn.Module subclass `cls` without running its __init__."""
    import torch

    obj = cls.__new__(cls)
    torch.nn.Module.__init__(obj)
    return obj


def _gpt_like(model_cls, attention_cls, core_attention_cls=None):
    import torch

    model, layer, attention = _bare(model_cls), torch.nn.Module(), _bare(attention_cls)
    if core_attention_cls is not None:
        attention.core_attention = _bare(core_attention_cls)
    layer.self_attention = attention
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([layer, layer])
    return model


def test_the_built_model_must_be_the_one_the_flags_ask_for():
    """check_built_model: the runner's last line of defence against a pretrain_gpt.py whose
    model path bypasses the TSP builder (Megatron's own model under --tsp-size)."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.attention import SelfAttention

    from megatron_tsp.tsp.attention import TSPSelfAttention
    from megatron_tsp.tsp.model import TSPGPTModel
    from megatron_tsp.baselines.sdpa_attention import SDPACoreAttention

    tsp = argparse.Namespace(tsp=True, tsp_size=2, tsp_native_spec="megatron")
    check_built_model(tsp, [_gpt_like(TSPGPTModel, TSPSelfAttention)])
    for model in (_gpt_like(GPTModel, SelfAttention), _gpt_like(TSPGPTModel, SelfAttention)):
        with pytest.raises(TSPConfigError, match=r"--tsp-size 2 asks for megatron_tsp's TSPGPTModel .* built "
                                                 r"(TSP)?GPTModel \(attention SelfAttention\): its model path bypasses"):
            check_built_model(tsp, [model])
    wrapped = torch.nn.Module()
    wrapped.module = _gpt_like(GPTModel, SelfAttention)  # as DDP / Float16Module hold it
    with pytest.raises(TSPConfigError, match="built GPTModel"):
        check_built_model(tsp, [wrapped])
    sdpa = argparse.Namespace(tsp=False, tsp_size=1, tsp_native_spec="sdpa")
    check_built_model(sdpa, [_gpt_like(GPTModel, SelfAttention, SDPACoreAttention)])
    with pytest.raises(TSPConfigError, match="--tsp-native-spec sdpa asks for SDPA core attention"):
        check_built_model(sdpa, [_gpt_like(GPTModel, SelfAttention, torch.nn.Identity)])
    check_built_model(argparse.Namespace(tsp=False, tsp_native_spec="megatron"), [_gpt_like(GPTModel, SelfAttention)])


# -- patches and scripts ------------------------------------------------------------------------

def test_patches_are_well_formed():
    tags = sorted(d for d in os.listdir(os.path.join(REPO, "patches")) if os.path.isdir(os.path.join(REPO, "patches", d)))
    assert tags == sorted(SUPPORTED_TAGS)
    assert not glob.glob(os.path.join(REPO, "patches", "*.patch")), "every patch belongs to one tag's folder"
    for tag in tags:
        folder = os.path.join(REPO, "patches", tag)
        assert open(os.path.join(folder, "COMMIT")).read().strip() == SUPPORTED_TAGS[tag]
        pinned = dict(line.split()[::-1] for line in open(os.path.join(folder, "pinned.sha256")) if line.strip())
        assert "pretrain_gpt.py" in pinned and "gpt_builders.py" in pinned
        patches = sorted(glob.glob(os.path.join(folder, "*.patch")))
        assert patches
        for path in patches:
            text = open(path).read()
            assert f"{tag} (commit {SUPPORTED_TAGS[tag]})" in text.split("diff --git", 1)[0], f"{path}: its header names the tag's commit"
            files = re.findall(r"^\+\+\+ b/(\S+)$", text, re.M)
            assert files and all(f in pinned for f in files), f"{path}: touches files not in pinned.sha256"
            hunks = re.split(r"^(@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@.*)$", text, flags=re.M)[1:]
            assert hunks
            for header, body in zip(hunks[::2], hunks[1::2]):
                old, new = (int(n) for n in re.match(r"@@ -\d+,(\d+) \+\d+,(\d+) @@", header).groups())
                lines = [line for line in body.split("\n") if line and not line.startswith(("diff --git", "index ", "--- ", "+++ "))]
                assert sum(not line.startswith("+") for line in lines) == old, f"{path}: {header}"
                assert sum(not line.startswith("-") for line in lines) == new, f"{path}: {header}"
            assert "megatron_tsp.megatron_lm import tsp_extra_args_provider" in text
            assert ("tsp_gpt_model_config_cls(args)" if tag >= "core_v0.19" else "tsp_gpt_builder(gpt_builder)") in text


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(REPO, "scripts", "**", "*.sh"), recursive=True)))
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_python_scripts_compile():
    for script in glob.glob(os.path.join(REPO, "scripts", "*.py")):
        compile(open(script).read(), script, "exec")


def test_compare_script_detects_a_loss_mismatch(tmp_path):
    """compare_tsp_vs_tpsp.py --from-logs on two synthetic Megatron logs: a 0.02 gap fails."""
    line = (" [2026-01-01 00:00:00] iteration {i:8d}/       2 | consumed samples: {i} | elapsed time per iteration (ms): "
            "{ms} | learning rate: 1.0E-03 | global batch size:     4 | lm loss: {loss:E} | loss scale: 1.0 |\n")
    head = "  global_batch_size ............................... 4\n  seq_length ...................................... 64\n  world_size ...................................... 2\n"
    for name, shift in (("tsp", 0.0), ("tp_sp", 0.02)):
        (tmp_path / f"{name}.log").write_text(head + "".join(line.format(i=i, ms=100.0, loss=5.0 - i + shift) for i in (1, 2))
                                              + "[Rank 0] (after 2 iterations) memory (MB) | allocated: 1.0 | max allocated: 2048.0 | reserved: 3\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("MODEL_ARGS:\n  --tsp-size: 2\n  --train-iters: 2\n")
    cmd = [sys.executable, os.path.join(REPO, "scripts", "compare_tsp_vs_tpsp.py"), "--from-logs", "--recipe", str(recipe), "--out", str(tmp_path)]
    failed = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert failed.returncode == 1 and "FAIL" in failed.stdout
    report = __import__("json").load(open(tmp_path / "compare.json"))
    assert abs(report["comparisons"][0]["max_abs_loss_diff"] - 0.02) < 1e-9
    assert report["runs"]["tsp"]["tokens_per_s_per_gpu"] == 4 * 64 / 0.1 / 2 and report["runs"]["tsp"]["peak_allocated_gb"] == 2.0
    passed = subprocess.run(cmd + ["--tolerance", "0.03"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert passed.returncode == 0 and "OK" in passed.stdout


def test_tsp_schedule_flags_reach_the_options(capsys):
    import argparse

    import pytest

    from megatron_tsp.megatron_lm.arguments import add_tsp_args, tsp_options_from_args

    parser = add_tsp_args(argparse.ArgumentParser(prog="pretrain_gpt.py"))
    args = parser.parse_args(["--tsp-size", "2", "--tsp-recompute", "full", "--tsp-attention-backend", "flash"])
    options = tsp_options_from_args(args)
    assert (options.tsp_recompute, options.tsp_attention_backend, options.tsp_compute_only) == ("full", "flash", False)
    assert tsp_options_from_args(parser.parse_args([])).tsp_recompute == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["--tsp-recompute", "some"])
    assert "--tsp-recompute" in capsys.readouterr().err


def test_mlp_chunk_tokens_serves_the_native_specs_too():
    args = _megatron_like_parser().parse_args(["--tsp-native-spec", "sdpa", "--tsp-mlp-chunk-tokens", "4096"])
    assert tsp_options_from_args(args).mlp_chunk_tokens == 4096
    assert _megatron_like_parser().parse_args(["--tsp-size", "2"]).tsp_mlp_chunk_tokens == 0  # untiled by default


def test_attention_kv_reaches_the_options():
    args = _megatron_like_parser().parse_args(["--tsp-size", "2", "--tsp-attention-kv", "streamed"])
    assert tsp_options_from_args(args).tsp_attention_kv == "streamed"
    assert _megatron_like_parser().parse_args(["--tsp-size", "2"]).tsp_attention_kv == "gathered"  # the default
