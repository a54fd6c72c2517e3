"""The planner's inputs: a model, the training settings, a parallel layout and a cluster.

The model and the training settings are recipe keys: `ModelSpec` and `TrainSpec` take the fields
MODEL_KEYS and TRAIN_KEYS name from the recipe's dataclasses (megatron_tsp.config: ModelRecipe,
ParallelRecipe, TrainRecipe) with the types, defaults and meanings declared there
(`config.recipe_fields`), and declare only the planner's own settings and defaults. Their
properties are what the formulas derive from the keys (docs/planner.md's symbols: g, f, d, ...).

Pure Python (no torch, no megatron import): the planner runs anywhere in well under a second.
Every check raises `PlanError` (a `TSPConfigError`) naming the key or the flag at fault.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .. import layouts
from ..config import (ATTENTION_KV, CP_COMM_TYPES, LAYER_RECOMPUTE, LM_HEADS, LOAD_BALANCING, MLP_EXCHANGES,
                      NORMALIZATIONS, RECOMPUTE_METHODS, RECOMPUTE_MODES, ROUTER_SCORES,
                      TSPConfigError, moe_layer_pattern, recipe_fields)
from .errors import PlanError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LAYOUT_KINDS = tuple(layouts.PLANNER_KINDS)  # the registry's meshes: alone, with CP, with FSDP over CP
NORMS = ("lean", "torch", "fused")
OPTIMIZERS = ("adam", "none")
REQUIRED = dataclasses.MISSING

# The recipe keys the planner models ({key: its section}, in the order of the planner's output).
MODEL_KEYS = {k: "model" for k in (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size", "dtype",
    "swiglu", "share_embeddings_and_output_weights", "normalization", "num_experts", "moe_ffn_hidden_size",
    "moe_router_topk", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_layer_freq",
    "moe_router_score_function", "moe_router_pre_softmax", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
    "moe_z_loss_coeff")}
TRAIN_KEYS = {"seq_length": "model", "micro_batch_size": "train", "distributed_optimizer": "train",
              **{k: "parallel" for k in ("recompute", "recompute_method", "recompute_num_layers", "tsp_recompute",
                                         "offload_activations", "tsp_lm_head", "lm_head_chunk_tokens",
                                         "tsp_mlp_exchange", "tsp_attention_kv", "cp_comm_type", "mlp_chunk_tokens",
                                         "expert_size")},
              "optimizer_cpu_offload": "train", "optimizer_offload_fraction": "train"}
# The planner's defaults where the recipe's (the tiny CPU recipe's) are none for what it plans: a
# model given by flags is a real one on GPUs; one sequence per micro-batch; tsp's head.
MODEL_DEFAULTS = {"num_layers": REQUIRED, "hidden_size": REQUIRED, "num_attention_heads": REQUIRED,
                  "ffn_hidden_size": None,  # 4 x hidden_size, Megatron's default
                  "vocab_size": 32000, "dtype": "bfloat16"}
TRAIN_DEFAULTS = {"seq_length": REQUIRED, "micro_batch_size": 1,
                  "tsp_lm_head": "local"}  # the recipe's null: local under tsp (the baselines run Megatron's)
# what a null default stands for, where the recipe's docstring does not say it
NULL_MEANS = {"ffn_hidden_size": "4 x hidden_size"}
# the values a key or setting may take (the checks below and the command line's choices)
CHOICES = {"dtype": tuple(DTYPE_BYTES), "normalization": NORMALIZATIONS, "moe_router_score_function": ROUTER_SCORES,
           "recompute": LAYER_RECOMPUTE, "recompute_method": RECOMPUTE_METHODS, "tsp_recompute": RECOMPUTE_MODES,
           "tsp_lm_head": LM_HEADS, "tsp_mlp_exchange": MLP_EXCHANGES, "tsp_attention_kv": ATTENTION_KV,
           "cp_comm_type": CP_COMM_TYPES, "optimizer": OPTIMIZERS, "norm": NORMS}
# The command line's flag of each input is `--` + its name in dashes (`--num-query-groups`); these
# shorter spellings, the planner's own since its first version, name them too (and in its errors).
FLAG_ALIASES = {"num_layers": "--layers", "hidden_size": "--hidden", "num_attention_heads": "--heads",
                "num_query_groups": "--kv-groups", "ffn_hidden_size": "--ffn", "vocab_size": "--vocab",
                "swiglu": "--gated", "seq_length": "--seq-len", "micro_batch_size": "--micro-batch",
                "global_batch_size": "--global-batch"}


def flag(name: str) -> str:
    """The flag an error names for the input `name`: its short spelling, else --name-in-dashes."""
    return FLAG_ALIASES.get(name, "--" + name.replace("_", "-"))


def _positive(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{flag} must be a positive integer, got {value!r}")


# The longest context the planner models: 2^24 = 16,777,216 tokens. Megatron computes RoPE's angles
# from float32 positions, which are exact integers only up to 2^24 (beyond it neighbouring tokens
# get the same position), and every layout's per-GPU activations at that length are already
# terabytes for a 7B model; a longer context is a typo (a missing k, an extra 0), not a plan.
MAX_SEQ_LEN = 2**24


def check_seq_len(flag: str, value) -> None:
    """A context length the planner can model: a positive integer of at most MAX_SEQ_LEN tokens."""
    _positive(flag, value)
    if value > MAX_SEQ_LEN:
        raise PlanError(f"{flag} = {value} exceeds the longest context the planner models, {MAX_SEQ_LEN} tokens "
                        "(2^24: Megatron's RoPE positions are float32, exact integers only up to 2^24)")


@dataclass(frozen=True)
@recipe_fields(MODEL_KEYS, MODEL_DEFAULTS)
class ModelSpec:
    """A GPT: Megatron's local spec, RMSNorm or LayerNorm, RoPE, untied embeddings by default.

    Its fields are the recipe's `model` keys MODEL_KEYS (ModelRecipe's: meanings and defaults
    declared there; a model without a recipe: MODEL_DEFAULTS, ffn_hidden_size None = 4h) and a
    `name`. A gated (swiglu) MLP has fc1 of 2f x h. With `num_experts` E the layers
    `moe_layer_freq` picks are mixture-of-experts layers (Megatron's MoELayer: a router h x E, E
    routed experts of width fe of which each token takes k = moe_router_topk, an optional shared
    expert of width fs = moe_shared_expert_intermediate_size); the others stay dense. Lists of
    the recipe (moe_layer_freq, moe_router_load_balancing_type) are tuples here."""

    name: str = "model"

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            _positive(flag(key), getattr(self, key))
        for key in ("num_query_groups", "ffn_hidden_size"):
            if getattr(self, key) is not None:
                _positive(flag(key), getattr(self, key))
        if self.hidden_size % self.num_attention_heads:
            raise PlanError(f"--hidden = {self.hidden_size} must be divisible by --heads = {self.num_attention_heads}")
        if self.num_attention_heads % self.groups:
            raise PlanError(f"--heads = {self.num_attention_heads} must be divisible by --kv-groups = {self.groups}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype = {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.normalization not in NORMALIZATIONS:
            raise PlanError(f"model.normalization = {self.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.num_experts is not None:
            self._check_experts()

    def _check_experts(self):
        E, k = self.num_experts, self.moe_router_topk
        _positive("model.num_experts", E)
        _positive("model.moe_router_topk", k)
        if k > E:
            raise PlanError(f"model.moe_router_topk = {k} must be at most model.num_experts = {E}")
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(self, key) is not None:
                _positive(f"model.{key}", getattr(self, key))
        if self.moe_router_score_function not in ROUTER_SCORES:
            raise PlanError(f"model.moe_router_score_function = {self.moe_router_score_function!r} is not one of "
                            f"{', '.join(ROUTER_SCORES)}")
        for t in self.load_balancing_types:
            if t not in LOAD_BALANCING:
                raise PlanError(f"model.moe_router_load_balancing_type = {t!r} is not modelled by the planner "
                                f"(one of {', '.join(LOAD_BALANCING)})")
        try:
            moe_layer_pattern(self)
        except TSPConfigError as e:
            raise PlanError(f"model.moe_layer_freq: {e}") from None

    # what the formulas derive (docs/planner.md's symbols)
    @property
    def groups(self) -> int:
        """KV groups g: num_query_groups, or the heads (MHA)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def f(self) -> int:
        """MLP width f: ffn_hidden_size, or 4h."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): g x head_dim."""
        return self.groups * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def norm_stats(self) -> int:
        """fp32 statistics per token a lean norm keeps: RMSNorm rstd; LayerNorm mean and rstd."""
        return 2 if self.normalization == "LayerNorm" else 1

    @property
    def attn_params(self) -> int:
        """Wqkv (h x (q + 2 kv)) + Wo (q x h), no biases."""
        h = self.hidden_size
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h

    @property
    def mlp_params(self) -> int:
        return (3 if self.swiglu else 2) * self.hidden_size * self.f

    @property
    def layer_matmul_params(self) -> int:
        """Matmul weights of a dense layer (attention + MLP)."""
        return self.attn_params + self.mlp_params

    # mixture of experts (all 0 / empty for a dense model)
    @property
    def load_balancing_types(self) -> Tuple[str, ...]:
        t = self.moe_router_load_balancing_type
        return tuple(t) if isinstance(t, (list, tuple)) else (t,)

    @property
    def router_aux_loss(self) -> bool:
        """A load-balancing loss runs (a type other than none, coefficient > 0)."""
        return any(t != "none" for t in self.load_balancing_types) and bool(self.moe_aux_loss_coeff or 0)

    @property
    def router_z_loss(self) -> bool:
        return bool(self.moe_z_loss_coeff or 0)

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def moe_pattern(self) -> List[int]:
        """1 for an MoE layer, 0 for a dense one (Megatron's reading of moe_layer_freq)."""
        return moe_layer_pattern(self) if self.is_moe else [0] * self.num_layers

    @property
    def moe_layers(self) -> int:
        return sum(self.moe_pattern)

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @property
    def fe(self) -> int:
        """Width of one routed expert's MLP: moe_ffn_hidden_size, or f."""
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.f

    @property
    def expert_params(self) -> int:
        """One routed expert (ETP = 1: whole on its rank)."""
        return (3 if self.swiglu else 2) * self.hidden_size * self.fe if self.is_moe else 0

    @property
    def shared_params(self) -> int:
        fs = self.moe_shared_expert_intermediate_size
        return (3 if self.swiglu else 2) * self.hidden_size * fs if self.is_moe and fs else 0

    @property
    def shared_gate_params(self) -> int:
        """The shared expert's gate, a [1, h] weight (replicated on every rank of the layer, like the router)."""
        shared = self.is_moe and self.moe_shared_expert_intermediate_size
        return self.hidden_size if shared and self.moe_shared_expert_gate else 0

    @property
    def router_params(self) -> int:
        """The router's h x E weight (replicated on every rank of the layer)."""
        return self.hidden_size * self.num_experts if self.is_moe else 0

    @property
    def moe_layer_params(self) -> int:
        """Matmul weights of an MoE layer, every expert counted."""
        return (self.attn_params + self.router_params + self.num_experts * self.expert_params + self.shared_params
                + self.shared_gate_params)

    @property
    def moe_active_params(self) -> int:
        """Matmul weights one token passes in an MoE layer: attention, router, k experts, shared (and its gate)."""
        return (self.attn_params + self.router_params + self.moe_router_topk * self.expert_params + self.shared_params
                + self.shared_gate_params)

    @property
    def matmul_params_total(self) -> int:
        """Matmul weights of the L layers (every expert counted)."""
        moe = self.moe_layers * self.moe_layer_params if self.is_moe else 0
        return self.dense_layers * self.layer_matmul_params + moe

    @property
    def active_matmul_params(self) -> int:
        """Matmul weights one token passes through the L layers (model FLOPs: 6 x tokens x this)."""
        moe = self.moe_layers * self.moe_active_params if self.is_moe else 0
        return self.dense_layers * self.layer_matmul_params + moe

    @property
    def layer_norm_params(self) -> int:
        return 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        heads = 1 if self.share_embeddings_and_output_weights else 2
        return (self.matmul_params_total + self.num_layers * self.layer_norm_params
                + heads * self.embedding_params + self.hidden_size)

    @classmethod
    def from_recipe(cls, path: str, overrides: List[str] = ()):
        """(ModelSpec, seq_length) of a training recipe (configs/*.yaml) with overrides, read
        without torch or megatron (planner/recipe_reader.py): its MODEL_KEYS. Values the planner
        cannot model are a PlanError naming the key."""
        from .recipe_reader import read_recipe

        m = read_recipe(path, list(overrides))["model"]
        for key, bad, why in (
                ("add_bias_linear", m["add_bias_linear"], "linear biases are not modelled by the planner"),
                ("position_embedding_type", m["position_embedding_type"] != "rope", "the planner models rope only"),
                ("moe_expert_capacity_factor",
                 m["num_experts"] is not None and m["moe_expert_capacity_factor"] is not None,
                 "token dropping is not modelled by the planner (it assumes balanced routing, under which nothing "
                 "is dropped; plan without it)")):
            if bad:
                raise PlanError(f"model.{key} = {_yaml(m[key])}: {why}")
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            _positive(f"model.{key}", m[key])
        kw = {k: tuple(m[k]) if isinstance(m[k], list) else m[k] for k in MODEL_KEYS}
        return cls(**kw, name=path.rsplit("/", 1)[-1].rsplit(".", 1)[0]), m["seq_length"]


