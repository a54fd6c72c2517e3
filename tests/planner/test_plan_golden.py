"""Every number `megatron-tsp plan` prints, against its recorded output (tests/planner/golden/):
the plan tables of the recipes in configs/, every layout, every training flag, the frontier
search with each lever, inference, the errors of bad inputs, `plan validate`'s page, and the
planner's Python entry points other commands call (the probe's prediction, the frontier row, the
prefill row). A refactor of the planner must leave them byte for byte (JSON: value for value, to
the last bits a Python version's float sums round differently).

After an intended change of the formulas, rewrite the records and read their diff:
    python tests/planner/test_plan_golden.py --write
"""

import io
import json
import math
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(HERE, "golden")
R7 = "configs/7b_16k.yaml"
ALL_LAYOUTS_4 = ["--layout", "tsp4", "--layout", "tp4", "--layout", "tp_sp4", "--layout", "cp4", "--layout", "tp2xcp2",
                 "--layout", "fsdp_cp4"]
ALL_LAYOUTS_8 = ["--gpus-per-node", "8", "--layout", "tsp8", "--layout", "tsp2", "--layout", "tp8", "--layout",
                 "tp_sp2", "--layout", "cp8", "--layout", "tp2xcp4", "--layout", "tp4xcp2", "--layout", "fsdp_cp8"]
H100 = ["--gpu-memory-gb", "79.1", "--host-memory-gb", "400"]
TWO_NODES = ["--nodes", "2", "--hardware", "tests/planner/golden/two_nodes.yaml"]

