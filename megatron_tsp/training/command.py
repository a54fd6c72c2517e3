"""`megatron-tsp train`'s command line, without torch or megatron: `train --help` (every recipe key
with its default and meaning, from the dataclasses of megatron_tsp.config) prints from here in well
under a second, and the launcher (`training.launch`) reads it before any worker starts."""

from __future__ import annotations

import argparse
import textwrap

from ..config import recipe_help

PROG = "megatron-tsp train"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
                    "Train a GPT with TSP (or a baseline layout) from a YAML recipe. On one machine "
                    "`--nproc-per-node N` starts the N processes; under torchrun: `torchrun --nproc-per-node N "
                    "--no-python megatron-tsp train ...` (torchrun runs a Python file unless told --no-python) or "
                    "`python -m torch.distributed.run --nproc-per-node N -m megatron_tsp.cli train ...`; under SLURM: "
                    "srun of either torchrun form, one per node.", 100),
        epilog="Recipe keys (section.key=value), their defaults and meanings:\n" + recipe_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", default=None, help="YAML recipe (default: the embedded tiny recipe, = configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.size=4 model.seq_length=32768")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", metavar="DIR",
                        help="resume from the latest checkpoint in DIR (sets train.save_dir=DIR train.resume=true); "
                             "a DIR that is missing or holds no checkpoint is an error, as is a corrupt latest "
                             "checkpoint (the error names the last complete one)")
    resume.add_argument("--resume-if-present", metavar="DIR",
                        help="for jobs a scheduler requeues: resume from DIR's latest checkpoint if there is one, "
                             "else start at step 1 and save there, saying so in one line (sets train.save_dir=DIR "
                             "train.resume_if_present=true)")
    p.add_argument("--summary-json", metavar="FILE", help="write the final summary (rank 0) to FILE")
    p.add_argument("--nproc-per-node", metavar="N", type=int,
                   help="start N worker processes on this machine (no torchrun; not under torchrun / srun)")
    p.add_argument("--verbose", action="store_true",
                   help="show every warning (by default the known-benign ones from megatron-core and torch are "
                        "hidden, and rank 0 says so in one line)")
    return p


def train_args(argv):
    """(args, recipe path or None, overrides) of `megatron-tsp train ARGV`. Options and overrides
    may come in any order (`recipe.yaml --resume DIR train.steps=9`); --resume /
    --resume-if-present become their train.* overrides. argparse's errors exit 2."""
    args = parser().parse_intermixed_args(argv)
    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path is not None and "=" in recipe_path:  # only overrides were given
        overrides.insert(0, recipe_path)
        recipe_path = None
    if args.resume:
        overrides += [f"train.save_dir={args.resume}", "train.resume=true"]
    if args.resume_if_present:
        overrides += [f"train.save_dir={args.resume_if_present}", "train.resume_if_present=true"]
    return args, recipe_path, overrides


def wants_help(argv) -> bool:
    """`-h` / `--help` among the options (not after `--`, where argparse reads no options)."""
    argv = list(argv)
    argv = argv[: argv.index("--")] if "--" in argv else argv
    return "-h" in argv or "--help" in argv
