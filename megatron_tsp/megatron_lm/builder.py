"""Megatron-LM core_v0.19+: the TSP model through Megatron-LM's model-builder path.

From core_v0.19.0 `pretrain_gpt.py` calls no model provider: `pretrain` builds the model with
the builder class that its model config names (`megatron/training/models/gpt.py`:
`GPTModelConfig.builder` -> `GPTModelBuilder`; the config comes from
`argument_utils.gpt_config_from_args`). `TSPGPTModelConfig` is that config with the TSP builder
(as `megatron/post_training/model_builder.py`'s `ModelOptModelConfig` is with ModelOpt's);
`TSPGPTModelBuilder.build_model` builds what `megatron_lm.build_gpt_model` builds for
`--tsp-size D` or `--tsp-native-spec sp_norm|sdpa`. Imported only where
`megatron.training.models` exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage, is_vp_first_stage, is_vp_last_stage
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig
from megatron.training.vocab_utils import calculate_padded_vocab_size


@dataclass(kw_only=True)
class TSPGPTModelConfig(GPTModelConfig):
    """`GPTModelConfig` whose builder is `TSPGPTModelBuilder`; the fields are GPTModelConfig's
    (made by `gpt_config_from_args(args, model_config_cls=TSPGPTModelConfig)`)."""

    builder: ClassVar[str] = "megatron_tsp.megatron_lm.builder.TSPGPTModelBuilder"


class TSPGPTModelBuilder(GPTModelBuilder):
    """`GPTModelBuilder` building TSPGPTModel (`--tsp-size D`) or the native GPTModel on the
    plugin's sequence-parallel spec (`--tsp-native-spec sp_norm|sdpa`), from the model config
    as GPTModelBuilder reads it and the TSP flags of Megatron's arguments."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        from megatron.training import get_args

        from .build import build_gpt_model

        cfg = self._model_config
        if cfg.transformer_layer_spec is not None:  # from --spec; refused at parse time with --tsp-size
            from ..config import TSPConfigError

            raise TSPConfigError("a transformer_layer_spec (--spec) cannot be combined with the TSP model builder")
        assert cfg.vocab_size is not None, "vocab_size must be configured before calling build_model()"
        vocab_size = cfg.vocab_size
        if cfg.should_pad_vocab:
            vocab_size = calculate_padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by,
                                                     cfg.transformer.tensor_model_parallel_size)
        vp_size = cfg.virtual_pipeline_model_parallel_size
        if pre_process is None:
            pre_process = is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size) and is_pp_first_stage(pg_collection.pp)
        if post_process is None:
            post_process = is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size) and is_pp_last_stage(pg_collection.pp)
        kwargs = dict(
            vocab_size=vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            fp16_lm_cross_entropy=cfg.fp16_lm_cross_entropy,
            parallel_output=cfg.parallel_output,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling,
            rope_scaling_factor=cfg.rope_scaling_factor,
            seq_len_interpolation_factor=cfg.seq_len_interpolation_factor,
            scatter_embedding_sequence_parallel=cfg.scatter_embedding_sequence_parallel,
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        return build_gpt_model(get_args(), cfg.transformer, kwargs)
