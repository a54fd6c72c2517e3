"""`probe --frontier --optimizer-cpu-offload` (issue 26 item 3): the search puts the optimizer
state on the host while the node's host memory holds it beside the offloaded inputs (the
planner's host need per rank: `predict`'s host_gib), drops it where it does not, never for FSDP;
`predict` reports the host need."""

import os

from megatron_tsp.planner import Layout, ModelSpec, param_counts
from megatron_tsp.probe import predict
from megatron_tsp.probe.frontier import OPTIMIZER_ON_HOST, Search, lean

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPE = os.path.join(ROOT, "configs", "7b_16k.yaml")


def _probe(calls):
    def probe(S, opts):
        calls.append(opts)
        return {"oom": None, "peak_allocated_gib": 1.0}
    return probe


def _need(state_gib, inputs_gib_per_layer_kept, layers=32):
    """Host GiB per rank: the optimizer's share when on the host + the inputs one of N layers keeps."""
    def need(S, opts):
        n = int(next(o for o in opts if "recompute_num_layers" in o).split("=")[1])
        inputs = layers // n * inputs_gib_per_layer_kept if "parallel.offload_activations=true" in opts else 0.0
        return inputs + (state_gib if "train.optimizer_cpu_offload=true" in opts else 0.0)
    return need


def test_optimizer_on_the_host_while_it_fits():
    for host, expect_adam, expect_n, expect_inputs in (
            (100.0, True, 1, True),  # 26 + 32 x 2 = 90: everything offloaded, a checkpoint per layer
            (60.0, True, 2, True),  # 26 + 16 x 2 = 58: the optimizer stays, N = 2
            (27.0, True, 1, False),  # only the optimizer state fits: no inputs offloaded
            (20.0, False, 4, True)):  # not even the state: without it, inputs at N = 4 (16 GiB)
        calls = []
        Search("tsp", 4, host, _probe(calls), _need(26.0, 2.0), log=lambda *_: None, layers=32,
               optimizer_offload=True).fits(2**20)
        opts = calls[0]
        assert all(o in opts for o in OPTIMIZER_ON_HOST) == expect_adam, (host, opts)
        assert ("parallel.offload_activations=true" in opts) == expect_inputs, (host, opts)
        if expect_inputs:
            assert f"parallel.recompute_num_layers={expect_n}" in opts, (host, opts)


def test_never_for_fsdp_and_off_by_default():
    assert not set(OPTIMIZER_ON_HOST) & set(lean("fsdp_cp4", True, 1, 0, optimizer_offload=True))
    calls = []
    Search("tsp", 4, None, _probe(calls), _need(26.0, 2.0), log=lambda *_: None).fits(2**20)
    assert not set(OPTIMIZER_ON_HOST) & set(calls[0])


def test_predict_reports_the_host_need():
    over = ["parallel.size=4", "parallel.recompute=full", "parallel.offload_activations=true",
            "train.distributed_optimizer=true", "train.optimizer_cpu_offload=true", "model.seq_length=1048576",
            "train.global_batch_size=1", "train.micro_batch_size=1"]
    p = predict(RECIPE, over, 4, 4, None, "h200x4")
    # the GPU's parameters (a quarter of 8.85e9), all stepped here (data parallel 1), 16 bytes each on the host
    model, _ = ModelSpec.from_recipe(RECIPE)
    per_gpu = param_counts(model, Layout("tsp", tsp_size=4))["total"]
    assert 2.2e9 < per_gpu < 2.22e9 and abs(p["host_optimizer_gib"] - per_gpu * 16 / 2**30) < 1e-9
    # 32 checkpointed inputs of [S / 4, h] in bf16
    assert abs(p["host_offload_gib"] - 32 * 2**20 / 4 * 4096 * 2 / 2**30) < 1e-9
    assert abs(p["host_gib"] - p["host_offload_gib"] - p["host_optimizer_gib"]) < 1e-9
    without = predict(RECIPE, over[:4], 4, 4, None, "h200x4")
    assert without["host_optimizer_gib"] == 0 and without["model_states_gib"] > 2.9 * p["model_states_gib"]
