"""The model Megatron-LM builds when TSP (or a native spec of the plugin's) is on: the GPT model
with the TSP or SDPA block spec, from the same arguments as Megatron-LM's own builder. Used by the
builder hook of core_v0.16.1 ... core_v0.18.2 (`hooks.tsp_gpt_builder`) and by the model builder
class of core_v0.19+ (`builder.TSPGPTModelBuilder`). With `--reset-attention-mask` the model (TSP's, or the
native one on the SDPA spec) reads the documents from the batch's EOD tokens (`with_eod_documents`)."""

from __future__ import annotations

import functools
import numbers

from .arguments import flag_errors, tsp_options_from_args
from ..config import REFUSED_BUILDER_FLAGS, TSPConfigError


def _model_kwargs(args, pre_process, post_process, vp_stage, pg_collection) -> dict:
    """GPTModel's keyword arguments as Megatron-LM's gpt_builder (gpt_builders.py) passes them."""
    return dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def _check_builder_args(args, what: str, tsp: bool = False) -> None:
    """Options Megatron's gpt_builder handles with specs of its own: refused with our specs (the
    TSP model runs MoE itself: TSP_BUILDER_FLAGS)."""
    from .arguments import TSP_BUILDER_FLAGS

    for name, flag in REFUSED_BUILDER_FLAGS:
        if getattr(args, name, None) and not (tsp and name in TSP_BUILDER_FLAGS):
            raise TSPConfigError(f"{flag} cannot be combined with {what}")


def uses_tsp_builder(args) -> bool:
    """Whether the model is the plugin's: TSP (`--tsp-size > 1`) or a `--tsp-native-spec` other
    than `megatron`."""
    return bool(getattr(args, "tsp", False)) or getattr(args, "tsp_native_spec", "megatron") != "megatron"


@flag_errors
def build_gpt_model(args, config, kwargs: dict):
    """TSPGPTModel (`--tsp-size > 1`) or the native GPTModel on the local spec with
    sequence-parallel norms (`--tsp-native-spec sp_norm|sdpa`): the one place both Megatron-LM
    paths (model provider, model builder) build the plugin's model. `kwargs`: GPTModel's. Its
    TSPConfigErrors, the core's too, name pretrain_gpt.py's flags (arguments.flag_errors)."""
    tsp = bool(getattr(args, "tsp", False))
    native_spec = getattr(args, "tsp_native_spec", "megatron")
    _check_builder_args(args, "--tsp-size" if tsp else f"--tsp-native-spec {native_spec}", tsp=tsp)
    options = tsp_options_from_args(args)  # checked before anything is built
    from megatron.core.models.gpt import GPTModel
    from megatron.training import print_rank_0

    from ..tsp.model import TSPGPTModel
    from ..baselines.sdpa_attention import SDPACoreAttention
    from ..baselines.specs import get_sp_block_spec

    if tsp:
        print_rank_0(f"building TSP GPT model (--tsp-size {args.tsp_size}) ...")
        if kwargs.get("pg_collection") is None:  # Megatron-LM's model provider passes none: the groups it made
            from megatron.core.process_groups_config import ProcessGroupCollection

            kwargs = {**kwargs, "pg_collection": ProcessGroupCollection.use_mpu_process_groups()}
        if getattr(args, "reset_attention_mask", False):
            eod = tokenizer_eod_id(args, kwargs["vocab_size"])
            print_rank_0(f"--reset-attention-mask: document ids from the EOD tokens (id {eod}), no S x S mask")
            return with_eod_documents(TSPGPTModel)(config, None, tsp_options=options, eod_id=eod, **kwargs)
        return TSPGPTModel(config, None, tsp_options=options, **kwargs)
    print_rank_0(f"building GPT model with --tsp-native-spec {native_spec} ...")
    pg_collection = kwargs.get("pg_collection")
    if pg_collection is not None:
        pp_rank = pg_collection.pp.rank()
    else:
        from megatron.core import parallel_state as mpu

        pp_rank = mpu.get_pipeline_model_parallel_rank()
    core_attention = SDPACoreAttention if native_spec == "sdpa" else None
    chunk = options.mlp_chunk_tokens
    tp_group = None
    if chunk:
        from megatron.core import parallel_state as mpu

        tp_group = pg_collection.tp if pg_collection is not None else mpu.get_tensor_model_parallel_group()
    spec = get_sp_block_spec(config, kwargs.get("vp_stage"), pp_rank, core_attention=core_attention,
                             mlp_chunk_tokens=chunk, tp_group=tp_group)
    if native_spec == "sdpa" and getattr(args, "reset_attention_mask", False):
        eod = tokenizer_eod_id(args, kwargs["vocab_size"])
        print_rank_0(f"--reset-attention-mask: document ids from the EOD tokens (id {eod}), SDPA's S x S mask")
        return with_eod_documents(GPTModel)(config, spec, eod_id=eod, **kwargs)
    return GPTModel(config, spec, **kwargs)


def tokenizer_eod_id(args, vocab_size: int, tokenizer=None) -> int:
    """The EOD id of Megatron-LM's tokenizer (default: its global one, whose EOD GPTDataset's
    `reset_attention_mask` splits documents at), checked against the model's (padded) vocabulary."""
    if tokenizer is None:
        from megatron.training import get_tokenizer

        tokenizer = get_tokenizer()
    what = f"--tokenizer-type {getattr(args, 'tokenizer_type', None)}"
    try:
        eod = tokenizer.eod
    except (AttributeError, NotImplementedError):
        raise TSPConfigError(f"--reset-attention-mask: the tokenizer ({what}) has no EOD token to split "
                             "documents at") from None
    if isinstance(eod, bool) or not isinstance(eod, numbers.Integral) or not 0 <= eod < vocab_size:
        raise TSPConfigError(f"--reset-attention-mask: the tokenizer's EOD id {eod!r} ({what}) is outside the "
                             f"vocabulary [0, {vocab_size})")
    return int(eod)


@functools.lru_cache(maxsize=None)
def with_eod_documents(base):
    """`base` (TSPGPTModel, or Megatron's GPTModel on the SDPA spec) for `pretrain_gpt.py
    --reset-attention-mask`: Megatron-LM's get_batch gives no mask (`apply_tsp_document_args` turns
    the dataset's [b, 1, S, S] one off) and the model turns the batch's EOD tokens into document
    ids [b, S] once per micro-batch, GPTDataset's rule (`megatron_tsp.tsp.documents.document_ids`:
    the EOD closes its document), which every attention layer applies: TSP's to its zigzag chunks,
    SDPACoreAttention as the S x S mask. The whole sequence in natural order on every rank of the
    TP (= TSP) group, as the tokens are. Constructor: base's, plus `eod_id`."""
    from ..tsp import documents

    class EODDocuments(base):
        def __init__(self, *args, eod_id: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.eod_id = eod_id

        def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
            if not documents.is_document_ids(attention_mask):
                if input_ids is None:
                    raise TSPConfigError("--reset-attention-mask needs the tokens of the batch (input_ids) to find "
                                         "the documents; this forward got none")
                attention_mask = documents.document_ids(input_ids, self.eod_id)
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    EODDocuments.__name__ = EODDocuments.__qualname__ = f"EODDocuments{base.__name__}"
    EODDocuments.__doc__ = with_eod_documents.__doc__
    return EODDocuments
