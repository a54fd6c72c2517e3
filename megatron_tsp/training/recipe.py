"""Training recipes: YAML files in `configs/` plus `key=value` overrides.

A recipe has four sections, each a dataclass whose fields document themselves:
`model` (ModelShape), `parallel`, `train`, `data`. Unknown keys, wrong types and impossible
layouts raise one `RecipeError` that names the key and lists what is valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ..config import (CP_COMM_TYPES, LAYER_RECOMPUTE, NORMALIZATIONS, RECOMPUTE_METHODS, DataRecipe,  # noqa: F401
                      ModelRecipe, ModelShape, ParallelRecipe, TrainRecipe, TSPConfigError, TSPOptions,
                      check_seq_length, read_yaml_file, tsp_options_from, yaml_problem)
from ..layouts import GroupSizes, ParallelLayout, get_layout, names

LAYOUTS = names()  # parallel.layout's values: megatron_tsp.layouts
DTYPES = ("float32", "bfloat16")


class RecipeError(TSPConfigError):
    """A recipe or override that cannot run."""


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- validation -----------------------------------------------------------------------
    def check(self, world_size: Optional[int] = None, devices: bool = True) -> "Recipe":
        """Every check of the recipe, torch-free except `devices` (whether this machine has GPUs, for
        the GPU-only options): the launcher runs it with devices=False before any worker starts."""
        m, p, t = self.model, self.parallel, self.train
        lay = self.layout()
        if p.baseline_attention not in ("sdpa", "local"):
            raise RecipeError(f"parallel.baseline_attention = {p.baseline_attention!r} is not one of sdpa, local")
        try:
            self.tsp_options()
        except TSPConfigError as e:  # the core names the recipe keys (parallel.tsp_*) already
            raise RecipeError(str(e), option=e.option) from None
        if p.tsp_lm_head == "local" and not lay.uses_tsp:
            raise RecipeError(f"parallel.tsp_lm_head = local needs parallel.layout = {_tsp_layouts()} (got "
                              f"{p.layout}): the baselines run Megatron's LM head (leave it null or set megatron)")
        if p.tsp_attention_kv == "streamed" and not lay.uses_tsp:
            raise RecipeError(f"parallel.tsp_attention_kv = streamed needs parallel.layout = {_tsp_layouts()} (got "
                              f"{p.layout}): the baselines run Megatron's attention")
        if m.dtype not in DTYPES:
            raise RecipeError(f"model.dtype = {m.dtype!r} is not one of {', '.join(DTYPES)}")
        if m.normalization not in NORMALIZATIONS:
            raise RecipeError(f"model.normalization = {m.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if m.position_embedding_type not in ("rope", "learned_absolute"):
            raise RecipeError(f"model.position_embedding_type = {m.position_embedding_type!r} is not one of rope, learned_absolute")
        for key in ("steps", "micro_batch_size", "global_batch_size"):
            if getattr(t, key) < 1:
                raise RecipeError(f"train.{key} = {getattr(t, key)} must be >= 1")
        for key in ("size", "pipeline_size", "context_size"):
            if getattr(p, key) < 1:
                raise RecipeError(f"parallel.{key} = {getattr(p, key)} must be >= 1")
        cp = p.context_size
        if not lay.context_parallel and (cp > 1 or p.fsdp):
            key = "parallel.context_size = %d" % cp if cp > 1 else "parallel.fsdp = true"
            raise RecipeError(f"{key} cannot be combined with parallel.layout = {p.layout}: {lay.why_no_context} "
                              f"(context_size and fsdp are for the baselines "
                              f"{', '.join(names(lambda r: r.context_parallel))})")
        if p.cp_comm_type not in CP_COMM_TYPES:
            raise RecipeError(f"parallel.cp_comm_type = {p.cp_comm_type!r} is not one of {', '.join(CP_COMM_TYPES)}")
        if p.cp_comm_type == "p2p" and cp == 1:
            raise RecipeError("parallel.cp_comm_type = p2p (ring attention over the context-parallel group) needs "
                              f"parallel.context_size > 1 (got {cp})")
        if cp > 1 and p.baseline_attention != "sdpa":
            raise RecipeError(f"parallel.context_size = {cp} runs on torch SDPA: parallel.baseline_attention = "
                              f"{p.baseline_attention!r} must be sdpa")
        if p.comm_max_ctas < 0:
            raise RecipeError(f"parallel.comm_max_ctas = {p.comm_max_ctas} must be >= 0")
        if p.comm_max_ctas and devices and not _cuda_available():
            raise RecipeError("parallel.comm_max_ctas needs NCCL process groups (GPUs); this machine has none")
        if p.gemm_sm_carveout < 0:
            raise RecipeError(f"parallel.gemm_sm_carveout = {p.gemm_sm_carveout} must be >= 0")
        if p.gemm_sm_carveout and devices and not _cuda_available():
            raise RecipeError("parallel.gemm_sm_carveout needs GPUs; this machine has none")
        if p.high_priority_comm and devices and not _cuda_available():
            raise RecipeError("parallel.high_priority_comm = true needs NCCL process groups (GPUs); this machine has none")
        if p.fsdp:
            for bad, key in ((t.distributed_optimizer, "train.distributed_optimizer = true (fsdp already shards the optimizer state)"),
                             (p.pipeline_size > 1, f"parallel.pipeline_size = {p.pipeline_size}"),
                             (t.save_dir is not None, "train.save_dir (checkpoints of FSDP runs are not supported)")):
                if bad:
                    raise RecipeError(f"parallel.fsdp = true cannot be combined with {key}")
        self._check_optimizer_offload()
        size = self.axis_size
        if lay.sequence_parallel and not lay.uses_tsp and size == 1:  # Megatron refuses SP without TP, later
            raise RecipeError(f"parallel.layout = {p.layout} needs parallel.size >= 2: sequence parallelism shards "
                              "over the tensor-parallel group (on one rank: parallel.layout = tp or dp)")
        for what, value in (("model.num_attention_heads", m.num_attention_heads),
                            ("model.num_query_groups", m.num_query_groups or m.num_attention_heads),
                            ("model.ffn_hidden_size", m.ffn_hidden_size)):
            if value % size:
                raise RecipeError(f"{what} = {value} must be divisible by parallel.size = {size} ({p.layout})")
        if lay.uses_tsp:
            try:
                check_seq_length(m.seq_length, size, what="model.seq_length")
            except TSPConfigError as e:
                raise RecipeError(str(e), option=e.option) from None
        if cp > 1:
            from ..config import check_context_parallel

            try:
                check_context_parallel(m.seq_length, cp, size, sequence_parallel=lay.sequence_parallel)
            except TSPConfigError as e:
                raise RecipeError(str(e)) from None
        elif lay.sequence_parallel and m.seq_length % size:  # TSP's zigzag already asked for 2 x size
            raise RecipeError(f"model.seq_length = {m.seq_length} must be divisible by parallel.size = {size} "
                              f"({p.layout})")
        if m.num_layers % p.pipeline_size:
            raise RecipeError(f"model.num_layers = {m.num_layers} must be divisible by parallel.pipeline_size = {p.pipeline_size}")
        self._check_recompute()
        self._check_moe(world_size)
        self._check_documents()
        if t.save_interval < 0:
            raise RecipeError("train.save_interval must be >= 0")
        if t.keep_checkpoints < 0:
            raise RecipeError(f"train.keep_checkpoints = {t.keep_checkpoints} must be >= 0 (0: keep all)")
        if not t.collective_timeout_s > 0:
            raise RecipeError(f"train.collective_timeout_s = {t.collective_timeout_s} must be > 0 (seconds)")
        if t.resume and not t.save_dir:
            raise RecipeError("train.resume = true needs train.save_dir")
        if t.resume_if_present and not t.save_dir:
            raise RecipeError("train.resume_if_present = true needs train.save_dir")
        if world_size is not None:
            model = self.group_sizes().replica
            if world_size % model:
                with_cp = f" x parallel.context_size ({cp})" if cp > 1 else ""
                raise RecipeError(
                    f"world size {world_size} does not fit the layout: parallel.size ({size}) x "
                    f"parallel.pipeline_size ({p.pipeline_size}){with_cp} = {model} must divide it "
                    f"(launch with torchrun --nproc-per-node a multiple of {model})"
                )
            dp = world_size // model
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise RecipeError(
                    f"train.global_batch_size = {t.global_batch_size} must be a multiple of "
                    f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
                )
        return self

    def _check_moe(self, world_size: Optional[int]) -> None:
        m, p = self.model, self.parallel
        E, ep = m.num_experts, p.expert_size
        if ep < 1:
            raise RecipeError(f"parallel.expert_size = {ep} must be >= 1")
        if not E:
            if ep > 1:
                raise RecipeError(f"parallel.expert_size = {ep} needs model.num_experts (a mixture-of-experts model)")
            return
        if E % ep:
            raise RecipeError(f"model.num_experts = {E} must be divisible by parallel.expert_size = {ep}")
        if not 1 <= m.moe_router_topk <= E:
            raise RecipeError(f"model.moe_router_topk = {m.moe_router_topk} must be between 1 and model.num_experts = {E}")
        if m.moe_router_topk == 1 and m.moe_router_score_function == "softmax" and not m.moe_router_pre_softmax:
            raise RecipeError("model.moe_router_topk = 1 needs model.moe_router_pre_softmax = true (a softmax over "
                              "one chosen logit is always 1)")
        if m.moe_layer_freq < 1:
            raise RecipeError(f"model.moe_layer_freq = {m.moe_layer_freq} must be >= 1")
        if world_size is not None:
            stage = world_size // p.pipeline_size
            if stage % ep:
                raise RecipeError(f"parallel.expert_size = {ep} must divide the {stage} ranks of a pipeline stage "
                                  f"(world {world_size} / parallel.pipeline_size {p.pipeline_size})")
        if not self.layout().uses_tsp:
            return
        from ..config import check_moe_config

        keys = {"--num-experts": "model.num_experts", "--moe-token-dispatcher-type": "parallel.moe_dispatcher",
                "--moe-shared-expert-intermediate-size": "model.moe_shared_expert_intermediate_size",
                "--moe-shared-expert-gate": "model.moe_shared_expert_gate",
                "--moe-router-load-balancing-type": "model.moe_router_load_balancing_type",
                "--moe-router-topk": "model.moe_router_topk", "--moe-token-drop-policy": "model.moe_token_drop_policy"}
        try:
            config = _MoEView(self)
            check_moe_config(config, p.size)
        except TSPConfigError as e:
            text = str(e)
            for flag, key in keys.items():
                text = text.replace(flag, key)
            raise RecipeError(text, option=e.option) from None

    def _check_optimizer_offload(self) -> None:
        """train.optimizer_cpu_offload runs megatron-core's HybridDeviceOptimizer behind the
        precision-aware distributed optimizer: bf16 weights (the fp32 main weights are the host's),
        the distributed optimizer, not FSDP's own sharded optimizer."""
        m, p, t = self.model, self.parallel, self.train
        f = t.optimizer_offload_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise RecipeError(f"train.optimizer_offload_fraction = {f!r} must be a number in (0, 1]")
        hm = t.host_memory_gb
        if hm is not None and (isinstance(hm, bool) or not isinstance(hm, (int, float)) or not hm > 0):
            raise RecipeError(f"train.host_memory_gb = {hm!r} must be a positive number of GiB (null: this node's)")
        if not t.optimizer_cpu_offload:
            return
        for bad, why in ((p.fsdp, "parallel.fsdp = true (FSDP shards the optimizer state itself, on the GPU)"),
                         (not t.distributed_optimizer, "train.distributed_optimizer = false (megatron-core offloads "
                                                       "the distributed optimizer's shard: set it true, at any data-"
                                                       "parallel size)"),
                         (m.dtype != "bfloat16", f"model.dtype = {m.dtype} (the host keeps the fp32 main weights of "
                                                 "bf16 weights: set model.dtype = bfloat16)")):
            if bad:
                raise RecipeError(f"train.optimizer_cpu_offload = true cannot be combined with {why}")

    def _check_documents(self) -> None:
        """The packed-sequence keys (data.reset_attention_mask, reset_position_ids, eod_*)."""
        d, m, p = self.data, self.model, self.parallel
        tsp = self.layout().uses_tsp
        eod = m.vocab_size - 1 if d.eod_id is None else d.eod_id
        if not 0 <= eod < m.vocab_size:
            raise RecipeError(f"data.eod_id = {d.eod_id} is outside the vocabulary "
                              f"[0, model.vocab_size = {m.vocab_size})")
        if d.mock_document_length < 0:
            raise RecipeError(f"data.mock_document_length = {d.mock_document_length} must be >= 0")
        if d.mock_document_length and d.path is not None:
            raise RecipeError("data.mock_document_length is for mock data only: the documents of data.path "
                              f"({d.path!r}) are those of the dataset (set it to 0)")
        if d.mock_document_length and d.eod_id is not None and d.eod_id != m.vocab_size - 1:
            raise RecipeError(f"data.mock_document_length ends mock documents with model.vocab_size - 1 = "
                              f"{m.vocab_size - 1}: data.eod_id = {d.eod_id} would find no boundaries")
        if d.reset_attention_mask and not tsp and p.baseline_attention != "sdpa":
            raise RecipeError(f"data.reset_attention_mask = true on parallel.layout = {p.layout} needs "
                              f"parallel.baseline_attention = sdpa (Megatron's local attention, "
                              f"{p.baseline_attention!r}, ignores the mask under a causal mask type)")
        if d.reset_attention_mask and tsp and p.tsp_attention_backend in ("cudnn", "flash"):
            raise RecipeError(f"data.reset_attention_mask = true cannot run on parallel.tsp_attention_backend = "
                              f"{p.tsp_attention_backend} (no document mask in that kernel): use auto or math")
        if (d.reset_position_ids and not d.reset_attention_mask and not tsp
                and m.position_embedding_type == "rope"):
            raise RecipeError(f"data.reset_position_ids = true with RoPE on parallel.layout = {p.layout}: Megatron's "
                              "GPTModel does not read position ids for RoPE; set data.reset_attention_mask = true "
                              "too (RoPE is relative, so within a document restarting it changes nothing) or use "
                              f"parallel.layout = {_tsp_layouts()}")

    def _check_recompute(self) -> None:
        m, p = self.model, self.parallel
        if p.recompute not in LAYER_RECOMPUTE:
            raise RecipeError(f"parallel.recompute = {p.recompute!r} is not one of {', '.join(LAYER_RECOMPUTE)}")
        if p.recompute_method not in RECOMPUTE_METHODS:
            raise RecipeError(f"parallel.recompute_method = {p.recompute_method!r} is not one of "
                              f"{', '.join(RECOMPUTE_METHODS)}")
        if p.recompute == "selective" and self.layout().uses_tsp:
            raise RecipeError("parallel.recompute = selective (Megatron's core-attention recompute) is for the "
                              "baselines: TSP attention never keeps S x S scores; use parallel.recompute = full "
                              "and/or parallel.tsp_recompute = full")
        if p.recompute != "full":
            for bad, key in ((p.recompute_method != "uniform", f"parallel.recompute_method = {p.recompute_method}"),
                             (p.recompute_num_layers is not None,
                              f"parallel.recompute_num_layers = {p.recompute_num_layers}"),
                             (p.offload_activations, "parallel.offload_activations = true")):
                if bad:
                    raise RecipeError(f"{key} needs parallel.recompute = full (Megatron's layer checkpointing), "
                                      f"got parallel.recompute = {p.recompute}")
            return
        per_stage = m.num_layers // p.pipeline_size
        n = p.recompute_num_layers
        if n is not None and not 1 <= n <= per_stage:
            raise RecipeError(f"parallel.recompute_num_layers = {n} must be between 1 and the layers per pipeline "
                              f"stage, {per_stage} (model.num_layers {m.num_layers} / parallel.pipeline_size "
                              f"{p.pipeline_size})")
        if n is not None and p.recompute_method == "uniform" and per_stage % n:
            raise RecipeError(f"parallel.recompute_num_layers = {n} must divide the {per_stage} layers per pipeline "
                              "stage with parallel.recompute_method = uniform (checkpointed chunks of N layers)")

    def recompute_config(self) -> dict:
        """The TransformerConfig fields of parallel.recompute / recompute_method / recompute_num_layers."""
        p = self.parallel
        if p.recompute == "none":
            return {}
        if p.recompute == "selective":
            return {"recompute_granularity": "selective"}  # recompute_modules: Megatron's default core_attn
        n = p.recompute_num_layers
        if n is None:
            n = 1 if p.recompute_method == "uniform" else self.model.num_layers // p.pipeline_size
        return {"recompute_granularity": "full", "recompute_method": p.recompute_method, "recompute_num_layers": n}

    def tsp_options(self) -> TSPOptions:
        return tsp_options_from(lambda key: getattr(self.parallel, key))  # tsp_lm_head null: local

    def layout(self) -> ParallelLayout:
        """The record of parallel.layout (`megatron_tsp.layouts`); RecipeError naming the valid ones."""
        return get_layout(self.parallel.layout, error=RecipeError)

    def group_sizes(self) -> GroupSizes:
        """The TSP / TP, context and pipeline group sizes of this recipe (data parallelism: the rest)."""
        p = self.parallel
        return self.layout().group_sizes(p.size, p.context_size, p.pipeline_size)

    @property
    def axis_size(self) -> int:
        """The ranks of Megatron's TP slot: the TSP or TP group (1 for dp)."""
        return self.group_sizes().axis


def _tsp_layouts() -> str:
    return ", ".join(names(lambda r: r.uses_tsp))


class _MoEView:
    """The TransformerConfig fields `moe.check_moe_config` reads, from a recipe (no config built)."""

    def __init__(self, recipe: "Recipe"):
        from ..config import moe_config_kwargs

        m = recipe.model
        self.__dict__.update(moe_config_kwargs(m.shape(), recipe.parallel.moe_dispatcher))
        self.num_layers, self.add_bias_linear, self.expert_tensor_parallel_size = m.num_layers, m.add_bias_linear, 1
        for name in ("moe_shared_expert_overlap", "moe_router_fusion", "moe_latent_size",
                     "moe_use_upcycling", "moe_enable_routing_replay", "moe_pad_expert_input_to_capacity"):
            setattr(self, name, False)


# -- loading ---------------------------------------------------------------------------------

def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _coerce(key: str, value: Any, hint) -> Any:
    """Check `value` against the type hint of `key`; ints are accepted for floats."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise RecipeError(f"{key} = {value!r} has the wrong type: expected {getattr(hint, '__name__', hint)}")


def _apply(recipe: Recipe, data: dict, origin: str) -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    for section, values in data.items():
        if section not in sections:
            raise RecipeError(f"{origin}: unknown section {section!r}; valid sections: {', '.join(sections)}")
        target = getattr(recipe, section)
        hints = get_type_hints(type(target))
        if not isinstance(values, dict):
            raise RecipeError(f"{origin}: section {section!r} must be a mapping")
        for key, value in values.items():
            if key not in hints:
                raise RecipeError(
                    f"{origin}: unknown key {section}.{key}; valid keys of {section}: {', '.join(hints)}"
                )
            setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))


def parse_override(text: str) -> dict:
    """`a.b=value` -> {'a': {'b': value}} (the value parsed as YAML: 4, 1e-3, true, null, text)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise RecipeError(f"override {text!r} must look like section.key=value (e.g. parallel.size=4)")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({yaml_problem(e)}); quote it "
                          f"(e.g. {key.strip()}='\"...\"')") from None
    return {section: {name: value}}


def load_recipe(path: Optional[str] = None, overrides: List[str] = (), devices: bool = True) -> Recipe:
    """The recipe at `path` (default: configs/tiny.yaml's embedded twin) with overrides applied,
    checked (`devices`: see Recipe.check)."""
    recipe = Recipe()
    if path is not None:
        _apply(recipe, read_yaml_file(path, RecipeError), path)
    for text in overrides:
        _apply(recipe, parse_override(text), "override")
    return recipe.check(devices=devices)