def _yaml(value) -> str:
    return "true" if value is True else repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
@recipe_fields(TRAIN_KEYS, TRAIN_DEFAULTS)
class TrainSpec:
    """One optimizer step: `micro_batch_size` sequences of `seq_length` tokens per micro-batch
    and model replica. Its fields are the recipe keys TRAIN_KEYS (meanings and defaults in
    megatron_tsp.config; the planner's own defaults: TRAIN_DEFAULTS) and the planner's own
    settings below."""

    global_batch_size: Optional[int] = None
    """Sequences per step (the recipe's train.global_batch_size is for its own layout; the planner
    plans every data-parallel size); null: one micro-batch per model replica."""
    optimizer: str = "adam"
    """adam, or none: forward and backward only (no optimizer state, no step)."""
    grad_reduce_in_fp32: bool = True
    """Gradients reduced and kept in fp32 (megatron_tsp.training.build.wrap_ddp_and_optimizer sets it)."""
    norm: str = "lean"
    """How a norm saves its input: lean (TSPNorm: its input in the model dtype and per-token fp32
    statistics), torch (torch's composite norm, TSPNorm before lean norms: two fp32 copies) or
    fused (TE's kernel: as lean in memory)."""
    document_length: int = 0
    """Packed documents of this many tokens under document masks (data.reset_attention_mask): the
    attention FLOPs are those inside documents only, as a kernel that skips masked blocks;
    0: one document per sequence."""

    def __post_init__(self):
        check_seq_len("--seq-len (model.seq_length)", self.seq_length)
        _positive("--micro-batch (train.micro_batch_size)", self.micro_batch_size)
        if self.global_batch_size is not None:
            _positive("--global-batch", self.global_batch_size)
        if self.document_length < 0:
            raise PlanError(f"--document-length = {self.document_length} must be >= 0 (0: one document per sequence)")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"--optimizer = {self.optimizer!r}: only adam (or none: no optimizer) is modelled")
        if self.norm not in NORMS:
            raise PlanError(f"--norm = {self.norm!r} is not one of {', '.join(NORMS)}")
        for key in ("recompute", "recompute_method", "tsp_recompute", "tsp_lm_head", "tsp_mlp_exchange",
                    "tsp_attention_kv", "cp_comm_type"):
            if getattr(self, key) not in CHOICES[key]:
                raise PlanError(f"{_key(key)} = {getattr(self, key)!r} is not one of {', '.join(CHOICES[key])}")
        if self.recompute_num_layers is not None:
            _positive(_key("recompute_num_layers"), self.recompute_num_layers)
            if self.recompute != "full":
                raise PlanError(f"parallel.recompute_num_layers = {self.recompute_num_layers} needs "
                                f"parallel.recompute = full (got {self.recompute!r})")
        if not isinstance(self.offload_activations, bool):
            raise PlanError(f"parallel.offload_activations must be true or false, got {self.offload_activations!r}")
        if self.offload_activations and self.recompute != "full":
            raise PlanError("parallel.offload_activations = true needs parallel.recompute = full (it offloads the "
                            f"checkpointed layers' inputs); got parallel.recompute = {self.recompute!r}")
        _positive(_key("lm_head_chunk_tokens"), self.lm_head_chunk_tokens)
        chunk = self.mlp_chunk_tokens
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise PlanError(f"{_key('mlp_chunk_tokens')} must be a non-negative integer (0: untiled), got {chunk!r}")
        _positive(_key("expert_size"), self.expert_size)
        if not isinstance(self.optimizer_cpu_offload, bool):
            raise PlanError(f"train.optimizer_cpu_offload must be true or false, got {self.optimizer_cpu_offload!r}")
        f = self.optimizer_offload_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise PlanError(f"train.optimizer_offload_fraction must be a number in (0, 1], got {f!r}")
        if self.optimizer_cpu_offload and self.optimizer != "adam":
            raise PlanError(f"{_key('optimizer_cpu_offload')} offloads Adam's state: --optimizer = {self.optimizer!r} "
                            "has none")
        if self.optimizer_cpu_offload and not self.distributed_optimizer:
            raise PlanError(f"{_key('optimizer_cpu_offload')} needs {_key('distributed_optimizer')}: megatron-core "
                            "offloads the distributed optimizer's shard")

    @property
    def host_optimizer_fraction(self) -> float:
        """The fraction of the stepped parameters whose optimizer state is on the host."""
        return float(self.optimizer_offload_fraction) if self.optimizer_cpu_offload else 0.0


