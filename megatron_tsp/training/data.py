"""The driver's data: Megatron's GPT datasets (MockGPTDataset, GPTDataset through
BlendedMegatronDatasetBuilder) from the recipe's `data` section, and each step's micro-batches of
one data-parallel rank (with the context-parallel slice and, for packed documents, the document ids).
"""

from __future__ import annotations

import os

import torch

from .recipe import Recipe, RecipeError

class _VocabTokenizer:
    """What Megatron's GPT datasets read of a tokenizer: the vocabulary size and the EOD id."""

    def __init__(self, vocab_size: int, eod=None):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1 if eod is None else eod
        self.eos = self.eod
        self.unique_identifiers = {"class": "megatron_tsp.VocabTokenizer", "vocab_size": vocab_size}
        if eod is not None:
            self.unique_identifiers["eod"] = eod


def _mock_documents_dataset(max_length: int, seed: int):
    """Megatron's MockGPTDataset over documents of random lengths 1..max_length (random tokens
    other than EOD, each document ended by the EOD token): packed sequences for
    data.reset_attention_mask (data.mock_document_length)."""
    import numpy
    from megatron.core.datasets.gpt_dataset import MockGPTDataset, MockGPTLowLevelDataset

    class Documents(MockGPTLowLevelDataset):
        def __init__(self, tokenizer):
            self.vocab_size, self.eod_token = tokenizer.vocab_size, tokenizer.eod
            rng = numpy.random.default_rng(seed=seed)
            self.sequence_lengths = rng.integers(low=1, high=max_length + 1, size=self.size, dtype=numpy.int32)

        def __getitem__(self, idx: int) -> numpy.ndarray:
            body = numpy.random.default_rng(seed=(seed, int(idx))).integers(
                0, self.vocab_size - 1, size=int(self.sequence_lengths[idx]) - 1)
            body[body >= self.eod_token] += 1  # every id but EOD
            return numpy.concatenate([body, [self.eod_token]]).astype(numpy.int64)

    class MockDocumentsGPTDataset(MockGPTDataset):
        @staticmethod
        def build_low_level_dataset(dataset_path, config):
            return Documents(config.tokenizer)

    return MockDocumentsGPTDataset


def build_train_dataset(recipe: Recipe):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    data, m, t = recipe.data, recipe.model, recipe.train
    if data.path is not None:
        missing = [data.path + ext for ext in (".bin", ".idx") if not os.path.isfile(data.path + ext)]
        if missing:
            raise RecipeError(f"data.path = {data.path!r}: missing {', '.join(missing)} "
                              "(a Megatron indexed dataset prefix: PATH.bin and PATH.idx)")
        for f in (data.path + ".bin", data.path + ".idx"):
            if not os.access(f, os.R_OK):
                raise RecipeError(f"data.path = {data.path!r}: {f} is not readable")
    config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=m.seq_length,
        blend=([data.path], None) if data.path else None,
        split=data.split,
        path_to_cache=data.cache_dir,
        tokenizer=_VocabTokenizer(m.vocab_size, data.eod_id),
        reset_position_ids=data.reset_position_ids,
        # reset_attention_mask: the document ids micro_batches derives from the EOD tokens, never
        # Megatron's S x S mask (create_attention_mask stays off)
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    cls = (GPTDataset if data.path else MockGPTDataset if not data.mock_document_length
           else _mock_documents_dataset(data.mock_document_length, t.seed))
    try:
        train, _, _ = BlendedMegatronDatasetBuilder(cls, [t.steps * t.global_batch_size, 0, 0], lambda: True, config).build()
    except (OSError, ValueError, AssertionError) as e:
        raise RecipeError(f"data.path = {data.path!r} could not be read as a Megatron indexed dataset: {e}") from e
    if train is None:
        raise RecipeError(f"data.split = {data.split!r} leaves no training samples")
    return train


def micro_batches(dataset, step: int, recipe: Recipe, dp_rank: int, dp_size: int, device, cp_group=None):
    """This DP rank's micro-batches of global step `step`: samples [step*G, (step+1)*G) split
    contiguously over DP ranks; under context parallelism, this CP rank's tokens of them
    (`cp_group`; Megatron's get_batch_on_this_cp_rank). Deterministic, so a resumed run sees
    the same data. With data.reset_attention_mask the batch also holds "document_ids" [b, S]
    (from the EOD tokens, `megatron_tsp.tsp.documents`): the whole sequence on every rank, CP
    ranks included (their attention sees every key)."""
    from ..baselines.context_parallel import cp_slice_batch
    from ..tsp.documents import document_ids

    if recipe.parallel.context_size > 1 and (cp_group is None or cp_group.size() != recipe.parallel.context_size):
        raise RecipeError(f"parallel.context_size = {recipe.parallel.context_size}: micro_batches needs the "
                          "context-parallel group (cp_group) to hand each CP rank its tokens")
    t = recipe.train
    per_rank = t.global_batch_size // dp_size
    first = step * t.global_batch_size + dp_rank * per_rank
    for mb in range(per_rank // t.micro_batch_size):
        idx = range(first + mb * t.micro_batch_size, first + (mb + 1) * t.micro_batch_size)
        samples = [dataset[i % len(dataset)] for i in idx]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        docs = document_ids(batch["tokens"], eod_id(recipe)) if recipe.data.reset_attention_mask else None
        batch = cp_slice_batch(batch, cp_group)
        if docs is not None:
            batch["document_ids"] = docs
        yield batch


def eod_id(recipe: Recipe) -> int:
    return recipe.model.vocab_size - 1 if recipe.data.eod_id is None else recipe.data.eod_id
