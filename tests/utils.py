"""Test helpers: tiny configs, groups, and Megatron's TP shard layout (to build a TSP shard
from a full weight and to gather full weights back)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import TransformerConfig

import megatron_tsp
from megatron_tsp.training.build import ModelShape, transformer_config

_SINGLETONS = {}


def device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def skip_unless_divides(world, D, *, with_data_parallel=False):
    """Run a D-parametrized test once, at the world it needs: world == D (D = 1 at world 1 or 2).
    At a larger world the extra ranks are only independent replicas of the same check, which CI's
    smaller world already ran (CI time). with_data_parallel=True: also at every multiple of D,
    for tests where the data-parallel ranks interact (gradient reduction, group layout)."""
    import pytest

    if world % D != 0:
        pytest.skip(f"world size {world} is not a multiple of D={D}")
    if not with_data_parallel and D != world and not (D == 1 and world <= 2):
        pytest.skip(f"D={D} runs at world {max(D, 2) if D == 1 else D}; here it would only repeat it on replicas")


def singleton_group():
    """A process group holding only this rank (every rank creates all of them, in order)."""
    world = dist.get_world_size()
    if world not in _SINGLETONS:
        groups = [dist.new_group([r]) for r in range(world)]
        _SINGLETONS[world] = groups[dist.get_rank()]
    return _SINGLETONS[world]


def singleton_pgs() -> ProcessGroupCollection:
    g = singleton_group()
    return ProcessGroupCollection(tp=g, cp=g, pp=g)


def init_tsp(D, pp=1, seed=1234):
    megatron_tsp.destroy_model_parallel() if mpu.model_parallel_is_initialized() else None
    pgs = megatron_tsp.initialize_model_parallel(tsp_size=D, pipeline_model_parallel_size=pp)
    mrandom.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return pgs


def tiny_config(D, *, heads=4, groups=None, hidden=32, ffn=64, layers=1, bias=False, gated=True,
                dtype=torch.float64, normalization="RMSNorm", sp=None, **kw) -> TransformerConfig:
    shape = ModelShape(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                       ffn_hidden_size=ffn, swiglu=gated, add_bias_linear=bias, normalization=normalization)
    return transformer_config(shape, D, sequence_parallel=(D > 1) if sp is None else sp, dtype=dtype, **kw)


# --- Megatron's TP layout: rank r of D holds chunks r, r+D, ... of `stride * D` chunks ------

def shard_of(full: torch.Tensor, rank: int, D: int, dim: int, stride: int = 1) -> torch.Tensor:
    chunks = torch.chunk(full, stride * D, dim=dim)
    return torch.cat(chunks[rank::D], dim=dim)


def full_from_shards(shards, dim: int, stride: int = 1) -> torch.Tensor:
    D = len(shards)
    pieces = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([pieces[i % D][i // D] for i in range(stride * D)], dim=dim)


def layout(param):
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim, getattr(param, "partition_stride", 1)
    return None


def gather_full(t: torch.Tensor, param, group) -> torch.Tensor:
    """The full tensor of a (maybe TP-sharded) parameter-shaped tensor `t`."""
    lay = layout(param)
    if lay is None or group.size() == 1:
        return t.clone()
    shards = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(shards, t.contiguous(), group=group)
    return full_from_shards(shards, *lay)


def load_full_into(module, full_state: dict, group):
    """Copy full weights into a TP/TSP-sharded module, by Megatron's layout."""
    D, r = group.size(), group.rank()
    with torch.no_grad():
        for name, p in module.named_parameters():
            full = full_state[name]
            lay = layout(p)
            p.copy_(full if lay is None or D == 1 else shard_of(full, r, D, *lay))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sum_sequence_parallel_grads(module, group):
    """What Megatron's finalize_model_grads does for sequence-parallel (norm) parameters."""
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None and group.size() > 1:
            dist.all_reduce(p.grad, group=group)


_MOCK_DATA = {}


def mock_batch(step: int, batch: int, shape: ModelShape, seed: int = 0, device=None):
    """(tokens, labels, position_ids) of global step `step`, `batch` sequences, identical on every
    rank: the driver's data path (Megatron's MockGPTDataset through training.loop.build_train_dataset
    and micro_batches, one micro-batch of the whole batch)."""
    from megatron_tsp.config import ModelRecipe, TrainRecipe
    from megatron_tsp.training.loop import build_train_dataset, micro_batches
    from megatron_tsp.training.recipe import Recipe

    recipe = Recipe(model=ModelRecipe(**vars(shape)),
                    train=TrainRecipe(steps=step + 1, micro_batch_size=batch, global_batch_size=batch, seed=seed))
    key = (shape.seq_length, shape.vocab_size, seed, batch)
    if key not in _MOCK_DATA or len(_MOCK_DATA[key]) < (step + 1) * batch:
        _MOCK_DATA[key] = build_train_dataset(recipe)
    dev = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)
    (b,) = micro_batches(_MOCK_DATA[key], step, recipe, 0, 1, dev or torch.device("cpu"))
    return b["tokens"], b["labels"], b["position_ids"]



class OpShapes(TorchDispatchMode):
    """Records the shape of every tensor any op returns (allocations and views), for the memory
    tests: no tensor of all S tokens' activations or logits may appear."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def saved_by_layer(layer, x, rope):
    """Forward + backward of one TransformerLayer with every tensor autograd saves recorded:
    (saved tensors, data pointers of the layer's weights, bytes of the distinct saved storages that
    are activations: weights, which are saved by reference, and scalars excluded)."""
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
    out.sum().backward()
    activations = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                   if t.data_ptr() not in params and t.numel() > 1}
    return saved, params, sum(activations.values())


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prepended to code run by `run_with_torch_blocked`: importing torch or megatron raises.
TORCH_BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "megatron"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


def run_with_torch_blocked(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter of this repo where importing torch or megatron raises."""
    return subprocess.run([sys.executable, "-c", TORCH_BLOCKED + code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})