def _key(name: str) -> str:
    """A training input in an error: its recipe key and its flag (`parallel.recompute (--recompute)`)."""
    return f"{TRAIN_KEYS[name]}.{name} ({flag(name)})"


# Every recipe key the planner models (the others it refuses or has no use for: tests/planner/test_plan.py)
RECIPE_KEYS = tuple([f"model.{k}" for k in MODEL_KEYS] + [f"{section}.{k}" for k, section in TRAIN_KEYS.items()])


def recipe_train_options(path: str, overrides: List[str] = ()) -> dict:
    """The TrainSpec fields a recipe's parallel and train sections set (TRAIN_KEYS; its
    model.seq_length comes with `ModelSpec.from_recipe`). Recipe values the planner cannot model
    are a PlanError naming the key: pipeline stages, Megatron's local core attention (S x S
    scores), TSP's compute-only benchmark mode, a dispatcher other than alltoall."""
    from .recipe_reader import read_recipe

    r = read_recipe(path, list(overrides))
    out = {name: r[section][name] for name, section in TRAIN_KEYS.items() if section != "model"}
    if out["tsp_lm_head"] is None:  # a per-layout default: local for tsp
        out["tsp_lm_head"] = "local"
    p = r["parallel"]
    if r["model"]["num_experts"] is not None and p["moe_dispatcher"] != "alltoall":
        raise PlanError(f"parallel.moe_dispatcher = {p['moe_dispatcher']!r}: the planner models the alltoall "
                        "dispatcher only (the one TSP runs)")
    for bad, why in ((p["pipeline_size"] != 1, f"parallel.pipeline_size = {p['pipeline_size']}: pipeline "
                                               "stages are not modelled by the planner (plan one stage's "
                                               "layers with --layers)"),
                     (p["baseline_attention"] != "sdpa",
                      f"parallel.baseline_attention = {p['baseline_attention']!r}: the planner models the "
                      "baselines' sdpa core attention only"),
                     (p["tsp_compute_only"], "parallel.tsp_compute_only = true: a benchmark mode without "
                                             "communication (results are wrong); not planned")):
        if bad:
            raise PlanError(why)
    return out



