"""`megatron-tsp generate RECIPE --load CKPT`: continuations (or log-probabilities) of prompts
with TSP prefill and tensor-parallel decode over every launched process: `--nproc-per-node N`
starts N local processes itself (training.launch's launcher, as `train`), or torchrun / srun do.

    megatron-tsp generate --nproc-per-node 2 configs/tiny.yaml --load ckpt --prompt-tokens p.jsonl

The model is the recipe's `model` section, run with TSP of size = the world size (the recipe's
`parallel` layout and size are for training and are not needed here: checkpoints are
layout-free, so one written at any TSP / TP size loads). Prompts: `--prompt-tokens FILE` (a JSON
list of token-id lists, or one JSON list per line) or `--prompt TEXT` (repeatable) with
`--tokenizer tokenizer.json` (the `tokenizers` package). Rank 0 writes one JSON line per prompt
(stdout or `--output`) and a summary (stderr, `--summary-json`). torch and megatron load after
the arguments are parsed: `generate --help` imports neither.

Bad input is one line, printed once (by rank 0 / the launcher), exit 2, before the checkpoint
loads: the arguments, the recipe, the prompts (token ids in the vocabulary, prompt + new tokens
within model.seq_length) and `--load DIR` (a checkpoint there, not corrupt) are checked first,
and with `--nproc-per-node N` in the launcher, before any worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import List, Optional

from .. import patches
from ..config import TSPConfigError
from ..training.recipe import RecipeError, load_recipe


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-tsp generate",
        description="Generate with TSP prefill + tensor-parallel decode (TSP size = world size: --nproc-per-node N "
                    "starts N local processes, or launch with torchrun / srun).",
    )
    p.add_argument("--nproc-per-node", metavar="N", type=int,
                   help="start N processes on this machine (TSP size N; no torchrun needed)")
    p.add_argument("recipe", nargs="?", default=None, help="YAML recipe whose model section matches the checkpoint "
                   "(default: the embedded tiny recipe)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.seq_length=131072")
    p.add_argument("--load", metavar="DIR", help="checkpoint directory written by `megatron-tsp train` (its latest step); "
                   "without it the recipe's seed initializes the weights (smoke tests only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-tokens", metavar="FILE", help="JSON list of token-id lists, or one JSON list per line")
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable); needs --tokenizer")
    p.add_argument("--tokenizer", metavar="PATH", help="a Hugging Face tokenizer.json (the `tokenizers` package)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy (default); 0 = off")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (with --top-k 0)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (the same on every rank)")
    p.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                   help="stop a prompt at this token (repeatable; not included in the output)")
    p.add_argument("--logprobs", action="store_true", help="no decoding: per-token log-probabilities of "
                   "--continuation-tokens FILE / --continuation TEXT given each prompt")
    p.add_argument("--continuation-tokens", metavar="FILE", help="with --logprobs: one token-id list per prompt")
    p.add_argument("--continuation", action="append", metavar="TEXT", help="with --logprobs: one text per --prompt")
    p.add_argument("--output", metavar="FILE", help="write the JSON lines here instead of stdout")
    p.add_argument("--summary-json", metavar="FILE", help="write the summary (rank 0) to FILE")
    p.add_argument("--verbose", action="store_true", help="every rank's errors and tracebacks (a failing worker's "
                   "are otherwise printed once, by the launcher)")
    return p


def read_token_lists(path: str, flag: str) -> List[List[int]]:
    """A JSON list of lists, or JSON lines of lists -> lists of ints (errors name `flag`)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise RecipeError(f"{flag} {path!r}: {e.strerror}") from e
    try:
        data = json.loads(text)
        if isinstance(data, list) and data and all(isinstance(x, int) for x in data):
            data = [data]  # one prompt
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise RecipeError(f"{flag} {path!r}: not JSON (a list of token-id lists, or one list per line): {e}") from e
    if not isinstance(data, list) or not all(isinstance(x, list) for x in data):
        raise RecipeError(f"{flag} {path!r}: every entry must be a list of token ids")
    return data


