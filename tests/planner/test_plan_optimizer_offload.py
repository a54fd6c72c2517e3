"""train.optimizer_cpu_offload in the planner (issue 26 item 3): the GPU's model states fall from
18 to 6 bytes per parameter (bf16 weights, fp32 gradients), the host gains 16 per offloaded
parameter of the GPU's optimizer shard, the host budget is offloaded inputs + optimizer state per
node, the step pays the host Adam and the copies, and the frontier uses the option. Small numbers
checked by hand."""

import json
import os

import pytest

from megatron_tsp.planner import (GIB, Cluster, Layout, ModelSpec, PlanError, TrainSpec, fits, hardware,
                                  host_need_per_node, memory, param_counts, plan_layout, step_time)
from megatron_tsp.planner.cli import main as plan_main
from megatron_tsp.planner.formulas import (ADAM_BYTES_PER_PARAM, HOST_ADAM_BYTES_PER_PARAM, HOST_ADAM_GB_S,
                                           HOST_OPTIMIZER_COPY_BYTES_PER_PARAM)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MODEL = ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, vocab_size=128)
HW = hardware.load("h200x4")


def train(**kw):
    return TrainSpec(seq_length=1024, distributed_optimizer=True, **kw)


def test_model_states_per_gpu_and_on_the_host():
    lay, cluster = Layout("tsp", tsp_size=2), Cluster(gpus_per_node=2)  # data parallel 1: all stepped here
    P = param_counts(MODEL, lay)["total"]
    base = memory(MODEL, train(), lay, cluster)
    off = memory(MODEL, train(optimizer_cpu_offload=True), lay, cluster)
    assert base.params + base.grads + base.optimizer == 18 * P and base.host_optimizer == 0
    assert off.params + off.grads + off.optimizer == 6 * P  # bf16 weights + fp32 gradients
    assert off.host_optimizer == 16 * P and off.host == 16 * P  # main weight, 2 moments, gradient copy
    assert off.optimizer_step_transient == 0 and base.optimizer_step_transient == 4 * P
    assert base.peak - off.peak == pytest.approx(12 * P + 4 * P if base.peak_point == "optimizer step" else 12 * P)
    quarter = memory(MODEL, train(optimizer_cpu_offload=True, optimizer_offload_fraction=0.25), lay, cluster)
    assert quarter.optimizer == 12 * P * 0.75 and quarter.host_optimizer == 16 * P * 0.25
    # data parallel 2 (4 GPUs): the distributed optimizer's shard is half the GPU's parameters
    dp2 = memory(MODEL, train(optimizer_cpu_offload=True), lay, Cluster(gpus_per_node=4))
    assert dp2.host_optimizer == 16 * P / 2 and dp2.optimizer == 0


def test_host_budget_is_inputs_plus_optimizer_per_node():
    lay, cluster = Layout("tsp", tsp_size=2), Cluster(gpus_per_node=2)
    t = train(optimizer_cpu_offload=True, recompute="full", offload_activations=True)
    mem = memory(MODEL, t, lay, cluster)
    P = param_counts(MODEL, lay)["total"]
    # 2 layers checkpointed, each [S / D = 512 tokens, h = 64] in bf16
    assert mem.host_offload == 2 * 512 * 64 * 2
    assert host_need_per_node(mem, cluster) == 2 * (16 * P + 2 * 512 * 64 * 2)
    need_gib = host_need_per_node(mem, cluster) / GIB
    assert fits(mem, Cluster(gpus_per_node=2, host_memory_gib=need_gib * 1.001), HW)
    assert not fits(mem, Cluster(gpus_per_node=2, host_memory_gib=need_gib * 0.999), HW)
    p = plan_layout(MODEL, t, lay, Cluster(gpus_per_node=2, host_memory_gib=need_gib * 0.999), HW)
    assert not p.fits and any(n.startswith("optimizer state on the host:") for n in p.notes)