@dataclass(frozen=True)
class Layout:
    """A parallel layout of one model replica. `tsp`: D = `tsp_size`; `tp` / `tp_sp`: T = `tp`
    (without / with Megatron sequence parallelism); `cp`: C = `cp` (K/V all-gather, full
    weights); `tp_cp`: T x C (TP + SP inside, CP across); `fsdp_cp`: C, weights, gradients and
    optimizer state sharded over the CP group (ZeRO-3 inside CP). The kinds are the meshes of the
    layout registry (megatron_tsp.layouts.PLANNER_KINDS): the code asks `record` and `mesh`."""

    kind: str
    tsp_size: int = 1
    tp: int = 1
    cp: int = 1

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise PlanError(f"--layout kind {self.kind!r} is not one of {', '.join(LAYOUT_KINDS)}")
        for flag, v in (("tsp size", self.tsp_size), ("tp size", self.tp), ("cp size", self.cp)):
            _positive(f"--layout {self.kind}: {flag}", v)
        for name, v in (("tsp_size", self.tsp_size), ("tp", self.tp), ("cp", self.cp)):
            if v != 1 and name not in self.mesh.sizes:  # the formulas read the sizes the kind takes only
                raise PlanError(f"--layout {self.kind}: {name} = {v}, but the kind takes {', '.join(self.mesh.sizes)}")

    @property
    def record(self) -> layouts.ParallelLayout:
        """The parallel.layout record this kind runs (its predicates: uses_tsp, sequence_parallel, size_group)."""
        return layouts.PLANNER_KINDS[self.kind][0]

    @property
    def mesh(self) -> layouts.Mesh:
        """The registry's mesh of this kind (context, fsdp, sizes, label, spelling, attention)."""
        return layouts.PLANNER_KINDS[self.kind][1]

    @property
    def tp_without_sp(self) -> bool:
        """Megatron's tensor parallelism with the tokens whole on each TP rank (no sequence parallelism)."""
        return self.record.size_group == "tp" and not self.record.sequence_parallel

    @property
    def size(self) -> int:
        """GPUs of one model replica."""
        return self.tsp_size * self.tp * self.cp

    @property
    def weight_shards(self) -> int:
        """How many ways each layer's weights are split for compute (TP or TSP)."""
        return self.tsp_size * self.tp

    @property
    def token_shards(self) -> int:
        """How many ways the tokens of a sequence are split in the norm / residual regions."""
        return (self.weight_shards if self.record.sequence_parallel else 1) * self.cp

    @property
    def sequence_parallel(self) -> bool:
        return self.record.sequence_parallel and self.weight_shards > 1

    @property
    def label(self) -> str:
        return self.mesh.format(self.mesh.planner_label, tsp_size=self.tsp_size, tp=self.tp, cp=self.cp)

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """A mesh's spelling (`tsp4`, `tp4`, `tp_sp4`, `cp4`, `tp2xcp4`, `fsdp_cp4`; also `tp_cp2x4`)."""
        t = text.strip().lower().replace("-", "_").replace("+", "_")
        t = re.sub(r"^(?:tp_?cp|tp)(\d+)x(?:cp)?(\d+)$", r"tp\1xcp\2", t)  # the older spellings of tp_cp
        for kind, pattern in _SPELLINGS.items():
            m = pattern.fullmatch(t)
            if m:
                return cls(kind, **{k: int(v) for k, v in m.groupdict().items()})
        spelled = ", ".join(m.format(m.spelling, tsp_size="D", tp="T", cp="C")
                            for _, m in layouts.PLANNER_KINDS.values())
        raise PlanError(f"--layout {text!r}: expected one of {spelled} (e.g. tsp4, tp_sp8, tp2xcp4)")


