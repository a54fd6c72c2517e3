"""The `megatron-tsp` console script: `megatron-tsp COMMAND ...` (`train --nproc-per-node N`
starts N processes; under torchrun give it `--no-python`). Each command is a module with a `main(argv)`."""

import importlib
import sys

COMMANDS = {
    "train": ("megatron_tsp.training.launch", "train a GPT from a YAML recipe (--nproc-per-node N: N local processes)"),
    "plan": ("megatron_tsp.planner.cli", "memory, communication and step time of TSP and its baselines"),
    "bench": ("megatron_tsp.bench.launcher", "benchmark TSP against TP, TP+SP, CP, TP x CP, FSDP: memory, step time, MFU"),
    "generate": ("megatron_tsp.inference.cli", "TSP prefill + tensor-parallel decode from a checkpoint: continuations, log-probs"),
    "probe": ("megatron_tsp.probe.cli", "measure one rank of an N-GPU job on this GPU (fake process group), beside the planner"),
    "run": ("megatron_tsp.megatron_lm.run", "run Megatron-LM's pretrain_gpt.py with --tsp-size"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: megatron-tsp COMMAND ...\n\ncommands:\n" +
              "\n".join(f"  {k:8s} {help_}" for k, (_, help_) in COMMANDS.items()), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
