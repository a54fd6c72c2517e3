"""megatron-core version adapters (megatron_tsp.compat): both MLP spec styles build the TSP ring
MLP on the given group, the version check warns once outside the supported range and never
inside it, and importing the package prints no deprecation or version notice."""

import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch.distributed as dist
from megatron.core import package_info
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_tsp import TSPConfigError, TSPOptions, compat
from megatron_tsp.tsp.attention import TSPSelfAttention
from megatron_tsp.tsp.mlp import TSPMLP
from megatron_tsp.baselines.specs import get_sp_layer_spec
from megatron_tsp.tsp.specs import get_tsp_layer_spec
from tests.utils import init_tsp, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def group_and_pgs():
    """A group of its own (not Megatron's TP group object) in the layer's pg_collection.tp."""
    init_tsp(1)
    group = dist.new_group([0])
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.tp = group
    return group, pgs


def test_layer_spec_of_installed_megatron_builds_tsp_mlp_on_the_group(group_and_pgs):
    group, pgs = group_and_pgs
    config = tiny_config(1)
    options = TSPOptions(tsp_mlp_exchange="broadcast")
    spec = get_tsp_layer_spec(config, group, options)
    layer = build_module(spec, config=config, layer_number=1, pg_collection=pgs)
    assert type(layer.mlp) is TSPMLP and type(layer.self_attention) is TSPSelfAttention
    assert layer.mlp.tsp_group is group and layer.self_attention.tsp_group is group
    assert layer.mlp.tsp_options is options
    # The spec keeps the style of the installed local spec.
    native = get_sp_layer_spec(config).submodules.mlp
    assert isinstance(spec.submodules.mlp, ModuleSpec) == isinstance(native, ModuleSpec)


@pytest.mark.parametrize("style", ["modulespec", "callable"])
def test_both_mlp_spec_styles_build_tsp_mlp_on_the_group(style, group_and_pgs):
    """The style megatron-core <= 0.17 uses (ModuleSpec built with config only, the group in
    params) and the one 0.18+ uses (a callable given pg_collection), whichever is installed."""
    group, pgs = group_and_pgs
    config = tiny_config(1)
    submodules = compat.mlp_submodules(get_sp_layer_spec(config).submodules.mlp)
    options = TSPOptions()
    if style == "modulespec":
        local = ModuleSpec(module=MLP, submodules=submodules)
        entry = compat.mlp_spec(local, TSPMLP, compat.mlp_submodules(local), tp_group=group, tsp_options=options)
        assert isinstance(entry, ModuleSpec)
        mlp = build_module(entry, config=config)
    else:
        local = functools.partial(MLP.as_mlp_submodule if hasattr(MLP, "as_mlp_submodule") else MLP,
                                  submodules=submodules)
        assert compat.mlp_submodules(local) is submodules
        entry = compat.mlp_spec(local, TSPMLP, submodules, tp_group=None, tsp_options=options)
        assert not isinstance(entry, ModuleSpec)
        mlp = entry(config=config, pg_collection=pgs, is_mtp_layer=False, name="decoder.layers.0.mlp")
    assert type(mlp) is TSPMLP and mlp.tsp_group is group and mlp.tsp_options is options
    assert mlp.linear_fc1.weight.shape == (2 * config.ffn_hidden_size, config.hidden_size)


def test_callable_style_without_pg_collection_tp_uses_spec_group(group_and_pgs):
    group, _ = group_and_pgs
    config = tiny_config(1)
    submodules = compat.mlp_submodules(get_sp_layer_spec(config).submodules.mlp)
    mlp = TSPMLP.as_mlp_submodule(submodules, config, None, False, tp_group=group)
    assert mlp.tsp_group is group


# a local label (containers, source builds: "0.19.2+nv25.10", CI's "0.19.2+<commit>") is that release
@pytest.mark.parametrize("version", ["0.16.1", "0.17.1", "0.18.2", "0.19.0", "0.19.2", "0.19.2+aab28ff",
                                     "0.16.1+nv25.10"])
