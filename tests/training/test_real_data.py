"""A real Megatron indexed dataset (PREFIX.bin / PREFIX.idx) trains through the driver."""

import numpy as np
import torch

from megatron_tsp.training.recipe import load_recipe
from megatron_tsp.training.loop import run


def test_indexed_dataset_trains(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(64):  # documents of 40..120 tokens with a learnable pattern
        n, a = int(rng.integers(40, 120)), int(rng.integers(0, 100))
        builder.add_document(torch.tensor([(a + 3 * i) % 127 for i in range(n)], dtype=torch.int32), [n])
    builder.finalize(prefix + ".idx")
    result = run(load_recipe(None, [f"data.path={prefix}", f"data.cache_dir={tmp_path / 'cache'}", "parallel.size=1",
                                    "train.steps=8", "train.log_interval=100"]))
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
