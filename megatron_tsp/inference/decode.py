"""Decode as tensor parallelism: Megatron's own GPTModel with TP = D on the TSP model's
parameter tensors, its static KV cache filled by the TSP prefill, its sampling.

TSP's weight shard j is TP rank j's shard (TSP checkpoints are native TP), so the decode model
is Megatron's local-spec GPTModel built on the same group with sequence_parallel off, whose
parameters are then replaced by the TSP model's (the same tensors: no copy, no weight movement).

Megatron's engines run their own prefill: the static engine's controller starts every batch at
sequence offset 0 and the dynamic engine fills its paged cache from the prompt tokens, neither
accepts a cache it did not build. So `generate` is the smallest adapter around Megatron's parts:
the TSP prefill, `cache.exchange`, Megatron's `StaticInferenceContext` holding the result, the
model's forward with that context for every new token, and sampling by
`TextGenerationController.sample_from_logits` (temperature, top-k, top-p, its seeded generator;
the controller's CUDA-only constructor is skipped). Stop semantics are the static controller's:
a prompt stops at its first stop token (not returned, finish reason `stop`) or after
`max_new_tokens` (`length`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import compat
from ..config import TSPConfigError
from ..layouts import LAYOUTS
from . import cache as kv_cache
from .prefill import _model_parts, check_prompts, tsp_prefill


@dataclass(frozen=True)
class Sampling:
    """Megatron's sampling parameters (SamplingParams): greedy is `top_k=1`; `top_k` and
    `top_p` are exclusive (0 = off; both off: the temperature-scaled distribution); `seed` seeds the sampling generator (the same on every
    rank, so every rank draws the same token)."""

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    seed: int = 1234

    def __post_init__(self):
        if not self.temperature > 0:
            raise TSPConfigError(f"--temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise TSPConfigError(f"--top-k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise TSPConfigError(f"--top-p must be in [0, 1], got {self.top_p}")
        if self.top_k > 0 and self.top_p > 0.0:
            raise TSPConfigError("--top-k and --top-p cannot both be set (Megatron's sampling takes one of them)")


class Sampler:
    """`TextGenerationController.sample_from_logits` (megatron-core 0.16.1 and 0.19.2) on a
    controller without its CUDA-only set-up: only the seeded `sampling_rng` it reads."""

    def __init__(self, sampling: Sampling, vocab_size: int, device):
        from megatron.core.inference.sampling_params import SamplingParams
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        self.controller = TextGenerationController.__new__(TextGenerationController)
        self.controller.sampling_rng = torch.Generator(device=device)
        self.controller.sampling_rng.manual_seed(sampling.seed)
        self.params = SamplingParams(temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                                     top_p=float(sampling.top_p))
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[b, V] (the same on every rank) -> [b] token ids."""
        return self.controller.sample_from_logits(logits, self.params, self.vocab_size).view(-1)


def decode_model(model):
    """Megatron's GPTModel (local spec, TP = D on the TSP group, no sequence parallelism) whose
    parameters ARE the TSP model's (built once per TSP model and cached on it)."""
    cached = getattr(model, "_tsp_decode_model", None)
    if cached is not None:
        return cached.eval()
    from megatron.core.models.gpt import GPTModel

    from ..training.build import resolve

    _model_parts(model)
    config = copy.copy(model.config)
    config.sequence_parallel = False
    config.perform_initialization = False
    block_spec = resolve(LAYOUTS["tp"].block_spec)  # decode runs layout tp: TP = D, the tokens whole
    with compat.quiet_gpt_model_deprecation():
        native = GPTModel(
            config, block_spec(config, pp_rank=model.pg_collection.pp.rank()), vocab_size=model.vocab_size,
            max_sequence_length=model.max_sequence_length, pre_process=True, post_process=True,
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type, pg_collection=model.pg_collection,
        )
    tsp_params = dict(model.named_parameters())
    names = [n for n, _ in native.named_parameters()]
    if set(names) != set(tsp_params):
        raise TSPConfigError(f"the decode model's parameters differ from the TSP model's: "
                             f"{sorted(set(names) ^ set(tsp_params))[:6]}")
    for name in names:
        owner, _, leaf = name.rpartition(".")
        mine = native.get_submodule(owner)
        if getattr(mine, leaf).shape != tsp_params[name].shape:
            raise TSPConfigError(f"{name}: decode shard {tuple(getattr(mine, leaf).shape)} != TSP shard "
                                 f"{tuple(tsp_params[name].shape)}")
        setattr(mine, leaf, tsp_params[name])
    if hasattr(model, "rotary_pos_emb"):
        native.rotary_pos_emb = model.rotary_pos_emb  # the same RoPE table (base, scaling)
    device = next(model.parameters()).device
    for module in native.modules():  # buffers built on the CPU (cpu-initialized configs) join the weights
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    native.eval()
    object.__setattr__(model, "_tsp_decode_model", native)  # not a submodule: not in its state dict / modes
    return native


