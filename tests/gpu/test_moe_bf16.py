"""On one GPU (world 1), bfloat16: a small MoE GPT (TSPGPTModel at D = 1, EP = 1: Megatron's
MoELayer with the alltoall dispatcher, the TSP router and shared expert; OLMoE-style top-2 of 8
experts without pre-softmax, an aux loss, a z-loss) against the same model in float64 holding the
same bf16-representable weights: per-token loss and every gradient within 2e-2 relative.

The experts are what megatron-core builds without Transformer Engine: SequentialMLP (0.18+ build
SequentialMLP whatever `moe_grouped_gemm` says; 0.16-0.17's legacy GroupedMLP needs the
`grouped_gemm` package and holds bf16-only kernels, so it has no float64 reference and is not
compared here). The bf16 model routes in float32 (`moe_router_dtype='fp32'`, as recommended for
bf16 training).

The float64 model replays the bf16 model's routing decisions (the top-k indices of each of
Megatron's `torch.topk` calls, in call order; the probabilities are its own, in float64): a
token whose 2nd and 3rd router logits differ by less than bf16's rounding of the hidden states
would otherwise go to another expert in float64, a discrete difference that says nothing about
the kernels' precision. How many tokens' choices the bf16 rounding flipped is printed.

`moe_bf16_errors(device)` runs on CPU too (bf16 CPU kernels): tests/tsp/test_moe_bf16_harness.py
checks the harness there in CI (S = 256: worst 8.3e-3, 12 of 2048 choices flipped); the test here
needs CUDA."""

import pytest
import torch

from megatron_tsp.training.build import ModelShape, build_gpt
from tests.utils import init_tsp, mock_batch, rel_err

TOL = 2e-2
SHAPE = ModelShape(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=1024,
                   vocab_size=1024, seq_length=1024)
MOE = dict(num_moe_experts=8, moe_ffn_hidden_size=256, moe_router_topk=2, moe_router_pre_softmax=False,
           moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
           moe_shared_expert_intermediate_size=512, moe_token_dispatcher_type="alltoall")


class TopkReplay:
    """Records the indices of every torch.topk call (mode 'record'), then makes the same calls
    return them, with the values gathered from the new input (mode 'replay')."""

    def __init__(self, monkeypatch):
        self.calls, self.mode, self.at, self.flipped, self.total = [], "record", 0, 0, 0
        self._topk = torch.topk
        monkeypatch.setattr(torch, "topk", self)

    def __call__(self, input, k, dim=-1, *args, **kwargs):
        values, indices = self._topk(input, k, dim, *args, **kwargs)
        if self.mode == "record":
            self.calls.append(indices.detach().clone())
            return values, indices
        recorded = self.calls[self.at]
        self.at += 1
        assert recorded.shape == indices.shape, "the float64 forward called torch.topk differently"
        mine, theirs = indices.sort(dim=dim).values, recorded.sort(dim=dim).values
        self.flipped += int((mine != theirs).any(dim=dim).sum())
        self.total += mine.numel() // k
        return input.gather(dim, recorded), recorded


def _loss_and_grads(model, batch):
    tokens, labels, pos = batch
    loss = model(tokens, pos, None, labels=labels)
    loss.float().mean().backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


def moe_bf16_errors(device, monkeypatch, shape=SHAPE, seed=1234):
    """{what: relative error} of the bf16 model against the float64 one, the flips counted,
    and the experts' module name."""
    pgs = init_tsp(1)
    low = build_gpt(shape, layout="tsp", dtype=torch.bfloat16, seed=seed, moe_router_dtype="fp32", pg_collection=pgs,
                    **MOE).to(device)
    ref = build_gpt(shape, layout="tsp", dtype=torch.float64, seed=seed, pg_collection=pgs, **MOE).to(device).double()
    with torch.no_grad():
        params = dict(low.named_parameters())
        for name, p in ref.named_parameters():
            p.copy_(params[name].double())
    experts = {type(m.experts).__name__ for m in low.modules() if hasattr(m, "experts") and hasattr(m, "router")}
    batch = tuple(t.to(device) for t in mock_batch(0, 2, shape, seed=seed, device=device))
    replay = TopkReplay(monkeypatch)
    loss, grads = _loss_and_grads(low, batch)
    replay.mode = "replay"
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    assert replay.at == len(replay.calls) > 0
    errors = {"loss": rel_err(loss, ref_loss)}
    errors.update({n: rel_err(grads[n], ref_grads[n]) for n in ref_grads})
    return errors, (replay.flipped, replay.total), experts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_bf16_matches_float64(monkeypatch):
    errors, (flipped, total), experts = moe_bf16_errors(torch.device("cuda", torch.cuda.current_device()), monkeypatch)
    worst = max(errors, key=errors.get)
    print(f"\nBF16 moe D=1 ({', '.join(sorted(experts))}): worst relative error {errors[worst]:.2e} ({worst}); "
          f"bf16 rounding flipped {flipped} of {total} top-k choices (replayed in float64)")
    bad = {n: e for n, e in errors.items() if not e <= TOL}
    assert not bad, bad
