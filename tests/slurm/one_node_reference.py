"""The one-node runs the two-node SLURM jobs are compared with: under
`torchrun --standalone --nproc-per-node 4`, run the driver once per recipe given (a JSON list of
override lists on configs/tiny.yaml) in the same processes, and write every run's per-step
losses to OUT (rank 0), as {"0": [loss of step 1, ...], "1": [...]}.

    torchrun --standalone --nproc-per-node 4 tests/slurm/one_node_reference.py OUT '[["train.steps=4"], ...]'
"""

import json
import os
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|deprecated).*")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch.distributed as dist  # noqa: E402

from megatron_tsp.training.recipe import load_recipe  # noqa: E402
from megatron_tsp.training.loop import run  # noqa: E402


def main(out: str, runs: str) -> None:
    losses = {}
    for i, overrides in enumerate(json.loads(runs)):
        result = run(load_recipe(os.path.join(REPO, "configs", "tiny.yaml"), overrides))
        losses[str(i)] = [h["loss"] for h in result["history"]]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