@torch.no_grad()
def decode_step(native, context, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One token per prompt through the TP model with the static cache -> [b, V] logits."""
    logits = native(tokens.view(-1, 1), positions.view(-1, 1), mask, inference_context=context,
                    runtime_gather_output=True)
    context.sequence_len_offset += 1
    return logits[:, -1, :]


@dataclass
class Generation:
    """Per prompt: the new tokens and why it stopped ('stop' or 'length'); timings in seconds."""

    tokens: List[List[int]]
    finish_reasons: List[str]
    prompt_tokens: int
    time_to_first_token: float
    decode_time: float
    first_logits: Optional[torch.Tensor] = None
    step_logits: List[torch.Tensor] = field(default_factory=list)


def _sync(device):
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = (), keep_logits: bool = False) -> Generation:
    """TSP prefill of `prompts` (token-id lists, the same on every rank), one cache exchange,
    then up to `max_new_tokens` tokens per prompt decoded with TP = D. Every rank returns the
    same tokens."""
    group, vocab_size, max_length, weight = _model_parts(model)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise TSPConfigError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    prompts = check_prompts(prompts, vocab_size, max_length, extra_tokens=max_new_tokens)
    stop = set(int(t) for t in stop_tokens)
    device = weight.device
    sampler = Sampler(sampling, vocab_size, device)
    native = decode_model(model)

    _sync(device)
    start = time.perf_counter()
    pre = tsp_prefill(model, prompts, checked=True)
    lengths = pre.lengths
    kv_nat = kv_cache.exchange_all(pre.kv, group)
    pre.kv = None
    context = kv_cache.static_context(kv_nat, lengths, max_new_tokens,
                                      [layer.self_attention.layer_number for layer in native.decoder.layers])
    del kv_nat
    next_tokens = _agree(sampler(pre.last_logits), group)
    _sync(device)
    ttft = time.perf_counter() - start

    b = len(prompts)
    out, reasons = [[] for _ in range(b)], ["length"] * b
    done = [False] * b
    positions = torch.tensor(lengths, device=device)
    result = Generation(out, reasons, sum(lengths), ttft, 0.0, pre.last_logits if keep_logits else None)
    rotary = getattr(native, "rotary_pos_emb", None)
    if rotary is not None:
        native.rotary_pos_emb = kv_cache.PromptRotary(rotary, lengths)
    try:
        for step in range(max_new_tokens):
            for i, t in enumerate(next_tokens.tolist()):
                if done[i]:
                    continue
                if t in stop:
                    done[i], reasons[i] = True, "stop"
                else:
                    out[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            logits = decode_step(native, context, next_tokens, positions + step,
                                 kv_cache.decode_mask(lengths, step, device))
            if keep_logits:
                result.step_logits.append(logits)
            next_tokens = _agree(sampler(logits), group)
    finally:
        if rotary is not None:
            native.rotary_pos_emb = rotary
    _sync(device)
    result.decode_time = time.perf_counter() - start - ttft
    return result


def _agree(tokens: torch.Tensor, group) -> torch.Tensor:
    """Every rank takes group rank 0's draw (they are equal: the same logits and generator;
    this makes it so even if a kernel differed in the last bit)."""
    if group.size() > 1:
        dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
    return tokens


@torch.no_grad()
def logprobs(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> List[List[float]]:
    """Per-token log-probabilities of each continuation given its prompt (no decoding): one TSP
    prefill of prompt + continuation with the sequence-local LM head, no KV cache kept."""
    group, vocab_size, max_length, _ = _model_parts(model)
    prompts = check_prompts(prompts, vocab_size, max_length)
    if not isinstance(continuations, (list, tuple)) or len(continuations) != len(prompts):
        raise TSPConfigError(f"{len(prompts)} prompts but "
                             f"{len(continuations) if isinstance(continuations, (list, tuple)) else 'no'} continuations")
    continuations = check_prompts(continuations, vocab_size, max_length, what="continuation")
    sequences = check_prompts([p + c for p, c in zip(prompts, continuations)], vocab_size, max_length,
                              what="prompt + continuation")
    inputs = [s[:-1] for s in sequences]
    labels = [s[1:] for s in sequences]
    pre = tsp_prefill(model, inputs, keep_cache=False, labels=labels, checked=True)
    return [pre.logprobs[i, len(p) - 1 : len(p) - 1 + len(c)].tolist()
            for i, (p, c) in enumerate(zip(prompts, continuations))]
