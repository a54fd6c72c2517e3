"""The `megatron-tsp` console script: `megatron-tsp train [RECIPE] [key=value ...]`
(launch under torchrun for more than one process)."""

import sys

COMMANDS = {"train": "train a GPT from a YAML recipe (megatron_tsp.train)"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: megatron-tsp COMMAND ...\n\ncommands:\n" +
              "\n".join(f"  {k:8s} {v}" for k, v in COMMANDS.items()), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from .train import main as train_main

    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