# name -> the `megatron-tsp plan` arguments
CASES = {
    # the recipes of configs/ (the 7b ones in every output form)
    **{f"recipe_{name}": [f"configs/{name}.yaml"] for name in
       ("tiny", "tiny_moe", "7b_16k", "7b_32k", "7b_64k", "7b_128k", "7b_gqa_32k", "olmoe_1b_7b_4k",
        "olmoe_1b_7b_shared_4k")},
    **{f"recipe_{name}_json": [f"configs/{name}.yaml", "--json"] for name in
       ("7b_16k", "7b_32k", "7b_64k", "7b_128k", "7b_gqa_32k")},
    "recipe_7b_16k_gpn8": [R7, "--gpus-per-node", "8"],
    "recipe_7b_16k_two_nodes": [R7, *TWO_NODES, "--detail", "--layout", "tsp4", "--layout", "tp2xcp4", "--layout",
                                "cp8"],
    # every layout, with the detail tables
    "layouts_4_detail": [R7, *ALL_LAYOUTS_4, "--detail"],
    "layouts_4_json": [R7, *ALL_LAYOUTS_4, "--json"],
    "layouts_8_detail": [R7, *ALL_LAYOUTS_8, "--detail"],
    # the model from flags (no recipe)
    "flags_model": ["--layers", "32", "--hidden", "4096", "--heads", "32", "--ffn", "16384", "--vocab", "32000",
                    "--seq-len", "131072", "--gpus-per-node", "8", "--gpu-memory-gb", "192", "--json"],
    "flags_model_defaults": ["--layers", "8", "--hidden", "2048", "--heads", "16", "--kv-groups", "4", "--seq-len",
                             "32768", "--no-gated", "--dtype", "float16"],
    "flags_model_over_recipe": [R7, "--layers", "16", "--kv-groups", "8", "--ffn", "11008", "--vocab", "50304",
                                "--dtype", "float32", "--seq-len", "32768"],
    # every training flag
    "flags_train_all": [R7, "--micro-batch", "2", "--global-batch", "8", "--distributed-optimizer", "--recompute",
                        "full", "--recompute-method", "block", "--recompute-num-layers", "4", "--tsp-recompute",
                        "full", "--offload-activations", "--tsp-lm-head", "megatron", "--lm-head-chunk-tokens", "2048",
                        "--mlp-chunk-tokens", "4096", "--tsp-attention-kv", "streamed", "--cp-comm-type", "p2p",
                        "--document-length", "4096", "--norm", "torch", "--tsp-mlp-exchange", "tokens", "--detail"],
    "flags_train_all_json": [R7, "--micro-batch", "2", "--global-batch", "8", "--distributed-optimizer",
                             "--recompute", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2",
                             "--offload-activations", "--mlp-chunk-tokens", "8192", "--tsp-attention-kv", "streamed",
                             "--cp-comm-type", "p2p", "--document-length", "8192", "--norm", "fused",
                             "--tsp-mlp-exchange", "broadcast", "--json"],
    "flags_selective": [R7, "--recompute", "selective", "--layout", "tp_sp4", "--layout", "cp4", "--layout",
                        "tp2xcp2"],
    "flags_no_optimizer": [R7, "--optimizer", "none", "--tsp-mlp-exchange", "ring"],
    "flags_optimizer_offload": [R7, "--optimizer-cpu-offload", "--distributed-optimizer",
                                "--optimizer-offload-fraction", "0.5", "--host-memory-gb", "1000", "--detail"],
    "flags_recipe_keys": [R7, "parallel.recompute=full", "parallel.recompute_method=block",
                          "parallel.recompute_num_layers=4", "parallel.offload_activations=true",
                          "parallel.tsp_lm_head=megatron", "train.distributed_optimizer=true",
                          "train.micro_batch_size=2", "model.num_query_groups=8"],
    "flags_override_beats_recipe": [R7, "parallel.recompute=full", "parallel.offload_activations=true",
                                    "train.optimizer_cpu_offload=true", "train.distributed_optimizer=true",
                                    "--recompute", "none", "--no-offload-activations", "--no-optimizer-cpu-offload"],
    # mixture of experts
    "moe_ep2": ["configs/olmoe_1b_7b_4k.yaml", "--gpus-per-node", "4", "--expert-size", "2", "--detail"],
    "moe_ep4_json": ["configs/olmoe_1b_7b_shared_4k.yaml", "--expert-size", "4", "--json"],
    "moe_ep8_nodes": ["configs/olmoe_1b_7b_4k.yaml", *TWO_NODES, "--expert-size", "8", "--distributed-optimizer",
                      "--detail"],
    "moe_tiny_recompute": ["configs/tiny_moe.yaml", "--recompute", "full", "--mlp-chunk-tokens", "16"],
    # the frontier search: the docs' tables (docs/frontier.md) and every lever
    "frontier_7b": [R7, "--frontier"],
    "frontier_7b_json": [R7, "--frontier", "--json", "--max-seq-len", str(2**21)],
    "frontier_7b_tiled": [R7, "--frontier", "--mlp-chunk-tokens", "8192"],
    "frontier_7b_h100": [R7, "--frontier", *H100],
    "frontier_7b_h100_tiled": [R7, "--frontier", *H100, "--mlp-chunk-tokens", "8192"],
    "frontier_levers": [R7, "--frontier", "--tsp-attention-kv", "streamed", "--cp-comm-type", "p2p",
                        "--optimizer-cpu-offload", "--distributed-optimizer", "--mlp-chunk-tokens", "4096",
                        "--document-length", "8192", "--max-seq-len", str(2**21)],
    "frontier_no_host_adam": [R7, "--frontier", "--no-optimizer-cpu-offload", "--distributed-optimizer",
                              "--layout", "tsp4", "--layout", "tp_sp4", "--layout", "fsdp_cp4", "--layout", "tp2xcp2"],
    "frontier_8": [R7, "--frontier", "--gpus-per-node", "8", "--host-memory-gb", "560", "--layout", "tsp8",
                   "--layout", "tp2xcp4", "--max-seq-len", str(2**24)],
    "frontier_gqa": ["configs/7b_gqa_32k.yaml", "--frontier", "--layout", "tsp4", "--layout", "cp4",
                     "--max-seq-len", str(2**21)],
    "frontier_moe": ["configs/olmoe_1b_7b_4k.yaml", "--frontier", "--expert-size", "4", "--max-seq-len", str(2**20)],
    # inference
    "inference": [R7, "--inference"],
    "inference_json": [R7, "--inference", "--json", "--prompt-tokens", "131072", "--new-tokens", "128", "--batch",
                       "2", "--chunk-tokens", "4096", "--gpus-per-node", "8"],
    "inference_layouts": ["configs/7b_gqa_32k.yaml", "--inference", "--layout", "tsp4", "--layout", "tp2",
                          "--chunk-tokens", "0"],
    # errors: one line naming the flag or key
    **{f"error_{i}": argv for i, argv in enumerate([
        ["--layers", "0", "--hidden", "64", "--heads", "4", "--seq-len", "64"],
        ["--layers", "2", "--hidden", "64", "--heads", "5", "--seq-len", "64"],
        ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-groups", "3", "--seq-len", "64"],
        ["--layers", "2", "--hidden", "64", "--heads", "4"],
        ["--layers", "2", "--hidden", "64", "--seq-len", "64"],
        ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq-len", "64", "parallel.size=2"],
        [R7, "--layout", "tp2xcp4"],
        [R7, "--layout", "tsp3"],
        [R7, "--layout", "xyz4"],
        [R7, "--seq-len", "1000", "--layout", "tsp4"],
        [R7, "--seq-len", str(2**25)],
        [R7, "--recompute-num-layers", "2"],
        [R7, "--offload-activations"],
        [R7, "--recompute", "full", "--recompute-num-layers", "5", "--layout", "tsp4"],
        [R7, "--recompute", "full", "--recompute-num-layers", "64", "--layout", "tsp4"],
        [R7, "--recompute", "selective", "--layout", "tsp4"],
        [R7, "--lm-head-chunk-tokens", "0"],
        [R7, "--mlp-chunk-tokens", "-1"],
        [R7, "--document-length", "-1"],
        [R7, "--optimizer", "sgd"],
        [R7, "--optimizer-cpu-offload"],
        [R7, "--optimizer-cpu-offload", "--distributed-optimizer", "--optimizer-offload-fraction", "1.5"],
        [R7, "--optimizer-cpu-offload", "--distributed-optimizer", "--layout", "fsdp_cp4"],
        [R7, "--optimizer-cpu-offload", "--distributed-optimizer", "--dtype", "float32", "--layout", "tsp4"],
        [R7, "--optimizer", "none", "--optimizer-cpu-offload", "--distributed-optimizer"],
        [R7, "--global-batch", "3", "--layout", "tsp2"],
        [R7, "--micro-batch", "0"],
        [R7, "--expert-size", "2"],
        [R7, "--gpu-memory-gb", "-1"],
        [R7, "--host-memory-gb", "nan"],
        [R7, "--gpus-per-node", "0"],
        [R7, "--nodes", "0"],
        [R7, "--hardware", "nope"],
        [R7, "--frontier", "--max-seq-len", "1024"],
        [R7, "--frontier", "--max-seq-len", str(2**25)],
        [R7, "--inference", "--batch", "0"],
        [R7, "--inference", "--prompt-tokens", "0"],
        [R7, "--inference", "--layout", "tp_sp4"],
        ["configs/olmoe_1b_7b_4k.yaml", "--inference"],
        ["configs/olmoe_1b_7b_4k.yaml", "--expert-size", "3"],
        ["configs/olmoe_1b_7b_4k.yaml", "--expert-size", "2", "--layout", "fsdp_cp4"],
        ["configs/olmoe_1b_7b_4k.yaml", "--expert-size", "2", "--layout", "tp4"],
        ["configs/olmoe_1b_7b_4k.yaml", "--expert-size", "8", "--layout", "tsp4"],
        ["configs/olmoe_1b_7b_4k.yaml", "parallel.moe_dispatcher=allgather"],
        ["configs/olmoe_1b_7b_4k.yaml", "model.moe_expert_capacity_factor=1.0"],
        ["configs/olmoe_1b_7b_4k.yaml", "model.moe_router_load_balancing_type=sinkhorn"],
        ["configs/olmoe_1b_7b_4k.yaml", "model.moe_layer_freq=3"],
        ["configs/olmoe_1b_7b_4k.yaml", "model.moe_router_topk=99"],
        [R7, "model.add_bias_linear=true"],
        [R7, "model.position_embedding_type=learned_absolute"],
        [R7, "model.normalization=BatchNorm"],
        [R7, "model.num_layers=0"],
        [R7, "model.seq_length=0"],
        [R7, "parallel.pipeline_size=2"],
        [R7, "parallel.baseline_attention=local"],
        [R7, "parallel.tsp_compute_only=true"],
        [R7, "parallel.nope=1"],
        [R7, "nope.key=1"],
        [R7, "parallel.size"],
        [R7, "parallel.tsp_recompute=block"],
        [R7, "parallel.tsp_mlp_exchange=wire"],
        [R7, "parallel.tsp_attention_kv=nope"],
        [R7, "parallel.cp_comm_type=nope"],
        [R7, "parallel.tsp_lm_head=nope"],
        [R7, "parallel.offload_activations=3"],
        [R7, "train.optimizer_cpu_offload=3"],
        ["configs/nope.yaml"],
        [R7, "--tsp-recompute", "block"],
        [R7, "--norm", "apex"],
    ])},
}