def test_supported_versions_do_not_warn(version, monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.check_megatron_version(version)
    assert not caught


def test_installed_version_is_supported_and_silent(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.check_megatron_version()
    assert not caught, [str(w.message) for w in caught]
    assert compat.OLDEST <= compat.Version(compat.Version(package_info.__version__).public) <= compat.NEWEST


@pytest.mark.parametrize("version, side", [("0.20.0", "newer"), ("0.19.3", "newer"), ("0.19.3+aab28ff", "newer"),
                                           ("0.16.0", "older")])
def test_version_outside_range_warns_once(version, side, monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not compat.check_megatron_version(version)
        assert not compat.check_megatron_version(version)
        assert not compat.check_megatron_version("1.0.0")
    assert len(caught) == 1 and caught[0].category is compat.MegatronCoreVersionWarning
    message = str(caught[0].message)
    assert f"megatron-core {version} is {side}" in message and "0.16.1 <= megatron-core <= 0.19.2" in message


def test_config_defaults_build_a_config_without_warnings():
    """Our configs set the CUDA-graph scope to the whole layer as a list, not Megatron's own
    deprecated default "full" (which warns in every supported version); a caller's value wins."""
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=32, num_attention_heads=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = TransformerConfig(**compat.transformer_config_defaults(**kwargs))
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]
    field = compat._CUDA_GRAPH_FIELD
    assert field is not None and getattr(config, field) == []
    assert compat.transformer_config_defaults(**{field: ["attn"]})[field] == ["attn"]


def test_mismatched_spec_group_is_an_error():
    """The callable style refuses a spec group that is not the layer's pg_collection.tp (the
    group attention runs on); compared by ranks, so only a fake group can differ at world 1."""

    class OtherRanks:
        pass

    config = tiny_config(1)
    init_tsp(1)
    submodules = compat.mlp_submodules(get_sp_layer_spec(config).submodules.mlp)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    real_ranks = dist.get_process_group_ranks

    def ranks(group):
        return [7] if isinstance(group, OtherRanks) else real_ranks(group)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "get_process_group_ranks", ranks)
        with pytest.raises(TSPConfigError, match=r"spec names group ranks \[7\] but the layer's pg_collection.tp"):
            TSPMLP.as_mlp_submodule(submodules, config, pgs, False, tp_group=OtherRanks())


def test_import_prints_no_deprecation_or_version_notice():
    """`import megatron_tsp; import megatron_tsp.tsp.model` and building a TSPGPTModel print nothing
    about deprecation or versions (megatron-core 0.19 logs a GPTModel deprecation: silenced for
    TSPGPTModel only, so a plain GPTModel built next still logs it where the version does)."""
    script = (
        "import sys, megatron_tsp, megatron_tsp.tsp.model\n"
        "from megatron_tsp.training.build import ModelShape, build_gpt\n"
        "from tests.utils import init_tsp\n"
        "import torch.distributed as dist, tempfile\n"
        "from megatron_tsp.training.cpu import install_cpu_shims\n"
        "install_cpu_shims()\n"
        "dist.init_process_group('gloo', init_method='file://' + tempfile.mktemp(), rank=0, world_size=1)\n"
        "pgs = init_tsp(1)\n"
        "build_gpt(ModelShape(seq_length=32), layout='tsp', pg_collection=pgs)\n"
        "print('@@native', file=sys.stderr, flush=True)\n"
        "build_gpt(ModelShape(seq_length=32), layout='tp_sp', pg_collection=pgs)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    tsp_part, native_part = result.stderr.split("@@native")
    for text in (result.stdout, tsp_part):
        lowered = text.lower()
        assert "deprecat" not in lowered and "megatron-tsp is tested on" not in lowered, text[-3000:]
    # The filter is narrow: Megatron's own GPTModel keeps its notice where the version logs one.
    logs_notice = "GPTModel IS DEPRECATED" in open(sys.modules["megatron.core.models.gpt.gpt_model"].__file__).read()
    assert native_part.count("GPTModel IS DEPRECATED") == int(logs_notice), native_part[-3000:]


def test_ci_tests_both_ends_of_the_range():
    """.ci/run installs exactly the oldest and the newest supported megatron-core."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert f'"$PY312" {compat.NEWEST}' in ci and f'"$PY311" {compat.OLDEST}' in ci
