"""On GPUs with NCCL, in bfloat16: TSP blocks and the GPT model against Megatron's native
unsharded ones (relative error <= 2e-2). Run with torchrun on the GPU machine; D = 1
(one GPU) checks the kernels and the single-rank path against Megatron's own layers."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from megatron_tsp.config import TSPOptions
from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import mock_batch
from tests.parity import block_parity, fresh_seed
from tests.utils import gather_full, init_tsp, rel_err, skip_unless_divides, sum_sequence_parallel_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = 2e-2
RESULTS = []


def _record(name, D, errors, seed):
    worst = max(errors.values())
    RESULTS.append((name, D, worst))
    if dist.get_rank() == 0:
        print(f"\nBF16 {name} D={D}: worst relative error {worst:.2e} (seed {seed}) {errors}")
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{name} D={D} (seed {seed}): {bad}"


OPTIONS = {"cudnn-save": TSPOptions(),
           "flash-recompute": TSPOptions(tsp_attention_backend="flash", tsp_recompute="full")}


@pytest.mark.parametrize("D", [1, 2, 4])
@pytest.mark.parametrize("kind,groups", [("attention", None), ("attention", 4), ("mlp", None)], ids=["attn-mha", "attn-gqa", "mlp"])
@pytest.mark.parametrize("mode", list(OPTIONS))
def test_blocks_bf16(world, D, kind, groups, mode):
    skip_unless_divides(world, D, with_data_parallel=True)
    errors, seed = block_parity(kind, D, groups=groups, heads=8, hidden=256, ffn=1024, S=512, b=2,
                                dtype=torch.bfloat16, bias=True, options=OPTIONS[mode])
    _record(f"{kind}{'-gqa' if groups else ''} {mode}", D, errors, seed)


def _gpt(layout, D, shape, seed):
    model = build_gpt(shape, layout=layout, dtype=torch.bfloat16, seed=seed, pg_collection=init_tsp(D))
    tokens, labels, pos = mock_batch(0, 2, shape, seed=seed)
    loss = model(tokens, pos, None, labels=labels)
    loss.float().mean().backward()
    group = mpu.get_tensor_model_parallel_group()
    sum_sequence_parallel_grads(model, group)
    return loss.detach().float(), {n: gather_full(p.grad, p, group).float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("D", [1, 2, 4])
def test_gpt_bf16(world, D):
    skip_unless_divides(world, D, with_data_parallel=True)
    shape = ModelShape(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                       ffn_hidden_size=1024, vocab_size=1024, seq_length=1024)
    seed = fresh_seed()
    ref_loss, ref_grads = _gpt("tp_sp", 1, shape, seed)
    loss, grads = _gpt("tsp", D, shape, seed)
    errors = {"loss": rel_err(loss, ref_loss)}
    errors.update({n: rel_err(grads[n], ref_grads[n]) for n in grads})
    vals = torch.tensor(list(errors.values()), dtype=torch.float64, device="cuda")
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    _record("gpt", D, dict(zip(errors, vals.tolist())), seed)
