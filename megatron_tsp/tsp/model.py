"""`TSPGPTModel`: a drop-in for Megatron's GPTModel that takes full sequences on every TSP
rank and returns the per-token loss (or logits) in natural order.

The zigzag layout is a permutation of the full sequence: tokens, positions, labels and the
loss mask are permuted before the model, so Megatron's contiguous sequence-parallel scatter
hands rank r chunks r and 2D-1-r; the per-token output is un-permuted on the way out.
Embedding: Megatron's, on the same group. With labels, the loss comes from the sequence-local
LM head (`megatron_tsp.tsp.lm_head`, `TSPOptions(tsp_lm_head='local')`, the default) or Megatron's
output layer and vocab-parallel cross entropy (`tsp_lm_head='megatron'`); logits are Megatron's.

Packed sequences: `attention_mask` may be document ids [b, S] (natural order, every rank;
`megatron_tsp.tsp.documents`), which every attention layer applies; RoPE reads `position_ids`
(Megatron's GPTModel reads them only for learned absolute embeddings), so positions that restart
per document (GPTDataset's `reset_position_ids`) rotate each document as if it were alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.models.gpt import GPTModel

from .. import compat
from ..config import TSPConfigError, TSPOptions, check_seq_length, require_group, validate_transformer_config
from .documents import WHAT as DOC_IDS, check_document_ids, is_document_ids
from .specs import get_tsp_block_spec
from . import lm_head
from .zigzag import from_zigzag, to_zigzag


class TSPGPTModel(GPTModel):
    """GPTModel with the TSP decoder. Arguments as GPTModel's; `transformer_layer_spec`
    defaults to `get_tsp_block_spec(..., tsp_options=tsp_options)`. The TSP group is
    `pg_collection.tp`; `pg_collection` is required (the collection
    `megatron_tsp.initialize_model_parallel` returns), with its `.tp` and `.pp` groups."""

    def __init__(self, config, transformer_layer_spec=None, vocab_size=None, max_sequence_length=None,
                 tsp_options: Optional[TSPOptions] = None, **kwargs):
        pg_collection = require_group(kwargs.get("pg_collection"), "TSPGPTModel", "pg_collection")
        group = require_group(getattr(pg_collection, "tp", None), "TSPGPTModel", "pg_collection.tp")
        pp_group = require_group(getattr(pg_collection, "pp", None), "TSPGPTModel", "pg_collection.pp")
        validate_transformer_config(config, group.size())
        if config.num_moe_experts:
            from .moe import check_expert_groups

            check_expert_groups(config, pg_collection)
        if kwargs.get("mtp_block_spec") is not None:
            raise TSPConfigError("multi-token prediction (--mtp-num-layers) is not supported by the TSP model")
        tsp_options = tsp_options or TSPOptions()
        lm_head.check_lm_head(config, tsp_options, vocab_size, group.size())
        if transformer_layer_spec is None:
            vp_stage = kwargs.get("vp_stage")
            transformer_layer_spec = get_tsp_block_spec(
                config, vp_stage, pp_group.rank(), tsp_group=group, tsp_options=tsp_options
            )
        with compat.quiet_gpt_model_deprecation():  # 0.19's notice, for GPTModel users
            super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        self.tsp_group = group
        self.tsp_options = tsp_options

    def _postprocess(self, *args, **kwargs):
        return lm_head.postprocess(self, super()._postprocess, *args, **kwargs)

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if out[1] is None or not isinstance(out[1], torch.Tensor) or position_ids is None or position_ids.shape[1] < 2:
            return out
        positions = from_zigzag(position_ids, self.tsp_group.size(), dim=1)
        # One sample: its rows of the table, same shape, no device sync. Several: per-sample tables
        # (b x the RoPE memory) only when the positions are not 0..S-1 (one sync to tell).
        if (positions.shape[0] > 1 or getattr(self.config, "rotary_interleaved", False)) and _counts_up(positions):
            return out
        return (out[0], rope_at_positions(out[1], positions), *out[2:])

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *args, **kwargs):
        D = self.tsp_group.size()
        if decoder_input is not None:
            raise TSPConfigError("decoder_input is not supported by TSPGPTModel: pass input_ids")
        if kwargs.get("packed_seq_params") is not None:
            raise TSPConfigError("packed sequences (packed_seq_params) are not supported by the TSP model")
        full = next((t for t in (input_ids, labels) if t is not None), None)
        if full is not None:
            check_seq_length(full.shape[1], D, what="sequence length of the batch")
        if is_document_ids(attention_mask):  # once here, before the first collective
            check_document_ids(attention_mask, None if full is None else full.shape[0],
                               attention_mask.shape[1] if full is None else full.shape[1], what=DOC_IDS)
        permute = lambda t: None if t is None else to_zigzag(t, D, dim=1)  # noqa: E731
        if position_ids is not None and position_ids.shape[1] > 1:
            position_ids = permute(position_ids)
        if kwargs.get("loss_mask") is not None:
            kwargs["loss_mask"] = permute(kwargs["loss_mask"])
        output = super().forward(permute(input_ids), position_ids, attention_mask, None, permute(labels), *args, **kwargs)
        if not self.post_process:
            return output  # hidden states of this stage's local tokens, [S/D, b, h]
        return from_zigzag(output, D, dim=1)  # loss [b, S] or logits [b, S, V/D]


def build_tsp_gpt(config, *, pg_collection, tsp_options: Optional[TSPOptions] = None, core_attention: str = "local",
                  **gpt_kwargs) -> TSPGPTModel:
    """TSPGPTModel on `pg_collection` (`.tp` the TSP group), its decoder `get_tsp_block_spec` as
    `tsp_options` say: the registry's builder of layout tsp (`megatron_tsp.layouts`;
    `training.build.build_gpt` calls it). `core_attention` is the baselines' choice (TSP runs its
    own kernels). `gpt_kwargs`: GPTModel's other keyword arguments."""
    return TSPGPTModel(config, None, tsp_options=tsp_options, pg_collection=pg_collection, **gpt_kwargs)


def _counts_up(positions: torch.Tensor) -> bool:
    return bool((positions == torch.arange(positions.shape[1], device=positions.device)).all())


def rope_at_positions(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's RoPE table [L, 1, 1, rot] at positions [b, S] (natural order) -> [S, b, 1, rot]
    (positions 0..S-1 give the table's own rows: the same values)."""
    return table.reshape(table.shape[0], table.shape[-1])[position_ids.to(table.device).t()].unsqueeze(2)