def run_plan(argv):
    """(exit code, stdout, stderr) of `megatron-tsp plan ARGV` in this process (argparse's exits included)."""
    from megatron_tsp.planner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def record(name, argv):
    rc, out, err = run_plan(argv)
    if err.startswith("usage:"):  # argparse's refusal: its last line (the usage lists every flag)
        err = err.splitlines()[-1] + "\n"
    return f"$ megatron-tsp plan {' '.join(argv)}\nexit {rc}\n--- stdout\n{out}--- stderr\n{err}"


def api_records():
    """The planner's entry points other commands call, as JSON text (name -> text)."""
    import dataclasses

    from megatron_tsp.planner import Cluster, Layout, ModelSpec, TrainSpec, hardware
    from megatron_tsp.planner.frontier import layout_frontier
    from megatron_tsp.planner.prefill import prefill_plan
    from megatron_tsp.probe import predict

    out = {}
    for name, over, world in (("predict_tsp4", ["parallel.size=4"], 4),
                              ("predict_tp_sp2_cp2", ["parallel.layout=tp_sp", "parallel.context_size=2"], 4),
                              ("predict_fsdp_cp4", ["parallel.layout=dp", "parallel.context_size=4",
                                                    "parallel.fsdp=true"], 4),
                              ("predict_offload", ["parallel.size=4", "parallel.recompute=full",
                                                   "parallel.offload_activations=true",
                                                   "train.optimizer_cpu_offload=true",
                                                   "train.distributed_optimizer=true", "model.dtype=bfloat16"], 4),
                              ("predict_pipeline", ["parallel.pipeline_size=2"], 4)):
        out[name] = predict(os.path.join(REPO, R7), over, world, 4, None, "h200x4")
    model, seq = ModelSpec.from_recipe(os.path.join(REPO, R7))
    hw = hardware.load("h200x4")
    out["layout_frontier_cp4"] = layout_frontier(model, TrainSpec(seq_length=seq), Layout("cp", cp=4),
                                                 Cluster(gpus_per_node=4, gpu_memory_gib=79.1), hw, max_seq=2**20)
    out["prefill_tsp4"] = prefill_plan(model, Layout("tsp", tsp_size=4), 65536, hw, Cluster(gpus_per_node=4),
                                       new_tokens=16)
    out["model_fields"] = dataclasses.asdict(model)
    return {k: json.dumps(v, indent=1, sort_keys=True) + "\n" for k, v in out.items()}


