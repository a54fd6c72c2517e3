"""Mixture of experts on the TSP axis, with Megatron's own `MoELayer`.

Each TSP rank already holds distinct tokens (1/D of every sequence, zigzag chunks), which is
what an expert-parallel all-to-all wants: the MLP of an MoE layer is Megatron's `MoELayer`
with the `alltoall` dispatcher on the tokens this rank holds, experts 1/EP per rank (EP = the
TSP group when EP = D, or D x k ranks over TSP x DP). No sequence is gathered.

What differs from Megatron's TP+SP MoE layer, and why:
- Shared experts run as the TSP MLP (`TSPSharedExpertMLP`), not Megatron's
  `SharedExpertMLP`, which all-gathers the sequence over the TP group. Its gate
  (`--moe-shared-expert-gate`) is SharedExpertMLP's: a replicated [1, h] weight whose
  per-rank gradient is summed over the TSP group with the norms' and the router's.
- Token dropping (capacity factor) decides over every token of the micro-batch, as the
  single-process model does (`TSPTopKRouter`): each rank all-gathers its tokens' routing
  probabilities (E numbers per token, never hidden states) over the TSP group, puts them in
  natural order and runs Megatron's own `apply_router_token_dropping` on the whole set, then
  keeps its rows. (Megatron's SP router drops per rank-local token set instead.)
- Router statistics need no change: the aux-loss token counts are summed over TP x CP (the
  TSP group) and each rank's loss term covers its own tokens, so the terms sum to the
  single-process loss; the per-sequence aux loss sums counts per (sequence, expert) over the
  group, which is order-free, so the zigzag layout is exact; the z-loss is scaled by 1/D and
  summed through the router's sequence-parallel gradient reduction.

Refused, with one `TSPConfigError` before any collective (`megatron_tsp.config.check_moe_config`): the `allgather`
dispatcher (it all-gathers hidden states over TP x EP, the whole sequence), `flex` (DeepEP;
not tested), expert tensor parallelism > 1 (its all-gather over ETP would gather tokens),
shared-expert overlap, sinkhorn routing (it normalises over the rank's tokens), fused router
kernels and latent MoE (Transformer Engine only).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from .. import compat
from ..config import (TSPConfigError, TSPOptions, check_expert_parallel, check_moe_config,  # noqa: F401
                      moe_config_kwargs, moe_layer_pattern, require_group)  # moe_config_kwargs: torch-free, in config
from .mlp import TSPMLP
from .zigzag import from_zigzag, to_zigzag

def check_expert_groups(config, pg_collection) -> None:
    """The model's expert groups (`pg_collection`, required: no fallback to Megatron's global
    groups) against its config: EP divides the experts, expert TP is 1. Group sizes are known on
    every rank: no collective."""
    require_group(pg_collection, "check_expert_groups", "pg_collection")
    ep, etp = getattr(pg_collection, "ep", None), getattr(pg_collection, "expt_tp", None)
    ep_size = ep.size() if ep is not None else 1
    if etp is not None and etp.size() != 1:
        raise TSPConfigError(
            f"the expert tensor-parallel group has {etp.size()} ranks: build the groups with "
            f"megatron_tsp.initialize_model_parallel (expert TP = 1 under TSP)"
        )
    if config.num_moe_experts % ep_size:
        raise TSPConfigError(
            f"--num-experts = {config.num_moe_experts} must be divisible by --expert-model-parallel-size = {ep_size}"
        )


class TSPTopKRouter(TopKRouter):
    """Megatron's TopKRouter whose token dropping sees every token of the micro-batch (the TSP
    group's zigzag shards, put back in natural order), as the single-process model does. Without
    a capacity factor, or at D = 1, it is Megatron's router unchanged."""

    def __init__(self, config, pg_collection, **kwargs):
        require_group(getattr(require_group(pg_collection, "TSPTopKRouter", "pg_collection"), "tp", None),
                      "TSPTopKRouter", "pg_collection.tp")
        compat.bind_missing_te_general_gemm()
        self.capacity_factor = config.moe_expert_capacity_factor
        if self.capacity_factor is not None:
            config = copy.copy(config)  # Megatron's routing() runs without dropping; we drop after
            config.moe_expert_capacity_factor = None
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.tsp_group = pg_collection.tp
        self._expert_bias_map = None
        # Tokens this rank sent to each expert (after dropping) since the last `expert_load` read.
        self.register_buffer("routed_tokens", torch.zeros(config.num_moe_experts, dtype=torch.float64), persistent=False)

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        # Megatron counts tokens per expert after dropping: defer the count until we have dropped.
        if self.capacity_factor is None:
            return super()._apply_expert_bias(routing_map, padding_mask=padding_mask)
        self._expert_bias_map = (routing_map, padding_mask)

    def routing(self, logits, padding_mask=None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.capacity_factor is not None:
            seq_local, b = logits.shape[:2]
            keep = self._capacity_mask(probs.detach(), routing_map, seq_local, b)
            _, padding = self._expert_bias_map
            self._expert_bias_map = None
            super()._apply_expert_bias(keep, padding_mask=padding)
            probs, routing_map = probs * keep, keep
        if torch.is_grad_enabled():  # not again in a recompute's no-grad forward
            with torch.no_grad():
                self.routed_tokens += routing_map.sum(dim=0).to(self.routed_tokens.device, torch.float64)
        return probs, routing_map

    def _capacity_mask(self, probs, routing_map, seq_local: int, b: int):
        """This rank's rows of the capacity mask of the whole micro-batch [S*b, E]."""
        group, E = self.tsp_group, probs.shape[-1]
        D = group.size()
        packed = torch.cat([probs, routing_map.to(probs.dtype)], dim=-1).view(seq_local, b, 2 * E)
        if D > 1:
            shards = [torch.empty_like(packed) for _ in range(D)]
            dist.all_gather(shards, packed.contiguous(), group=group)
            packed = from_zigzag(torch.cat(shards, dim=0), D, dim=0)  # natural order [S, b, 2E]
        full_probs, full_map = packed[..., :E].reshape(-1, E), packed[..., E:].reshape(-1, E).bool()
        _, keep = apply_router_token_dropping(
            full_probs, full_map, router_topk=self.topk, capacity_factor=self.capacity_factor,
            drop_policy=self.config.moe_token_drop_policy, pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
        )
        if D > 1:
            r = group.rank()
            keep = to_zigzag(keep.view(D * seq_local, b, E), D, dim=0)[r * seq_local:(r + 1) * seq_local]
        return keep.reshape(-1, E)


class TSPSharedExpertMLP(TSPMLP):
    """The shared expert of an MoE layer as the TSP MLP (width
    `moe_shared_expert_intermediate_size`), on the layer's TSP group; same parameters and
    checkpoint keys as Megatron's SharedExpertMLP (linear_fc1, linear_fc2, and `gate_weight`
    with `gate`). Returns the output alone, as SharedExpertMLP does.

    `gate` (`--moe-shared-expert-gate`, Qwen2-MoE): the output times sigmoid(x @ gate_weight^T)
    per token, as SharedExpertMLP computes it. The [1, h] gate weight is replicated, as in
    Megatron; each rank's gradient covers its own tokens, so it is tagged `sequence_parallel`
    like the norms and the router and `finalize_model_grads` sums it over the TSP group."""

    def __init__(self, config, submodules, pg_collection, gate: bool = False,
                 tsp_options: Optional[TSPOptions] = None, name=None):
        config = copy.copy(config)
        config.ffn_hidden_size = config.moe_shared_expert_intermediate_size
        group = getattr(require_group(pg_collection, "TSPSharedExpertMLP", "pg_collection"), "tp", None)
        super().__init__(config, submodules, tp_group=require_group(group, "TSPSharedExpertMLP", "pg_collection.tp"),
                         tsp_options=tsp_options, name=name)
        self.use_shared_expert_gate = gate
        self.gate_weight = None
        if gate:  # Megatron's SharedExpertMLP.__init__ (0.16.1 and 0.19.2)
            self.gate_weight = torch.nn.Parameter(torch.empty((1, self.config.hidden_size)))
            if config.perform_initialization:
                config.init_method(self.gate_weight)
            self.gate_weight.data = self.gate_weight.data.to(dtype=config.params_dtype)
            setattr(self.gate_weight, "sequence_parallel", self.config.sequence_parallel)

    def forward(self, hidden_states, *args, **kwargs):
        output, bias = super().forward(hidden_states)
        output = output if bias is None else output + bias
        if self.use_shared_expert_gate:
            output = output * torch.sigmoid(torch.nn.functional.linear(hidden_states, self.gate_weight))
        return output

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """MLP's sharded state dict, plus the replicated gate weight (SharedExpertMLP's)."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)  # as MegatronModule does when none is given
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.use_shared_expert_gate:
            key = f"{prefix}gate_weight"
            sharded[key] = make_sharded_tensor_for_checkpoint(
                self.gate_weight, key, prepend_offsets=sharded_offsets, tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"])
        return sharded


def _submodule_entry(style_of, module, submodules, **params):
    """A builder entry in the style of `style_of` (ModuleSpec up to 0.17, a callable from 0.18)."""
    if isinstance(style_of, ModuleSpec):
        return ModuleSpec(module=module, params=params, submodules=submodules)
    return functools.partial(module, submodules=submodules, **params)


def tsp_moe_mlp_spec(local_moe, tsp_options: TSPOptions):
    """Megatron's local MoE entry (`get_gpt_layer_local_spec(num_experts=E).submodules.mlp`:
    MoELayer with SequentialMLP experts) with the TSP router and the TSP shared expert. The
    module stays exactly `MoELayer`, so every megatron-core version hands it the layer's
    `pg_collection` (attention's group as `.tp`, the expert groups as `.ep` / `.expt_dp`)."""
    if isinstance(local_moe, ModuleSpec):
        moe_submodules = local_moe.submodules
    else:
        moe_submodules = local_moe.keywords["submodules"]
    shared = moe_submodules.shared_experts
    mlp_submodules = shared.submodules if isinstance(shared, ModuleSpec) else shared.keywords["submodules"]
    new = dataclasses.replace(
        moe_submodules,
        router=TSPTopKRouter,
        shared_experts=_submodule_entry(shared, TSPSharedExpertMLP, mlp_submodules, tsp_options=tsp_options),
    )
    if isinstance(local_moe, ModuleSpec):
        spec = copy.copy(local_moe)
        spec.submodules = new
        return spec
    return functools.partial(local_moe.func, *local_moe.args, **{**local_moe.keywords, "submodules": new})


def expert_param_global_name(model, name: str) -> str:
    """`...mlp.experts.local_experts.<i>...` with the local expert index made global
    (the index Megatron's checkpoints use), for layout-invariant initialisation."""
    parts = name.split(".")
    if "local_experts" not in parts:
        return name
    at = parts.index("local_experts")
    layer = model.get_submodule(".".join(parts[: at - 1]))  # the MoELayer
    parts[at + 1] = str(layer.local_expert_indices[int(parts[at + 1])])
    return ".".join(parts)


def expert_load(model, group=None) -> dict:
    """Tokens routed to each expert since the last call, per MoE layer, summed over `group`
    (this rank's tokens when None; the TSP x DP group for the whole batch): {global layer
    number: float64 tensor [E]}. Resets the counts. Every rank of `group` must call it."""
    routers = sorted(((m.layer_number, m) for m in model.modules() if isinstance(m, TSPTopKRouter)),
                     key=lambda x: x[0])
    if not routers:
        return {}
    counts = torch.stack([r.routed_tokens for _, r in routers])
    for _, r in routers:
        r.routed_tokens.zero_()
    if group is not None and group.size() > 1:
        dist.all_reduce(counts, group=group)
    return {n: c for (n, _), c in zip(routers, counts)}


def _tracked_metrics():
    """Megatron's per-layer MoE metric tracker: {name: (values [layers], reduce_group)}."""
    try:  # megatron-core 0.19+
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        return {n: (e.values, e.reduce_group) for n, e in get_moe_metrics_tracker().metrics.items()}
    except ImportError:  # up to 0.18: a dict of dicts
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return {n: (e["values"], e.get("reduce_group")) for n, e in get_moe_layer_wise_logging_tracker().items()}


def forget_router_metrics() -> None:
    """Drop Megatron's per-layer MoE metric entries: the tracker is process-wide and sizes each
    entry by the layer count of the first model that recorded it, so a deeper model built later
    in the same process (tests, bench, inference after training) indexed past its end."""
    try:  # megatron-core 0.19+
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        entries = get_moe_metrics_tracker()._metrics  # `.metrics` is documented read-only
    except ImportError:  # up to 0.18: a dict of dicts
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entries = get_moe_layer_wise_logging_tracker()
    entries.clear()


def release_dispatcher_probs(model) -> None:
    """Drop, when each MoE layer's forward ends, the routing probabilities Megatron's alltoall
    dispatcher keeps (`token_dispatcher.probs`, read only inside `MoELayer.forward`). They carry
    their autograd graph, which reaches the parameters' gradient hooks (Megatron DDP's) and
    through them the model: a cycle through C++ autograd nodes that gc cannot see, keeping every
    MoE model under DDP, its last graph and its destroyed process groups alive (57 gloo threads
    per driver run at world 2; tests/tsp/test_moe.py::test_moe_model_under_ddp_is_freed)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    def drop_probs(module, args, output):
        if getattr(module.token_dispatcher, "probs", None) is not None:
            module.token_dispatcher.probs = None

    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_hook(drop_probs, always_call=True)


def pop_router_losses(tsp_group) -> dict:
    """The router losses of the forwards since the last call, per layer, for this rank's
    micro-batches: {name: float64 [num_layers]} with load-balancing losses summed over their
    reduce group (each TSP rank holds its tokens' terms) and the z-loss (a per-rank mean of its
    tokens) averaged over the TSP group; values are losses / their coefficient, as Megatron logs
    them. Clears the tracker. Every rank of the TSP group must call it (the same names, in order)."""
    out = {}
    for name, (values, group) in sorted(_tracked_metrics().items()):
        v = values.detach().to(torch.float64).clone()
        values.zero_()
        if group is None:
            if tsp_group.size() > 1:
                dist.all_reduce(v, group=tsp_group)
                v /= tsp_group.size()
        elif group.size() > 1:
            dist.all_reduce(v, group=group)
        out[name] = v
    return out


def moe_step_metrics(model, num_microbatches: int, pg_collection) -> dict:
    """The MoE entries of a training step's record, known on every rank: `aux_loss` and
    `z_loss` (Megatron's logged values, loss / coefficient, averaged over MoE layers,
    micro-batches and data-parallel ranks; None when off) and `expert_load` ({"layer N": tokens
    routed to each expert over the global batch}), on the model's groups `pg_collection`
    (.tp the TSP group, .dp, .pp, .tp_dp_cp). Every rank must call it after each step."""
    require_group(pg_collection, "moe_step_metrics", "pg_collection")
    tsp, dp, pp = pg_collection.tp, pg_collection.dp, pg_collection.pp
    losses = pop_router_losses(tsp)
    device = next(model.parameters()).device  # Megatron's tracker keeps the losses on the GPU
    moe_layers = sum(moe_layer_pattern(model.config))
    out = {"aux_loss": None, "z_loss": None}
    for key, names in (("aux_loss", ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss")),
                       ("z_loss", ("z_loss",))):
        found = [losses[n].sum().double().to(device) for n in names if n in losses]
        value = torch.stack(found).sum() if found else torch.zeros((), dtype=torch.float64, device=device)
        value = torch.stack([value, torch.tensor(float(bool(found)), dtype=torch.float64, device=device)])
        if pp.size() > 1:
            dist.all_reduce(value, group=pp)
        if dp.size() > 1:
            dist.all_reduce(value, group=dp)
            value[0] /= dp.size()
        if value[1] > 0:
            out[key] = value[0].item() / (moe_layers * num_microbatches)
    # The whole batch's tokens: TSP x data (x context, 1 under TSP).
    load = expert_load(model, group=require_group(getattr(pg_collection, "tp_dp_cp", None), "moe_step_metrics",
                                                  "pg_collection.tp_dp_cp"))
    local = {f"layer {n}": [round(x) for x in c.tolist()] for n, c in load.items()}
    if pp.size() > 1:
        stages = [None] * pp.size()
        dist.all_gather_object(stages, local, group=pp)
        local = {k: v for stage in stages for k, v in stage.items()}
    out["expert_load"] = local
    return out