def _spelling_pattern(mesh: layouts.Mesh) -> "re.Pattern":
    """`tp{tp}xcp{cp}` -> `tp(?P<tp>\\d+)xcp(?P<cp>\\d+)`."""
    parts = re.split(r"\{(\w+)\}", mesh.spelling)  # text, size, text, size, ..., text
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts)))


_SPELLINGS: Dict[str, "re.Pattern"] = {kind: _spelling_pattern(m) for kind, (_, m) in layouts.PLANNER_KINDS.items()}


def recipe_layout(path: str, overrides: List[str] = ()) -> Layout:
    """The planner layout of a recipe's `parallel` section: tsp (size D), tp / tp_sp (size T),
    dp with context_size C (cp; fsdp_cp with parallel.fsdp), tp_sp with C > 1 (tp_cp); plain
    data parallelism is tp with T = 1. A combination the planner has no model for (tp without
    sequence parallelism across CP) is a PlanError naming the keys."""
    from .recipe_reader import read_recipe

    p = read_recipe(path, list(overrides))["parallel"]
    found = layouts.planner_layout(p)
    if found is not None:
        kind, sizes = found
        return Layout(kind, **sizes)
    kind, cp = p["layout"], p["context_size"]
    if cp > 1 or p["fsdp"]:
        raise PlanError(f"parallel.layout = {kind} with parallel.context_size = {cp}"
                        + (" and parallel.fsdp = true" if p["fsdp"] else "") + ": not modelled by the planner")
    raise PlanError(f"parallel.layout = {kind!r} is not modelled by the planner")


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int = 1
    gpu_memory_gib: Optional[float] = None  # None: the hardware profile's
    host_memory_gib: Optional[float] = None  # per node, for offloaded activations; None: the profile's

    def __post_init__(self):
        _positive("--gpus-per-node", self.gpus_per_node)
        _positive("--nodes", self.nodes)
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise PlanError(f"--gpu-memory-gb must be positive, got {self.gpu_memory_gib}")
        if self.host_memory_gib is not None and self.host_memory_gib <= 0:
            raise PlanError(f"--host-memory-gb must be positive, got {self.host_memory_gib}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def check_layout(model: ModelSpec, train: TrainSpec, layout: Layout, cluster: Cluster) -> None:
    """Raise PlanError if `layout` cannot run `model` at `train.seq_length` on `cluster`."""
    w = layout.weight_shards
    where = f"layout {layout.label}"
    if cluster.world % layout.size:
        raise PlanError(f"{where} needs {layout.size} GPUs per replica, which does not divide "
                        f"--gpus-per-node x --nodes = {cluster.world}")
    if layout.record.size_group and w > cluster.gpus_per_node:  # the TSP / TP axis (also TP's inside TP x CP)
        raise PlanError(f"{where}: the {'TSP' if layout.record.uses_tsp else 'TP'} axis ({w}) must fit in one node "
                        f"(--gpus-per-node = {cluster.gpus_per_node})")
    for name, value in (("--heads", model.num_attention_heads), ("--kv-groups", model.groups), ("--ffn", model.f),
                        ("--vocab", model.vocab_size)):
        if value % w:
            raise PlanError(f"{name} = {value} must be divisible by the {where} weight split {w}")
    check_experts(model, train, layout, cluster)
    if train.optimizer_cpu_offload and layout.mesh.fsdp:
        raise PlanError(f"train.optimizer_cpu_offload (--optimizer-cpu-offload) cannot be combined with {where} "
                        "(parallel.fsdp: FSDP steps its own sharded optimizer state on the GPU)")
    if train.optimizer_cpu_offload and model.dtype_bytes >= 4:
        raise PlanError(f"train.optimizer_cpu_offload (--optimizer-cpu-offload) needs a bf16 model (model.dtype = "
                        f"bfloat16; got {model.dtype}): the host keeps the fp32 main weights of bf16 weights")
    if layout.record.uses_tsp and train.seq_length % (2 * layout.tsp_size):
        raise PlanError(f"--seq-len = {train.seq_length} must be divisible by 2 x D = {2 * layout.tsp_size} "
                        f"({where}: zigzag cuts each sequence into 2D chunks)")
    if layout.cp > 1 and train.seq_length % (2 * layout.cp * layout.tp):
        raise PlanError(f"--seq-len = {train.seq_length} must be divisible by 2 x CP x TP = "
                        f"{2 * layout.cp * layout.tp} ({where}: zigzag chunks, then TP sequence split)")
    rec = layout.record
    if rec.sequence_parallel and not rec.uses_tsp and not layout.mesh.context and train.seq_length % layout.tp:
        raise PlanError(f"--seq-len = {train.seq_length} must be divisible by TP = {layout.tp} ({where})")
    if layout.record.uses_tsp and train.recompute == "selective":
        raise PlanError(f"parallel.recompute = selective is for the baselines ({where}): TSP attention never "
                        "keeps S x S scores; use full (or parallel.tsp_recompute)")
    if train.recompute_num_layers is not None and train.recompute_num_layers > model.num_layers:
        raise PlanError(f"parallel.recompute_num_layers = {train.recompute_num_layers} is more than the layers "
                        f"per stage ({model.num_layers})")
    N, L = train.recompute_num_layers, model.num_layers
    if N and train.recompute_method == "uniform" and L % N:
        raise PlanError(f"parallel.recompute_num_layers = {N} must divide the {L} "
                        "layers per stage with parallel.recompute_method = uniform (checkpointed chunks of N layers)")
    dp = cluster.world // layout.size
    if train.global_batch_size is not None and train.global_batch_size % (train.micro_batch_size * dp):
        raise PlanError(f"--global-batch = {train.global_batch_size} must be a multiple of --micro-batch "
                        f"({train.micro_batch_size}) x data-parallel size ({dp}) for {where}")


def check_experts(model: ModelSpec, train: TrainSpec, layout: Layout, cluster: Cluster) -> None:
    """The expert-parallel layout of an MoE model on `layout` (PlanError otherwise): the MoE layer
    runs on the tokens of the norm region (TSP, TP+SP, CP: each GPU its own tokens), EP divides
    the experts and the GPUs; under TSP EP = D or D x k (megatron_tsp.config.check_expert_parallel)."""
    ep, where = train.expert_size, f"layout {layout.label}"
    if not model.is_moe:
        if ep > 1:
            raise PlanError(f"parallel.expert_size = {ep} needs model.num_experts (a dense model has no experts)")
        return
    if layout.mesh.fsdp:
        raise PlanError(f"{where}: mixture-of-experts layers are not modelled with FSDP-over-CP")
    if layout.tp_without_sp and layout.tp > 1:
        raise PlanError(f"{where}: Megatron's MoE layer under tensor parallelism needs sequence parallelism "
                        "(plan tp_sp instead)")
    if model.num_experts % ep:
        raise PlanError(f"model.num_experts = {model.num_experts} must be divisible by parallel.expert_size = {ep}")
    if cluster.world % ep:
        raise PlanError(f"parallel.expert_size = {ep} must divide --gpus-per-node x --nodes = {cluster.world}")
    if layout.record.uses_tsp and ep % layout.tsp_size:
        raise PlanError(f"parallel.expert_size = {ep} must be D or D x k under TSP ({where}: the expert group is "
                        "the TSP group, or spans k of them over data-parallel ranks)")
    fs = model.moe_shared_expert_intermediate_size
    if fs and fs % layout.weight_shards:
        raise PlanError(f"model.moe_shared_expert_intermediate_size = {fs} must be divisible by the "
                        f"{where} weight split {layout.weight_shards}")


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cluster: Cluster) -> List[Layout]:
    """Every layout the issue asks about on this cluster (whether it fits the model or not):
    TSP for every D > 1 dividing the node, TP and TP+SP likewise, CP and FSDP-over-CP for every
    C > 1 dividing the world, and TP x CP factorizations (T > 1 in a node, C > 1): each registry
    mesh over its sizes, the meshes of the same sizes side by side at each size."""
    kinds: Dict[Tuple[str, ...], List[str]] = {}  # the kinds by the sizes they take, in registry order
    for kind, (_, mesh) in layouts.PLANNER_KINDS.items():
        kinds.setdefault(mesh.sizes, []).append(kind)
    out: List[Layout] = []
    for sizes, same in kinds.items():
        for values in _size_choices(sizes, cluster.gpus_per_node, cluster.world):
            out += [Layout(kind, **values) for kind in same]
    return out


def _size_choices(sizes: Tuple[str, ...], node: int, world: int):
    """Every {size: value > 1} of `sizes` in order: the TSP / TP axis dividing the node, CP the
    world (left after the sizes before it)."""
    if not sizes:
        yield {}
        return
    for v in divisors(world if sizes[0] == "cp" else node)[1:]:
        for rest in _size_choices(sizes[1:], node, world // v):
            yield {sizes[0]: v, **rest}


@dataclass
class Skipped:
    layout: Layout
    reason: str


def usable_layouts(model: ModelSpec, train: TrainSpec, cluster: Cluster, layouts=None):
    """(layouts that can run, [Skipped]) out of `layouts` (default: candidate_layouts)."""
    ok, skipped = [], []
    for lay in layouts or candidate_layouts(cluster):
        try:
            check_layout(model, train, lay, cluster)
        except PlanError as e:
            skipped.append(Skipped(lay, str(e)))
        else:
            ok.append(lay)
    return ok, skipped

