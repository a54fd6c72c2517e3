"""Run Megatron-LM's unmodified `pretrain_gpt.py` with `--tsp-size`.

    torchrun --nproc-per-node 4 -m megatron_tsp.megatron_lm.run <Megatron-LM>/pretrain_gpt.py \\
        --tsp-size 4 [--tsp-recipe configs/megatron_lm/tiny.yaml] <usual Megatron flags>

Puts the script's folder on sys.path, adds the TSP flags to Megatron's argument parser (mapped
to the tensor-parallel slot before Megatron validates its arguments), puts the TSP model
builder behind Megatron's model path (the model provider up to core_v0.18.2, the model
config's builder from core_v0.19.0) and checks the built model (`megatron_tsp.megatron_lm.hooks.install`),
then runs the script as `__main__`. Without `--tsp-size` (or with 1) the run is plain
`pretrain_gpt.py`. `<script> --help` lists Megatron's flags with the TSP ones (group "tsp").
Megatron-LM: tags core_v0.16.1, core_v0.17.1, core_v0.18.2, core_v0.19.0.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m megatron_tsp.megatron_lm.run <Megatron-LM>/pretrain_gpt.py [--tsp-size D] [--tsp-recipe FILE] [Megatron flags ...]"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 2)[2].strip(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    script = argv[0]
    if script.startswith("-") or not script.endswith(".py"):
        print(f"{USAGE}\nmegatron_tsp.megatron_lm.run: error: the first argument must be Megatron-LM's pretrain_gpt.py, "
              f"got {script!r}", file=sys.stderr)
        return 2
    if not os.path.isfile(script):
        print(f"megatron_tsp.megatron_lm.run: error: {script}: no such file (give the path to Megatron-LM's "
              f"pretrain_gpt.py)", file=sys.stderr)
        return 2
    script = os.path.abspath(script)
    sys.path.insert(0, os.path.dirname(script))

    from ..config import TSPConfigError
    from .arguments import in_flags
    from .hooks import install

    try:
        install()
    except TSPConfigError as e:
        print(f"megatron_tsp.megatron_lm.run: error: {e}", file=sys.stderr)
        return 2
    sys.argv = [script] + argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    except TSPConfigError as e:  # e.g. the built model is not the one --tsp-size asks for, or a kernel's refusal
        print(f"megatron_tsp.megatron_lm.run: error: {in_flags(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