def validate_page(tmp):
    from megatron_tsp.planner.cli import main

    path = os.path.join(tmp, "plan_validation.md")
    with redirect_stdout(io.StringIO()):
        assert main(["validate", "--out", path]) == 0
    return open(path).read()


def close(a, b) -> bool:
    """JSON values equal, floats to 1e-12 (Python 3.12's sum() rounds its last bit differently)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    return a == b


def _same(got, want, json_output):
    if json_output and "\nexit 0\n" in want:  # JSON: value for value, whatever the key order
        head, _, body = want.partition("--- stdout\n")
        ghead, _, gbody = got.partition("--- stdout\n")
        wjson, werr = body.split("--- stderr\n")
        gjson, gerr = gbody.split("--- stderr\n")
        return head == ghead and werr == gerr and close(json.loads(gjson), json.loads(wjson))
    return got == want


def _read(name):
    with open(os.path.join(GOLDEN, name)) as f:
        return f.read()


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_output_unchanged(name):
    got = record(name, CASES[name])
    assert _same(got, _read(f"{name}.txt"), "--json" in CASES[name]), f"{name}: the output changed:\n{got[:4000]}"


def test_planner_entry_points_unchanged():
    for name, text in api_records().items():
        assert close(json.loads(text), json.loads(_read(f"api_{name}.json"))), name


def test_validate_page_unchanged(tmp_path):
    assert validate_page(str(tmp_path)) == _read("plan_validation.md")


def write():
    import tempfile

    os.chdir(REPO)
    os.makedirs(GOLDEN, exist_ok=True)
    for name, argv in CASES.items():
        with open(os.path.join(GOLDEN, f"{name}.txt"), "w") as f:
            f.write(record(name, argv))
    for name, text in api_records().items():
        with open(os.path.join(GOLDEN, f"api_{name}.json"), "w") as f:
            f.write(text)
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(GOLDEN, "plan_validation.md"), "w") as f:
        f.write(validate_page(tmp))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        sys.exit("usage: python tests/planner/test_plan_golden.py --write")