def test_step_time_pays_the_host_step():
    lay, cluster = Layout("tsp", tsp_size=2), Cluster(gpus_per_node=2)
    P = param_counts(MODEL, lay)["total"]
    base = step_time(MODEL, train(), lay, cluster, HW)
    off = step_time(MODEL, train(optimizer_cpu_offload=True), lay, cluster, HW)
    assert base["optimizer_s"] == pytest.approx(ADAM_BYTES_PER_PARAM * P / (HW.hbm_tb_s * 1e12))
    host = P * (HOST_OPTIMIZER_COPY_BYTES_PER_PARAM / (HW.host_gb_s * 1e9)
                + HOST_ADAM_BYTES_PER_PARAM / (HOST_ADAM_GB_S * 1e9))
    assert off["optimizer_s"] == pytest.approx(host) and off["host_optimizer_s"] == pytest.approx(host)
    assert off["as_implemented"] - base["as_implemented"] == pytest.approx(host - base["optimizer_s"])


def test_what_cannot_offload_is_a_plan_error():
    with pytest.raises(PlanError, match=r"train.optimizer_cpu_offload .* needs train.distributed_optimizer"):
        TrainSpec(seq_length=1024, optimizer_cpu_offload=True)
    with pytest.raises(PlanError, match=r"train.optimizer_offload_fraction must be a number in \(0, 1\]"):
        train(optimizer_cpu_offload=True, optimizer_offload_fraction=1.5)
    with pytest.raises(PlanError, match="cannot be combined with layout FSDP-over-CP 2"):
        plan_layout(MODEL, train(optimizer_cpu_offload=True), Layout("fsdp_cp", cp=2), Cluster(2), HW)
    fp32 = ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, dtype="float32")
    with pytest.raises(PlanError, match="needs a bf16 model"):
        plan_layout(fp32, train(optimizer_cpu_offload=True), Layout("tsp", tsp_size=2), Cluster(2), HW)


def test_plan_flag_and_the_frontier_use_it(capsys):
    """The 7B on 4 x H200: `--optimizer-cpu-offload` moves 12 of 18 bytes per parameter off the
    GPU; the frontier puts the optimizer on the host at TSP D=4's longest context (the state is
    37 GiB of its 140 without), and not when the host cannot hold it."""
    recipe = os.path.join(ROOT, "configs", "7b_16k.yaml")
    args = [recipe, "--layout", "tsp4", "--gpus-per-node", "4", "--json", "--distributed-optimizer"]
    assert plan_main(args) == 0
    base = json.loads(capsys.readouterr().out)
    assert plan_main(args + ["--optimizer-cpu-offload"]) == 0
    off = json.loads(capsys.readouterr().out)
    gib = [{k: r["memory_gib"][k] for k in ("params", "grads", "optimizer", "host_optimizer")}
           for r in (base["plans"][0], off["plans"][0])]
    assert gib[1]["params"] + gib[1]["grads"] + gib[1]["optimizer"] == pytest.approx(
        (gib[0]["params"] + gib[0]["grads"] + gib[0]["optimizer"]) * 6 / 18)
    assert gib[1]["host_optimizer"] == pytest.approx(gib[0]["optimizer"] * 16 / 12)
    front = [recipe, "--frontier", "--layout", "tsp4", "--gpus-per-node", "4", "--json", "--max-seq-len", str(2**22)]
    assert plan_main(front) == 0
    at_max = json.loads(capsys.readouterr().out)["layouts"][0]["at_max"]
    assert at_max["options"].get("optimizer_cpu_offload") and at_max["host_optimizer_gib"] > 20
    assert plan_main(front + ["--host-memory-gb", "40"]) == 0  # 4 x 33 GiB of state do not fit 40 GiB
    small = json.loads(capsys.readouterr().out)["layouts"][0]["at_max"]
    assert not small["options"].get("optimizer_cpu_offload") and small["seq_len"] < at_max["seq_len"]