class Tokenizer:
    """A local tokenizer.json through the `tokenizers` package (imported only when asked for)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:
            raise RecipeError("--tokenizer needs the `tokenizers` package (pip install tokenizers), "
                              "or pass token ids with --prompt-tokens") from e
        if not os.path.isfile(path):
            raise RecipeError(f"--tokenizer {path!r}: no such file (a Hugging Face tokenizer.json)")
        self.tok = HFTokenizer.from_file(path)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: List[int]) -> str:
        return self.tok.decode(ids)


def _prompts(args):
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    if args.prompt is not None:
        if tokenizer is None:
            raise RecipeError("--prompt TEXT needs --tokenizer PATH (or pass token ids with --prompt-tokens)")
        prompts = [tokenizer.encode(t) for t in args.prompt]
    else:
        prompts = read_token_lists(args.prompt_tokens, "--prompt-tokens")
    continuations = None
    if args.logprobs:
        if args.continuation_tokens:
            continuations = read_token_lists(args.continuation_tokens, "--continuation-tokens")
        elif args.continuation:
            if tokenizer is None:
                raise RecipeError("--continuation TEXT needs --tokenizer PATH")
            continuations = [tokenizer.encode(t) for t in args.continuation]
        else:
            raise RecipeError("--logprobs needs --continuation-tokens FILE or --continuation TEXT")
        if len(continuations) != len(prompts):
            raise RecipeError(f"--logprobs: {len(prompts)} prompts but {len(continuations)} continuations")
    elif args.continuation_tokens or args.continuation:
        raise RecipeError("--continuation-tokens / --continuation are for --logprobs")
    return prompts, continuations, tokenizer


def _recipe_for(args, world: int, devices: bool = True):
    recipe = load_recipe(args.recipe, list(args.overrides) + ["parallel.layout=tsp", f"parallel.size={world}"],
                         devices=devices)
    p = recipe.parallel
    for key, value in (("parallel.pipeline_size", p.pipeline_size), ("parallel.context_size", p.context_size)):
        if value != 1:
            raise RecipeError(f"{key} = {value}: generate runs TSP over all processes (pipeline and context size 1)")
    if p.fsdp:
        raise RecipeError("parallel.fsdp = true: generate runs TSP over all processes (set parallel.fsdp=false)")
    d = recipe.data
    for key in ("reset_attention_mask", "reset_position_ids"):
        if getattr(d, key):  # training-data options: a prompt is one document
            raise RecipeError(f"data.{key} = true: generate runs each prompt as one document (no document masks, "
                              f"positions from 0); set data.{key}=false")
    return recipe


def check_inputs(args, recipe):
    """Every check that needs no model, torch-free: the prompts (and continuations) against the
    recipe's vocabulary and model.seq_length, --max-new-tokens, and `--load DIR` (a checkpoint
    there, its latest step not corrupt). Runs before the checkpoint loads (and, with
    --nproc-per-node, in the launcher before any worker starts). (prompts, continuations, tokenizer)."""
    from ..training.checkpoint_files import checkpoint_problem, corrupt_checkpoint_error, latest_step, step_dir
    from .prompts import check_prompts

    prompts, continuations, tokenizer = _prompts(args)
    m = recipe.model
    if args.logprobs:
        prompts = check_prompts(prompts, m.vocab_size, m.seq_length)
        continuations = check_prompts(continuations, m.vocab_size, m.seq_length, what="continuation")
        check_prompts([p + c for p, c in zip(prompts, continuations)], m.vocab_size, m.seq_length,
                      what="prompt + continuation")
    else:
        if args.max_new_tokens < 1:
            raise RecipeError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
        prompts = check_prompts(prompts, m.vocab_size, m.seq_length, extra_tokens=args.max_new_tokens)
    if args.load:
        if not os.path.isdir(args.load):
            raise RecipeError(f"--load {args.load!r}: no such directory")
        step = latest_step(args.load)
        if step is None:
            raise RecipeError(f"--load {args.load!r}: no checkpoint there (no 'latest' file written by megatron-tsp "
                              "train)")
        problem = checkpoint_problem(step_dir(args.load, step))
        if problem is not None:
            raise corrupt_checkpoint_error(args.load, step, problem)
    return prompts, continuations, tokenizer


def check_checkpoint_shape(recipe, load_dir: str) -> int:
    """The latest step of `load_dir`, after refusing a checkpoint whose model differs from the
    recipe's (every differing key listed)."""
    from ..training.checkpoint import _SHAPE_KEYS, CHECKPOINT_META, latest_step
    from ..training.recipe import Recipe

    step = latest_step(load_dir)
    if step is None:
        raise RecipeError(f"--load {load_dir!r}: no checkpoint there (no 'latest' file written by megatron-tsp train)")
    meta = os.path.join(load_dir, CHECKPOINT_META)
    if os.path.isfile(meta):
        with open(meta) as f:
            saved = json.load(f).get("model", {})
        mine, defaults = recipe.to_dict()["model"], Recipe().to_dict()["model"]
        diffs = [f"model.{k}: checkpoint {saved.get(k, defaults.get(k))!r}, recipe {mine[k]!r}"
                 for k in _SHAPE_KEYS if k != "seq_length" and saved.get(k, defaults.get(k)) != mine[k]]
        if diffs:
            raise RecipeError(f"--load {load_dir!r}: the checkpoint's model differs from the recipe's:\n  "
                              + "\n  ".join(diffs))
    return step


def build_and_load(recipe, load_dir: Optional[str], pg_collection):
    """The TSP model of the recipe on the groups `pg_collection` (required: those
    `training.loop.init_groups(recipe)` returned), with the checkpoint's weights (model only: no
    DDP, no optimizer)."""
    import torch

    from ..config import require_group
    from ..training.build import build_gpt
    from ..training.checkpoint import _step_dir

    pgs = require_group(pg_collection, "build_and_load", "pg_collection")
    step = check_checkpoint_shape(recipe, load_dir) if load_dir else None
    m = recipe.model
    dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        raise RecipeError("model.dtype = bfloat16 needs GPUs; use float32 on CPU")
    model = build_gpt(m.shape(), layout="tsp", dtype=dtype, seed=recipe.train.seed, tsp_options=recipe.tsp_options(),
                      init_method_std=m.init_method_std, pg_collection=pgs,
                      use_cpu_initialization=(not torch.cuda.is_available()) if m.cpu_init is None else m.cpu_init)
    if load_dir:
        from megatron.core import dist_checkpointing

        path = _step_dir(load_dir, step)
        try:
            # the data x context group in the metadata: Megatron reads its global group without it
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict(metadata={"dp_cp_group": pgs.dp_cp})},
                                             path)
        except Exception as e:
            raise RecipeError(f"--load {path!r} does not fit this model: {e}") from e
        with torch.no_grad():
            model.load_state_dict(loaded["model"])
    return model.eval()


def _peak_memory(device) -> dict:
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {"peak_mem_gb_per_gpu": round(peak.item(), 3)}
    return {"peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def run(args) -> dict:
    import torch
    import torch.distributed as dist

    from ..training.build import init_distributed
    from ..training.cpu import install_cpu_shims
    from ..training.loop import init_groups
    from .decode import Sampling, generate, logprobs

    init_distributed()
    install_cpu_shims()  # the generate entry: megatron-core on CPU needs them (no-op with CUDA)
    world = dist.get_world_size()
    recipe = _recipe_for(args, world)
    prompts, continuations, tokenizer = check_inputs(args, recipe)  # before the checkpoint loads
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = build_and_load(recipe, args.load, init_groups(recipe))
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    records = []
    summary = {"tsp_size": world, "prompts": len(prompts), "prompt_tokens": sum(map(len, prompts))}
    if args.logprobs:
        start = time.perf_counter()
        values = logprobs(model, prompts, continuations)
        summary["prefill_s"] = round(time.perf_counter() - start, 4)
        for i, lp in enumerate(values):
            records.append({"index": i, "continuation_tokens": len(lp), "logprobs": lp, "sum_logprob": sum(lp)})
    else:
        result = generate(model, prompts, args.max_new_tokens, sampling, stop_tokens=args.stop_token)
        new = sum(len(t) for t in result.tokens)
        decoded_after_first = max(new - len(prompts), 0)
        summary.update(time_to_first_token_s=round(result.time_to_first_token, 4), new_tokens=new,
                       decode_s=round(result.decode_time, 4),
                       decode_tokens_per_s=round(decoded_after_first / result.decode_time, 2) if result.decode_time else None)
        for i, (tokens, reason) in enumerate(zip(result.tokens, result.finish_reasons)):
            record = {"index": i, "prompt_tokens": len(prompts[i]), "tokens": tokens, "finish_reason": reason}
            if tokenizer is not None:
                record["text"] = tokenizer.decode(tokens)
            records.append(record)
    summary.update(_peak_memory(device))
    return {"records": records, "summary": summary}


PROG = "megatron-tsp generate"


def _parse(argv):
    args = parser().parse_args(argv)  # `--help` prints before torch and megatron load
    if args.recipe is not None and "=" in args.recipe:  # only overrides were given
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    return args


def main(argv=None):
    import contextlib

    from ..output import print_user_error, rank, verbose_requested, write_failure_report
    from ..training.launch import launch_workers, split_nproc, watch_launcher

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        nproc, rest = split_nproc(argv)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if nproc is not None:  # the launcher: check everything torch-free, then start the workers
        if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
            return print_user_error(PROG, "--nproc-per-node starts the processes itself: run it without torchrun, "
                                          "or drop it under torchrun / srun")
        args = _parse(rest)
        try:
            check_inputs(args, _recipe_for(args, nproc, devices=False))
        except TSPConfigError as e:
            return print_user_error(PROG, e)
        return launch_workers(nproc, rest, command="generate")
    if rank() == 0:
        args = _parse(argv)
    else:  # argparse's own errors: rank 0 prints them
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            args = _parse(argv)
    patches.install(patches.GENERATE_WARNINGS)
    import torch.distributed as dist

    watch_launcher()  # started by the launcher: end with it
    try:
        result = run(args)
    except TSPConfigError as e:  # raised on every rank before any collective: rank 0 says it
        if dist.is_initialized():
            dist.destroy_process_group()
        return print_user_error(PROG, e)
    except Exception as e:  # under the launcher: it prints the rank at fault once, not every rank's traceback
        if dist.is_initialized() and not verbose_requested(argv):
            import traceback

            from ..training.loop import _is_communication_error

            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            line = f"{PROG}: rank {dist.get_rank()} of {dist.get_world_size()} failed: {first}"
            if write_failure_report(line, "".join(traceback.format_exception(e)), _is_communication_error(e)):
                return 1
        raise
    if dist.get_rank() == 0:
        lines = "".join(json.dumps(r) + "\n" for r in result["records"])
        if args.output:
            with open(args.output, "w") as f:
                f.write(lines)
        else:
            sys.stdout.write(lines)
        s = result["summary"]
        print("summary: " + ", ".join(f"{k} {v}" for k, v in s.items()), file=sys.stderr, flush=True)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(s, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
