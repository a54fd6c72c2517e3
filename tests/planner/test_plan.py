"""The planner (`megatron-tsp plan`): formulas on hand-computable cases, errors, CLI, and the
validation bounds against the 4 x H200 measurements."""

import json
import os

import pytest

from megatron_tsp.planner.cli import main as plan_main
from megatron_tsp.planner import (GIB, Cluster, Layout, ModelSpec, PlanError, TrainSpec, candidate_layouts,
                                  comm_items, hardware, memory, plan_all, plan_layout, volume_per_layer)
from megatron_tsp.planner.formulas import tsp_saved_per_token

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
H = 4096
MHA = ModelSpec(num_layers=32, hidden_size=H, num_attention_heads=32, ffn_hidden_size=4 * H, vocab_size=32000)
GQA = ModelSpec(num_layers=32, hidden_size=H, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=4 * H, vocab_size=32000)
NODE4 = Cluster(gpus_per_node=4)


def fwd_volume(model, layout, S, B=1, cluster=NODE4, exchange="ring"):
    """docs/design.md §6's volumes move the MLP weights: the ring (auto would move tokens below 8K per rank)."""
    train = TrainSpec(seq_length=S, micro_batch_size=B, tsp_mlp_exchange=exchange)
    return volume_per_layer(comm_items(model, train, layout, cluster), "fwd")


@pytest.mark.parametrize("D", [2, 4])
def test_tsp_forward_volume_by_hand(D):
    S = 16384
    want = (D - 1) / D * (16 * H * H + 2 * S * H) * 2  # bf16 elements -> bytes
    assert fwd_volume(MHA, Layout("tsp", tsp_size=D), S) == pytest.approx(want)
    assert fwd_volume(MHA, Layout("tp_sp", tp=D), S) == pytest.approx(4 * (D - 1) / D * S * H * 2)


def test_tsp_vs_tp_sp_forward_crossover_at_8h_tokens():
    tsp, tpsp = Layout("tsp", tsp_size=4), Layout("tp_sp", tp=4)
    cross = 8 * H  # B*S = 8h = 32K tokens
    assert fwd_volume(MHA, tsp, cross) == pytest.approx(fwd_volume(MHA, tpsp, cross))
    assert fwd_volume(MHA, tsp, cross // 2) > fwd_volume(MHA, tpsp, cross // 2)
    assert fwd_volume(MHA, tsp, 2 * cross) < fwd_volume(MHA, tpsp, 2 * cross)
    # the crossover is in B*S, not S: two sequences of 16K cross too
    assert fwd_volume(MHA, tsp, cross // 2, B=2) == pytest.approx(fwd_volume(MHA, tpsp, cross // 2, B=2))


def test_gqa_lowers_the_kv_term():
    S, D = 65536, 4
    lay = Layout("tsp", tsp_size=D)
    diff = fwd_volume(MHA, lay, S) - fwd_volume(GQA, lay, S)
    kv_mha, kv_gqa = 32 * 128, 8 * 128
    # K/V all-gather: (D-1)/D * S * 2kv; weights: Wk, Wv shrink by h*(kv_mha - kv_gqa) each
    want = (D - 1) / D * (S * 2 * (kv_mha - kv_gqa) + 2 * H * (kv_mha - kv_gqa)) * 2
    assert diff == pytest.approx(want)
    assert diff > 0


def test_static_memory_is_18_bytes_per_parameter_and_the_distributed_optimizer_shards_12():
    P = MHA.total_params
    assert P == 32 * (16 * H * H + 2 * H) + 2 * 32000 * H + H
    lay = Layout("tsp", tsp_size=4)
    mem = memory(MHA, TrainSpec(seq_length=16384), lay, NODE4)
    assert mem.params + mem.grads + mem.optimizer == pytest.approx((P - 32 * 2 * H - H) / 4 * 18 + (32 * 2 * H + H) * 18)
    node8 = Cluster(gpus_per_node=8)  # TSP D=4 x DP 2
    plain = memory(MHA, TrainSpec(seq_length=16384, global_batch_size=2), lay, node8)
    dist = memory(MHA, TrainSpec(seq_length=16384, global_batch_size=2, distributed_optimizer=True), lay, node8)
    assert dist.optimizer == pytest.approx(plain.optimizer / 2)
    assert dist.params == plain.params and dist.grads == plain.grads


def test_tsp_activation_items_by_hand():
    block = tsp_saved_per_token(MHA, save_activations=False, norm="torch")
    assert sum(block.values()) == pytest.approx(2 * (8 * H + 4) + 2 * 2 * H + 4 * 128)
    save = tsp_saved_per_token(MHA, save_activations=True, norm="torch")
    extra = sum(save.values()) - sum(block.values())
    assert extra == pytest.approx(2 * (H + 2 * H + H) + 4 * 32 + 2 * 2 * 4 * H)  # q, k/v, o, lse, fc1 out


def test_tsp_memory_beats_tp_sp_and_recompute_modes_order():
    t = TrainSpec(seq_length=65536)
    tsp = memory(MHA, t, Layout("tsp", tsp_size=4), NODE4)
    tpsp = memory(MHA, t, Layout("tp_sp", tp=4), NODE4)
    assert tsp.peak < tpsp.peak
    block = memory(MHA, TrainSpec(seq_length=65536, tsp_recompute="full"), Layout("tsp", tsp_size=4), NODE4)
    assert block.activations < tsp.activations
    full = memory(MHA, TrainSpec(seq_length=65536, recompute="full"), Layout("tp_sp", tp=4), NODE4)
    assert full.activations < tpsp.activations


def test_candidate_layouts_of_one_8_gpu_node():
    labels = {lay.label for lay in candidate_layouts(Cluster(gpus_per_node=8))}
    for want in ("TSP D=2", "TSP D=4", "TSP D=8", "TP 8", "TP+SP 8", "CP 8", "FSDP-over-CP 8",
                 "TP+SP 2 x CP 4", "TP+SP 4 x CP 2"):
        assert want in labels


def test_paper_ordering_at_128k_on_8_gpus():
    hw = hardware.load("h200x4")
    cl = Cluster(gpus_per_node=8, gpu_memory_gib=178.8)
    t = TrainSpec(seq_length=131072)
    peak = {k: plan_layout(MHA, t, Layout.parse(k), cl, hw).memory.peak for k in ("tsp8", "tp_sp8", "tp2xcp4", "tp4xcp2")}
    assert peak["tsp8"] < peak["tp_sp8"] < min(peak["tp2xcp4"], peak["tp4xcp2"])


def test_measured_rows_within_bounds():
    """Every row measured on 4 x H200 (the 7B driver runs and the benchmark) is predicted within
    10% (memory) and 25% (time), or is a listed known exception (a measurement of older code, or
    FSDP-over-CP, whose model is not updated); every benchmark row of TSP and of the TP / CP
    baselines is within the bounds, TSP's memory within 2%."""
    from megatron_tsp.planner.validate import known_reason, load_file, validate

    rows, bad = validate(os.path.join(ROOT, "benchmarks", "results"))
    assert not [m.source for m in bad if "train_7b_h200x4" in m.source]
    train = [r for r in rows if "train_7b_h200x4" in r["m"].source]
    bench = [r for r in rows if "bench_h200x4" in r["m"].source]
    assert len(train) == 5 and len(bench) >= 20
    assert any(r["m"].compute_only for r in bench)
    for r in train + bench:
        m = r["m"]
        if r["mem_ok"] and r["time_ok"]:
            for err, bound in ((r["mem_err"], 0.10), (r["time_err"], 0.25)):
                assert err is None or abs(err) <= bound, (m.source, err)
        else:
            assert known_reason(m.source), (m.source, r["mem_err"], r["time_err"])
        if "bench_h200x4" in m.source and m.layout.kind != "fsdp_cp":
            assert r["mem_ok"] and r["time_ok"], (m.source, r["mem_err"], r["time_err"])
            if m.layout.kind == "tsp" and r["mem_err"] is not None:
                assert abs(r["mem_err"]) <= 0.02, (m.source, r["mem_err"])
    assert load_file(os.path.join(ROOT, "README.md"))[0].problem  # not a JSON: listed, not dropped


@pytest.mark.parametrize("build,message", [
    (lambda: ModelSpec(num_layers=2, hidden_size=4096, num_attention_heads=30), r"--hidden = 4096 must be divisible by --heads = 30"),
    (lambda: ModelSpec(num_layers=2, hidden_size=4096, num_attention_heads=32, num_query_groups=6), r"--heads = 32 must be divisible by --kv-groups = 6"),
    (lambda: plan_all(MHA, TrainSpec(seq_length=4096), NODE4, hardware.load("h200x4"), [Layout("tsp", tsp_size=8)]),
     r"layout TSP D=8 needs 8 GPUs per replica, which does not divide --gpus-per-node x --nodes = 4"),
    (lambda: plan_all(MHA, TrainSpec(seq_length=4096), Cluster(gpus_per_node=4, nodes=2), hardware.load("h200x4"),
                      [Layout("tsp", tsp_size=8)]), r"the TSP axis \(8\) must fit in one node"),
    (lambda: plan_all(ModelSpec(num_layers=2, hidden_size=3072, num_attention_heads=6, ffn_hidden_size=8192), TrainSpec(seq_length=4096), NODE4,
                      hardware.load("h200x4"), [Layout("tsp", tsp_size=4)]), r"--heads = 6 must be divisible by the layout TSP D=4"),
    (lambda: plan_all(MHA, TrainSpec(seq_length=1004), NODE4, hardware.load("h200x4"), [Layout("tsp", tsp_size=4)]),
     r"--seq-len = 1004 must be divisible by 2 x D = 8"),
    (lambda: hardware.load("mi300x_nonexistent"), r"--hardware 'mi300x_nonexistent': no such profile; available: .*h200x4"),
    (lambda: Layout.parse("zp4"), r"--layout 'zp4': expected one of"),
    (lambda: Layout("cp", tp=2, cp=2), r"--layout cp: tp = 2, but the kind takes cp$"),  # its mesh's sizes only
    (lambda: plan_all(MHA, TrainSpec(seq_length=4096), Cluster(gpus_per_node=4, nodes=4), hardware.load("h200x4"),
                      [Layout("tp_cp", tp=8, cp=2)]),
     r"layout TP\+SP 8 x CP 2: the TP axis \(8\) must fit in one node"),
    (lambda: plan_all(MHA, TrainSpec(seq_length=16384), Cluster(gpus_per_node=4, nodes=2), hardware.load("h200x4"),
                      [Layout("cp", cp=8)]), r"no inter-node link"),
    (lambda: TrainSpec(seq_length=16384, recompute="some"), r"parallel.recompute \(--recompute\) = 'some'"),
])
def test_bad_inputs_are_clear_errors(build, message):
    with pytest.raises(PlanError, match=message):
        build()


def test_unusable_candidates_are_listed_with_reasons():
    m = ModelSpec(num_layers=2, hidden_size=3072, num_attention_heads=6, ffn_hidden_size=8192, vocab_size=32000)
    plans, skipped = plan_all(m, TrainSpec(seq_length=4096), NODE4, hardware.load("h200x4"))
    reasons = {s.layout.label: s.reason for s in skipped}
    assert "--heads = 6 must be divisible" in reasons["TSP D=4"]
    assert any(p.layout.label == "TSP D=2" for p in plans)
    assert sum(p.fastest for p in plans) == 1


def test_cli_json_and_table(capsys):
    args = ["--layers", "32", "--hidden", "4096", "--heads", "32", "--ffn", "16384", "--vocab", "32000",
            "--seq-len", "65536", "--gpus-per-node", "4"]
    # as the measured runs ran (docs/plan_validation.md): TSP block recompute, composite norms, Megatron's head
    assert plan_main(args + ["--json", "--tsp-recompute", "full", "--norm", "torch", "--tsp-lm-head", "megatron"]) == 0
    data = json.loads(capsys.readouterr().out)
    by = {p["layout"]: p for p in data["plans"]}
    assert by["TSP D=4"]["fits"] and not by["TP+SP 4"]["fits"]
    assert by["TSP D=4"]["memory_gib"]["peak"] == pytest.approx(81.6, rel=0.1)
    assert plan_main(args + ["--layout", "tsp4", "--detail"]) == 0
    out = capsys.readouterr().out
    assert "TSP D=4" in out and "K/V all-gather" in out and "fastest" in out
    assert plan_main(["--layers", "2", "--hidden", "64", "--heads", "5", "--seq-len", "64"]) == 2
    assert "--hidden = 64 must be divisible by --heads = 5" in capsys.readouterr().err


def test_validate_command_writes_the_table(tmp_path):
    out = tmp_path / "v.md"
    assert plan_main(["validate", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| benchmarks/results/train_7b_h200x4.json#0 | TSP D=4 | 16K | 48.3 |" in text
    assert "The paper's 8-GPU 7B setting" in text


def test_peak_gib_units():
    mem = memory(MHA, TrainSpec(seq_length=16384), Layout("tsp", tsp_size=4), NODE4)
    assert mem.as_gib()["peak"] == pytest.approx(mem.peak / GIB)


def test_whole_step_crossover_at_13h_tokens_for_d4():
    """docs/design.md §6 (the first notes) said backward roughly doubles both; it does not: forward + backward,
    D=4, MHA, f=4h: TSP 39h^2 + 4.5 BSh vs TP+SP 7.5 BSh, equal at B*S = 13h."""
    def total(layout, S):
        items = comm_items(MHA, TrainSpec(seq_length=S, tsp_mlp_exchange="ring"), layout, NODE4)
        return volume_per_layer(items, "fwd") + volume_per_layer(items, "bwd")

    tsp, tpsp = Layout("tsp", tsp_size=4), Layout("tp_sp", tp=4)
    assert total(tsp, 13 * H) == pytest.approx(total(tpsp, 13 * H))
    assert total(tsp, 13 * H) == pytest.approx((39 * H * H + 4.5 * 13 * H * H) * 2)
    assert total(tsp, 8 * H) > total(tpsp, 8 * H)


def test_auto_mlp_exchange_moves_tokens_below_the_threshold():
    """`auto` resolves as TSPMLP.exchange does: tokens when a rank holds fewer than
    AUTO_TOKENS_BELOW tokens (B S / D), else the ring; the planner's items and memory follow."""
    from megatron_tsp.config import AUTO_TOKENS_BELOW
    from megatron_tsp.planner import mlp_exchange

    lay = Layout("tsp", tsp_size=4)
    below, at = TrainSpec(seq_length=4 * AUTO_TOKENS_BELOW - 8), TrainSpec(seq_length=4 * AUTO_TOKENS_BELOW)
    assert mlp_exchange(below, lay) == "tokens" and mlp_exchange(at, lay) == "ring"
    assert mlp_exchange(TrainSpec(seq_length=2 * AUTO_TOKENS_BELOW, micro_batch_size=2), lay) == "ring"  # B S / D
    assert mlp_exchange(TrainSpec(seq_length=16384, tsp_mlp_exchange="ring"), lay) == "ring"
    assert mlp_exchange(below, Layout("tp_sp", tp=4)) is None
    names = lambda t: {i.name for i in comm_items(MHA, t, lay, NODE4)}  # noqa: E731
    assert "MLP input all-gather (tokens)" in names(below) and "MLP weight ring" not in names(below)
    assert "MLP weight ring" in names(at) and "MLP input all-gather (tokens)" not in names(at)
    plan = plan_layout(MHA, below, lay, NODE4, hardware.load("h200x4"))
    assert any("MLP exchange: tokens (auto" in n for n in plan.notes)


def test_tokens_exchange_volume_and_saved_activations_by_hand():
    """The tokens MLP is Megatron's sequence-parallel MLP on the TSP group: forward all-gathers its
    input and reduce-scatters its output ((D-1)/D B S h b each), and it saves its intermediates
    over all S tokens at width f/D (gated: 5f/D) instead of the ring's fc1 output (2f per local token)."""
    S, D = 16384, 4
    lay = Layout("tsp", tsp_size=D)
    attn = (D - 1) / D * (4 * H * H + 2 * S * H) * 2
    assert fwd_volume(MHA, lay, S, exchange="tokens") == pytest.approx(attn + 2 * (D - 1) / D * S * H * 2)
    ring = tsp_saved_per_token(MHA, save_activations=True, exchange="ring")
    tokens = tsp_saved_per_token(MHA, save_activations=True, exchange="tokens")
    assert sum(tokens.values()) - sum(ring.values()) == pytest.approx(2 * (5 - 2) * 4 * H)
    assert sum(tsp_saved_per_token(MHA, save_activations=False, norm="torch", exchange="tokens").values()) == \
        pytest.approx(2 * (8 * H + 4) + 2 * 2 * H + 4 * 128 + 2 * 5 * 4 * H)  # Megatron's MLP ignores TSP recompute
    t_ring, t_tokens = (TrainSpec(seq_length=S, recompute="none", tsp_mlp_exchange=e) for e in ("ring", "tokens"))
    gap = memory(MHA, t_tokens, lay, NODE4).activations - memory(MHA, t_ring, lay, NODE4).activations
    assert gap == pytest.approx(2 * 3 * 4 * H * S / D * 32)


def test_tsp_kv_transfers_overlap_one_shard_behind():
    """Save mode: of each layer's K/V all-gathers (both directions) and dK/dV reduce-scatters, one
    shard's worth is exposed and D-1 overlap; with recompute the backward re-gather is synchronous."""
    D, S = 4, 65536
    lay = Layout("tsp", tsp_size=D)
    kv = (D - 1) / D * S * 2 * H * 2
    for tsp_recompute, exposed_bwd_gather in (("none", kv / D), ("full", kv)):
        items = comm_items(MHA, TrainSpec(seq_length=S, tsp_recompute=tsp_recompute), lay, NODE4)
        serial = {(i.phase, i.collective): 0.0 for i in items}
        for i in items:
            serial[i.phase, i.collective] += 0.0 if i.overlapped else i.volume
        assert serial["fwd", "all_gather"] == pytest.approx(kv / D)
        assert serial["bwd", "all_gather"] == pytest.approx(exposed_bwd_gather)
        assert serial["bwd", "reduce_scatter"] == pytest.approx(kv / D)
        assert volume_per_layer(items, "fwd") == pytest.approx(fwd_volume(MHA, lay, S))


def test_ring_hops_hide_only_behind_their_shards_gemms():
    """The MLP ring is posted a step ahead: hidden when a shard's GEMMs outlast a hop. At 64K per
    rank they do (no exposed ring time), at 4K per rank (16K, ring forced) the hop is longer."""
    from megatron_tsp.planner import step_time

    hw, lay = hardware.load("h200x4"), Layout("tsp", tsp_size=4)

    def ring_exposed(S):
        t = TrainSpec(seq_length=S, recompute="none", tsp_mlp_exchange="ring")
        items = comm_items(MHA, t, lay, NODE4)
        without = [i for i in items if "ring" not in i.name]
        return step_time(MHA, t, lay, NODE4, hw, items)["as_implemented"] - \
            step_time(MHA, t, lay, NODE4, hw, without)["as_implemented"]

    assert ring_exposed(262144) == pytest.approx(0.0, abs=1e-9)
    assert ring_exposed(16384) > 0.0


def test_cli_reads_the_mlp_exchange(capsys):
    args = ["--layers", "2", "--hidden", "4096", "--heads", "32", "--ffn", "16384", "--seq-len", "16384",
            "--gpus-per-node", "4", "--layout", "tsp4", "--json"]
    recipe = [os.path.join(ROOT, "configs", "7b_16k.yaml"), "parallel.tsp_mlp_exchange=ring", "--layout", "tsp4",
              "--json"]
    for argv, want in ((args, "tokens"), (args + ["--tsp-mlp-exchange", "broadcast"], "broadcast"),
                       (recipe, "ring"), (recipe + ["--tsp-mlp-exchange", "tokens"], "tokens")):
        assert plan_main(argv) == 0
        notes = json.loads(capsys.readouterr().out)["plans"][0]["notes"]
        assert any(n.startswith(f"MLP exchange: {want}") for n in notes), (argv, notes)


# -- issue 14: layer recompute, in-layer mode, lean norms, local LM head, offload, the frontier --

from megatron_tsp.planner import flops, step_time  # noqa: E402
from megatron_tsp.planner.formulas import lm_head_working_set, norm_saved  # noqa: E402

SMALL = ModelSpec(num_layers=8, hidden_size=H, num_attention_heads=32, ffn_hidden_size=4 * H, vocab_size=32000)


def _tsp_layer_bytes(model, train, D):
    """One TSP layer's saved activations (its in-layer mode), summed from the per-token items."""
    per_tok = tsp_saved_per_token(model, save_activations=train.tsp_recompute == "none", norm=train.norm,
                                  exchange="ring")
    return sum(per_tok.values()) * train.seq_length / D


def test_lean_norms_keep_their_input_and_per_token_statistics():
    """RMSNorm: input 2h B (bf16) + rstd 4 B; LayerNorm: + mean 4 B; torch's composite: 8h + 4."""
    assert norm_saved(MHA, "lean") == 2 * H + 4
    assert norm_saved(ModelSpec(num_layers=1, hidden_size=H, num_attention_heads=32, normalization="LayerNorm"), "lean") == 2 * H + 8
    assert norm_saved(MHA, "torch") == 8 * H + 4
    # TSP block mode per token: 2 norms + 2 block inputs (2h B each) + RoPE table slice (4 d)
    lean = tsp_saved_per_token(MHA, save_activations=False, norm="lean")
    assert sum(lean.values()) == 2 * (2 * H + 4) + 2 * 2 * H + 4 * 128
    # the baselines use TSPNorm too: TP+SP's norms item shrinks from 2(8h+4) to 2(2h+4) per token
    t_lean, t_torch = TrainSpec(seq_length=16384), TrainSpec(seq_length=16384, norm="torch")
    lay = Layout("tp_sp", tp=4)
    gap = memory(MHA, t_torch, lay, NODE4).detail["norms"] - memory(MHA, t_lean, lay, NODE4).detail["norms"]
    assert gap == pytest.approx(2 * 6 * H * 16384 / 4 * 32)


@pytest.mark.parametrize("tsp_recompute", ["none", "full"])
def test_full_uniform_recompute_keeps_one_input_per_chunk_by_hand(tsp_recompute):
    """recompute=full uniform N: ceil(L/N) inputs [S/D, h] bf16 stay; the backward of a chunk
    rebuilds N layers' activations under the in-layer mode (the working set). L = 8, D = 4,
    S = 64K: one input = 16384 x 4096 x 2 B = 128 MiB."""
    D, S = 4, 65536
    lay = Layout("tsp", tsp_size=D)
    inp = S / D * H * 2
    for N, inputs in ((1, 8), (2, 4), (4, 2)):
        t = TrainSpec(seq_length=S, recompute="full", recompute_num_layers=N, tsp_recompute=tsp_recompute,
                      tsp_mlp_exchange="ring")
        mem = memory(SMALL, t, lay, NODE4)
        key = f"checkpointed layer inputs (full uniform N={N}: {inputs} of {inputs} on the GPU)"
        assert mem.detail[key] == pytest.approx(inputs * inp)
        assert mem.recompute_working_set == pytest.approx(N * _tsp_layer_bytes(SMALL, t, D))
        assert "q (all shards)" not in mem.detail and "norms" not in mem.detail  # no layer saves its activations
    none = memory(SMALL, TrainSpec(seq_length=S, tsp_recompute=tsp_recompute, tsp_mlp_exchange="ring"), lay, NODE4)
    full = memory(SMALL, TrainSpec(seq_length=S, recompute="full", tsp_recompute=tsp_recompute, tsp_mlp_exchange="ring"),
                  lay, NODE4)
    # saved activations: 8 layers' worth -> 8 inputs
    assert none.activations - full.activations == pytest.approx(8 * (_tsp_layer_bytes(SMALL, t, D) - inp))
    assert full.peak < none.peak


def test_full_block_recompute_by_hand():
    """block N = 3 of L = 8: 3 inputs, 5 layers save everything, one layer rebuilt at a time,
    and the step runs 3/8 of a forward more: matmul FLOPs + 3/8 x 2 S P_layer L / D."""
    D, S = 4, 65536
    lay = Layout("tsp", tsp_size=D)
    t = TrainSpec(seq_length=S, recompute="full", recompute_method="block", recompute_num_layers=3, tsp_mlp_exchange="ring")
    mem = memory(SMALL, t, lay, NODE4)
    assert mem.detail["checkpointed layer inputs (full block N=3: 3 of 3 on the GPU)"] == pytest.approx(3 * S / D * H * 2)
    assert mem.detail["q (all shards)"] == pytest.approx(5 * S / D * 2 * H)  # q: 2h B per token, 5 layers
    assert mem.recompute_working_set == pytest.approx(_tsp_layer_bytes(SMALL, t, D))
    base = TrainSpec(seq_length=S, tsp_mlp_exchange="ring")
    fwd_mm = 2 * S * SMALL.layer_matmul_params * 8 / D
    assert flops(SMALL, t, lay)["matmul"] - flops(SMALL, base, lay)["matmul"] == pytest.approx(3 / 8 * fwd_mm)
    fwd_attn = 2 * S * S * SMALL.q_dim * 8 / D
    assert flops(SMALL, t, lay)["attention"] - flops(SMALL, base, lay)["attention"] == pytest.approx(3 / 8 * fwd_attn)
    # default N for block: every layer (the same memory as uniform N = 1)
    all_block = memory(SMALL, TrainSpec(seq_length=S, recompute="full", recompute_method="block", tsp_mlp_exchange="ring"),
                       lay, NODE4)
    uniform = memory(SMALL, TrainSpec(seq_length=S, recompute="full", tsp_mlp_exchange="ring"), lay, NODE4)
    assert all_block.peak == pytest.approx(uniform.peak)


def test_full_recompute_around_tsp_block_mode_runs_two_more_forwards():
    """tsp_recompute=full inside recompute=full: Megatron reruns the layer forward, and TSP's
    block backward recomputes each shard again: attention forward FLOPs x (1 + 1 + 1)."""
    D, S = 4, 65536
    lay = Layout("tsp", tsp_size=D)
    fwd_attn = 2 * S * S * MHA.q_dim * 32 / D
    t = TrainSpec(seq_length=S, recompute="full", tsp_recompute="full", tsp_mlp_exchange="ring")
    assert flops(MHA, t, lay)["attention"] == pytest.approx(fwd_attn * 3 + 2.5 * fwd_attn)
    # and the baselines' layer recompute reruns the forward's collectives in backward
    tpsp = Layout("tp_sp", tp=4)
    items = comm_items(MHA, TrainSpec(seq_length=S, recompute="full"), tpsp, NODE4)
    plain = comm_items(MHA, TrainSpec(seq_length=S), tpsp, NODE4)
    assert volume_per_layer(items, "bwd") - volume_per_layer(plain, "bwd") == \
        pytest.approx(volume_per_layer(plain, "fwd"))


def test_offload_keeps_two_inputs_on_the_gpu_and_costs_host_copies():
    """offload: of L = 8 checkpointed inputs 2 are on the GPU (in use + prefetched), 8 in host
    memory; each goes out in forward and back in backward at the profile's host bandwidth
    (50 GB/s assumed): 8 x 128 MiB / 50e9 s each way."""
    D, S = 4, 65536
    lay = Layout("tsp", tsp_size=D)
    inp = S / D * H * 2
    t = TrainSpec(seq_length=S, recompute="full", offload_activations=True, tsp_mlp_exchange="ring")
    mem = memory(SMALL, t, lay, NODE4)
    assert mem.detail["checkpointed layer inputs (full uniform N=1: 2 of 8 on the GPU)"] == pytest.approx(2 * inp)
    assert mem.host_offload == pytest.approx(8 * inp)
    no = memory(SMALL, TrainSpec(seq_length=S, recompute="full", tsp_mlp_exchange="ring"), lay, NODE4)
    assert no.peak - mem.peak == pytest.approx(6 * inp)
    copies = [i for i in comm_items(SMALL, t, lay, NODE4) if i.collective == "host_copy"]
    assert [i.volume for i in copies] == pytest.approx([8 * inp, 8 * inp])
    hw = hardware.load("h200x4")
    assert hw.host_gb_s == 50.0
    # hidden behind the compute (a step of seconds); with nothing to hide behind it would cost
    # 2 x 8 x 128 MiB / 50 GB/s = 43 ms
    slow = step_time(SMALL, t, lay, NODE4, hw)
    ref = step_time(SMALL, TrainSpec(seq_length=S, recompute="full", tsp_mlp_exchange="ring"), lay, NODE4, hw)
    assert slow["comm_s"] - ref["comm_s"] == pytest.approx(2 * 8 * inp / 50e9)
    assert slow["as_implemented"] == pytest.approx(ref["as_implemented"])
    # the offloaded inputs of the node's 4 GPUs must fit its host memory: 4 x 8 x 128 MiB = 4 GiB
    assert plan_layout(SMALL, t, lay, Cluster(4, host_memory_gib=4.0), hw).fits
    assert not plan_layout(SMALL, t, lay, Cluster(4, host_memory_gib=3.9), hw).fits


def test_local_lm_head_working_set_by_hand():
    """local: 4096 tokens x V/D fp32 logits + the vocab shard and its gradient (V/D x h bf16);
    Megatron's: all S tokens x V/D in fp32 and bf16. D = 4, S = 64K, V = 32000."""
    D, S, V = 4, 65536, 32000
    lay = Layout("tsp", tsp_size=D)
    local = lm_head_working_set(MHA, TrainSpec(seq_length=S), lay)
    assert sum(local.values()) == pytest.approx(4096 * V / D * 4 + 2 * V / D * H * 2)
    short = lm_head_working_set(MHA, TrainSpec(seq_length=S, lm_head_chunk_tokens=1024), lay)
    assert sum(short.values()) == pytest.approx(1024 * V / D * 4 + 2 * V / D * H * 2)
    meg = lm_head_working_set(MHA, TrainSpec(seq_length=S, tsp_lm_head="megatron"), lay)
    assert sum(meg.values()) == pytest.approx(S * V / D * 6)
    # the baselines always run Megatron's head
    assert sum(lm_head_working_set(MHA, TrainSpec(seq_length=S), Layout("tp_sp", tp=4)).values()) == \
        pytest.approx(S * V / 4 * 6)
    # the local head recomputes each chunk's logits in backward: 8 S h V / D FLOPs instead of 6
    fl = lambda head: flops(MHA, TrainSpec(seq_length=S, tsp_lm_head=head), lay)["matmul"]  # noqa: E731
    assert fl("local") - fl("megatron") == pytest.approx(2 * S * H * V / D)
    # and saves one fp32 log-sum-exp per local token (megatron_tsp/lm_head.py)
    mem = memory(MHA, TrainSpec(seq_length=S, tsp_mlp_exchange="ring"), lay, NODE4)
    assert mem.detail["LM-head log-sum-exp"] == pytest.approx(4 * S / D)


def test_selective_recompute_of_the_baselines_by_hand():
    """selective (core attention) with SDPA: q, k, v are saved anyway, the log-sum-exp is not
    (4 a / T per token and layer), and the attention forward runs again."""
    S = 65536
    lay = Layout("tp_sp", tp=4)
    none, sel = TrainSpec(seq_length=S), TrainSpec(seq_length=S, recompute="selective")
    gap = memory(MHA, none, lay, NODE4).activations - memory(MHA, sel, lay, NODE4).activations
    assert gap == pytest.approx(4 * 32 / 4 * S * 32)
    fwd_attn = 2 * S * S * MHA.q_dim * 32 / 4
    assert flops(MHA, sel, lay)["attention"] - flops(MHA, none, lay)["attention"] == pytest.approx(fwd_attn)


@pytest.mark.parametrize("build,message", [
    (lambda: TrainSpec(seq_length=64, tsp_recompute="block"), r"parallel.tsp_recompute \(--tsp-recompute\) = 'block'"),
    (lambda: TrainSpec(seq_length=64, recompute="full", recompute_method="random"), r"parallel.recompute_method"),
    (lambda: TrainSpec(seq_length=64, recompute="full", recompute_num_layers=0), r"parallel.recompute_num_layers"),
    (lambda: TrainSpec(seq_length=64, recompute_num_layers=2), r"parallel.recompute_num_layers = 2 needs parallel.recompute = full"),
    (lambda: TrainSpec(seq_length=64, offload_activations=True), r"parallel.offload_activations = true needs parallel.recompute = full"),
    (lambda: TrainSpec(seq_length=64, tsp_lm_head="vocab"), r"parallel.tsp_lm_head \(--tsp-lm-head\) = 'vocab'"),
    (lambda: TrainSpec(seq_length=64, lm_head_chunk_tokens=0), r"parallel.lm_head_chunk_tokens"),
    (lambda: TrainSpec(seq_length=64, mlp_chunk_tokens=-1), r"parallel.mlp_chunk_tokens \(--mlp-chunk-tokens\) must be a non-negative"),
    (lambda: TrainSpec(seq_length=64, norm="apex"), r"--norm = 'apex'"),
    (lambda: TrainSpec(seq_length=64, tsp_attention_kv="ring"),
     r"parallel.tsp_attention_kv \(--tsp-attention-kv\) = 'ring'"),
    (lambda: plan_all(SMALL, TrainSpec(seq_length=4096, recompute="full", recompute_num_layers=9), NODE4,
                      hardware.load("h200x4"), [Layout("tsp", tsp_size=4)]),
     r"parallel.recompute_num_layers = 9 is more than the layers per stage \(8\)"),
    (lambda: plan_all(SMALL, TrainSpec(seq_length=4096, recompute="full", recompute_num_layers=3), NODE4,
                      hardware.load("h200x4"), [Layout("tsp", tsp_size=4)]),
     r"parallel.recompute_num_layers = 3 must divide the 8 layers per stage"),
    (lambda: plan_all(SMALL, TrainSpec(seq_length=4096, recompute="selective"), NODE4, hardware.load("h200x4"),
                      [Layout("tsp", tsp_size=4)]), r"parallel.recompute = selective is for the baselines"),
])
def test_bad_memory_options_are_clear_errors(build, message):
    with pytest.raises(PlanError, match=message):
        build()


RECIPE = os.path.join(ROOT, "configs", "7b_16k.yaml")


@pytest.mark.parametrize("override,message", [
    ("parallel.tsp_recompute=sometimes", "parallel.tsp_recompute (--tsp-recompute) = 'sometimes'"),
    ("parallel.pipeline_size=2", "parallel.pipeline_size = 2: pipeline stages are not modelled"),
    ("parallel.baseline_attention=local", "parallel.baseline_attention = 'local'"),
    ("parallel.no_such_key=1", "unknown recipe key parallel.no_such_key"),
    ("model.add_bias_linear=true", "model.add_bias_linear = true"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
])
def test_recipe_values_the_planner_cannot_model_are_errors(capsys, override, message):
    assert plan_main([RECIPE, override, "--layout", "tsp4"]) == 2
    assert message in capsys.readouterr().err


def test_cli_reads_the_recipe_memory_options(capsys, monkeypatch):
    """parallel.tsp_recompute is read from the recipe (it was ignored), and so are the layer
    recompute, offload and LM-head keys."""

    def notes(argv):
        assert plan_main(argv + ["--layout", "tsp4", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["plans"][0]["notes"]

    assert any("TSP in-layer full" in n for n in notes([RECIPE, "parallel.tsp_recompute=full"]))
    assert any("TSP in-layer none" in n for n in notes([RECIPE]))
    assert any("TSP in-layer none" in n for n in notes([RECIPE, "parallel.tsp_recompute=full", "--tsp-recompute",
                                                        "none"]))
    got = notes([RECIPE, "parallel.recompute=full", "parallel.recompute_method=block", "parallel.recompute_num_layers=4",
                 "parallel.offload_activations=true", "parallel.tsp_lm_head=megatron"])
    assert any("layers block N=4, checkpointed inputs offloaded to host" in n for n in got), got
    assert "LM head: megatron" in got


def test_every_recipe_key_is_modelled_or_refused_or_irrelevant_to_the_plan():
    """The planner reads its recipe keys from the one option definition (config.RECIPE_SECTIONS):
    a modelled key is a ModelSpec / TrainSpec field of the same name (RECIPE_KEYS is derived from
    the fields); a key added there must be placed here, so `plan RECIPE` never silently ignores a
    key it models."""
    from megatron_tsp.config import recipe_keys
    from megatron_tsp.planner.model import RECIPE_KEYS

    refused = {"model.add_bias_linear", "model.position_embedding_type", "parallel.pipeline_size",
               "parallel.baseline_attention", "parallel.tsp_compute_only", "model.moe_expert_capacity_factor",
               "parallel.moe_dispatcher"}
    # the planner plans every layout and size itself; run-time, kernel, data and logging keys cost no memory;
    # token dropping's policy only acts with a capacity factor (refused)
    not_planned = {"model.init_method_std", "model.cpu_init", "parallel.layout", "parallel.size",
                   "parallel.context_size", "parallel.fsdp", "parallel.tsp_attention_backend",
                   "parallel.high_priority_comm", "parallel.comm_max_ctas", "parallel.gemm_sm_carveout",
                   "model.moe_token_drop_policy"}
    not_planned |= {k for k in recipe_keys() if k.startswith(("train.", "data."))} - set(RECIPE_KEYS)
    assert not (set(RECIPE_KEYS) & (refused | not_planned))
    placed = refused | not_planned | set(RECIPE_KEYS)
    assert set(recipe_keys()) == placed, (set(recipe_keys()) - placed, placed - set(recipe_keys()))
    assert {"model.moe_router_topk", "parallel.tsp_recompute", "train.micro_batch_size"} <= set(RECIPE_KEYS)


def test_planner_fields_take_the_recipe_defaults():
    """A ModelSpec / TrainSpec field named as a recipe key has that key's default (declared once, in
    megatron_tsp.config), except the planner's own defaults listed here with the reason."""
    import dataclasses

    from megatron_tsp.config import RECIPE_SECTIONS, field_default
    from megatron_tsp.planner.model import ModelSpec, TrainSpec

    own = {"ffn_hidden_size": None,  # 4h, Megatron's default (the tiny recipe's 128 is no default for a 7B)
           "vocab_size": 32000, "dtype": "bfloat16",  # a real model on GPUs, not the tiny CPU recipe
           "micro_batch_size": 1, "global_batch_size": None,  # one sequence per replica, any data-parallel size
           "tsp_lm_head": "local",  # the recipe's null means local under tsp
           "num_layers": dataclasses.MISSING, "hidden_size": dataclasses.MISSING,  # required
           "num_attention_heads": dataclasses.MISSING, "seq_length": dataclasses.MISSING}
    recipe = {f.name: field_default(f) for cls in RECIPE_SECTIONS.values() for f in dataclasses.fields(cls)}
    checked = 0
    for spec in (ModelSpec, TrainSpec):
        for f in dataclasses.fields(spec):
            if f.name not in recipe:
                continue
            checked += 1
            want = own.get(f.name, recipe[f.name])
            assert f.default == want, f"{spec.__name__}.{f.name} defaults to {f.default!r}, the recipe's is {want!r}"
    assert checked >= 25, checked


def test_plan_imports_neither_torch_nor_megatron():
    import subprocess
    import sys

    code = ("import sys; from megatron_tsp.planner.cli import main; main([%r, '--layout', 'tsp4', '--frontier', "
            "'--max-seq-len', '65536']); bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')]; "
            "assert not bad, bad[:5]" % RECIPE)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_frontier_json(capsys):
    """Per layout: fitting contexts form a prefix of the powers of two (memory is monotone in S),
    the configuration chosen at 2S also fits at S and is no faster there than the one chosen at
    S, max_seq_len fits (re-planned with its options) and the next multiple of 2 x size x 1024
    does not fit with any configuration. (Tokens/s/GPU may rise from 16K to 32K where the
    per-step optimizer dominates, so it is not required to fall.)"""
    import dataclasses

    from megatron_tsp.planner import frontier as fr

    # 4M: with the baselines' in-layer peaks as measured (issue 25) TP+SP 4 reaches 1M too
    assert plan_main([RECIPE, "--frontier", "--json", "--gpus-per-node", "4", "--max-seq-len", str(2**22)]) == 0
    data = json.loads(capsys.readouterr().out)
    hw = hardware.load("h200x4")
    model, seq = ModelSpec.from_recipe(RECIPE)
    base = TrainSpec(seq_length=seq)
    by = {r["layout"]: r for r in data["layouts"]}
    assert {"TSP D=4", "TP+SP 4", "FSDP-over-CP 4", "TP+SP 2 x CP 2"} <= set(by)
    for r in data["layouts"]:
        fits = [c["fits"] for c in r["contexts"]]
        assert fits == sorted(fits, reverse=True), r["layout"]  # a prefix fits
        if r["max_seq_len"] is None:
            continue
        lay = next(x for x in fr.candidate_layouts(Cluster(4)) if x.label == r["layout"])

        def spec(opts, S):
            return dataclasses.replace(base, seq_length=S, recompute=opts["recompute"],
                                       recompute_method=opts.get("recompute_method", "uniform"),
                                       recompute_num_layers=opts.get("recompute_num_layers"),
                                       offload_activations=opts.get("offload_activations", False),
                                       tsp_recompute=opts.get("tsp_recompute", "none"),
                                       tsp_lm_head=opts.get("tsp_lm_head", "local"),
                                       tsp_attention_kv=opts.get("tsp_attention_kv", "gathered"),
                                       cp_comm_type=opts.get("cp_comm_type", "all_gather"),
                                       optimizer_cpu_offload=opts.get("optimizer_cpu_offload", False),
                                       distributed_optimizer=opts.get("optimizer_cpu_offload", False))

        fitting = [c for c in r["contexts"] if c["fits"]]
        for small, large in zip(fitting, fitting[1:]):
            p = plan_layout(model, spec(large["options"], small["seq_len"]), lay, Cluster(4), hw)
            assert p.fits and p.time["tokens_per_s_per_gpu"] <= small["tokens_per_s_per_gpu"] * (1 + 1e-9)
        assert memory(model, spec(r["at_max"]["options"], r["max_seq_len"]), lay, Cluster(4)).peak <= 139.8 * GIB
        if not r["capped"]:
            step = 2 * lay.size * 1024
            assert fr._Search(model, base, lay, Cluster(4), hw).best(r["max_seq_len"] + step) is None, r["layout"]
    tsp = by["TSP D=4"]
    assert tsp["max_seq_len"] > by["TP+SP 4"]["max_seq_len"]
    assert tsp["at_max"]["options"]["tsp_lm_head"] == "local"  # S x V/D logits never fit there


def test_tsp_mlp_shard_backward_working_set_by_hand():
    """megatron_tsp/mlp.py shard_backward: six [S/D, f/D] tensors alive together (act(gate),
    up + offset, their product; d product, d act(gate), d up), dx and the incoming gradient
    [S/D, h]; with recompute the shard's fc1 output [S/D, 2f/D] too. The final norm's and the LM
    head's saved inputs are released before the last layer's backward."""
    from megatron_tsp.planner.formulas import tsp_mlp_in_flight

    S = 65536
    for D in (1, 2, 4):
        s = S / D
        for rec, extra in (("none", 0), ("full", 2)):
            t = TrainSpec(seq_length=S, tsp_recompute=rec, tsp_mlp_exchange="ring")
            _, scratch = tsp_mlp_in_flight(MHA, t, Layout("tsp", tsp_size=D))
            assert scratch == pytest.approx(s * 2 * ((6 + extra) * 4 * H / D + 2 * H)), (D, rec)
    gelu = ModelSpec(num_layers=2, hidden_size=H, num_attention_heads=32, ffn_hidden_size=4 * H, swiglu=False)
    _, scratch = tsp_mlp_in_flight(gelu, TrainSpec(seq_length=S, tsp_mlp_exchange="ring"), Layout("tsp", tsp_size=4))
    assert scratch == pytest.approx(S / 4 * 2 * (3 * 4 * H / 4 + 2 * H))  # act(h1), d act, d h1
    lay = Layout("tsp", tsp_size=1)
    mem = memory(SMALL, TrainSpec(seq_length=S, tsp_recompute="full", tsp_mlp_exchange="ring"), lay, Cluster(gpus_per_node=1))
    head = mem.detail["final norm and LM-head input"] + mem.detail["LM-head log-sum-exp"]
    assert mem.peak_point == "layer backward (MLP)"
    assert mem.at_peak["saved activations"] == pytest.approx(mem.activations - head)


def test_one_h200_d1_rows_within_5_percent():
    """Issue 14: every mode measured on one H200 at D = 1 (benchmarks/frontier_d1.py, 7B width,
    4 layers, 128K and 256K) is predicted within 5%, asked as frontier_d1.predict asks (the
    recipe with the row's overrides, its norms); the OOM row is predicted over the GPU's memory."""
    from megatron_tsp.planner.model import recipe_train_options

    recipe = os.path.join(ROOT, "configs", "7b_16k.yaml")
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "benchmarks", "results", "frontier_d1_h200.jsonl"))]
    rows = [r for r in rows if "mode" in r]
    assert len(rows) >= 11 and any(r["measured"]["oom"] for r in rows)
    for r in rows:
        model, seq = ModelSpec.from_recipe(recipe, r["overrides"])
        train = TrainSpec(seq_length=seq, global_batch_size=1, norm=r["predicted"]["norm"],
                          **recipe_train_options(recipe, r["overrides"]))
        p = plan_layout(model, train, Layout("tsp", tsp_size=1), Cluster(gpus_per_node=1, gpu_memory_gib=139.8),
                        hardware.load("h200x4"))
        if r["measured"]["oom"]:
            assert not p.fits, (r["mode"], seq, p.memory.peak / GIB)
        else:
            ratio = r["measured"]["peak_allocated_gib"] * GIB / p.memory.peak
            assert abs(ratio - 1) <= 0.05, (r["mode"], seq, ratio)


def test_fake_pg_frontier_rows_within_3_percent():
    """Issue 25: the per-rank peaks measured on one H100 with torch's fake process group (DESIGN.md
    §11; 7B width, 4 and 32 layers, 256K / 512K, full uniform N=1, 4 and 8 ranks, TSP and the
    baselines), asked with the row's recipe overrides, are predicted within 3% (the planner was
    14-20% over the baselines before the in-layer peaks were corrected). One row is not explained:
    FSDP over CP with activation offload on 4 ranks measured 4.6 GiB (6.5%) above the prediction
    (the same layout without offload, and TSP with offload, are within 1%), allowed 7%. It was 5%
    before the CP attention's saved tensors lost the [S / C, kv / T] the CP path does not keep
    (native_saved), which the CPU probe and the 256K rows (test_probe_h100_256k_rows_above_step_start)
    confirm; a guess, not modelled: with offload nothing shrinks through the backward, so the peak
    moves to the last layers' backward, where FSDP2's sharded gradients of the other 31 layers
    (about 3.9 GiB in bf16) exist."""
    from megatron_tsp.planner.formulas import memory
    from megatron_tsp.planner.model import recipe_train_options

    rows = [json.loads(line) for line in open(os.path.join(ROOT, "benchmarks", "results", "fake_pg_frontier_h100.jsonl"))]
    assert len(rows) == 10 and {r["layout"] for r in rows} == {"tsp", "tp_sp", "cp", "fsdp_cp"}
    for r in rows:
        model, seq = ModelSpec.from_recipe(RECIPE, r["overrides"])
        train = TrainSpec(seq_length=seq, norm="lean", **recipe_train_options(RECIPE, r["overrides"]))
        n = r["ranks"]
        lay = {"tsp": Layout("tsp", tsp_size=n), "tp_sp": Layout("tp_sp", tp=n), "cp": Layout("cp", cp=n),
               "fsdp_cp": Layout("fsdp_cp", cp=n)}[r["layout"]]
        ratio = r["measured"]["peak_allocated_gib"] * GIB / memory(model, train, lay, Cluster(gpus_per_node=n)).peak
        tol = 0.07 if (r["layout"] == "fsdp_cp" and r["offload_activations"] and n == 4) else 0.03
        assert abs(ratio - 1) <= tol, (r["layout"], n, r["layers"], r["seq_len"], ratio)


def test_probe_h100_256k_rows_above_step_start():
    """The `megatron-tsp probe` rows on one H100 at 256K (7B width, 4 layers, 4 ranks, full uniform
    N=1; benchmarks/results/probe_h100_256k_above_start.jsonl). They ran in one process and later rows
    carry earlier probes' models, so each compares its peak ABOVE THE STEP'S STARTING ALLOCATION with
    the planner's peak above `Memory.step_start` (the states and the buffers kept across steps:
    Megatron's sequence-parallel all-gather buffer, the RoPE table). Compared with the states alone
    the planner was 8% over TP+SP and 7% over TP+SP x CP (the buffer, [B S / C, h], is in the start)
    and 2% over CP (the CP attention's saved tensors, native_saved). The forward's end above the
    start is the saved activations and Megatron's LM head's fp32 logits (`Memory.kept_at_loss`)."""
    from megatron_tsp.planner.formulas import memory
    from megatron_tsp.planner.model import recipe_layout, recipe_train_options

    rows = [json.loads(line) for line in
            open(os.path.join(ROOT, "benchmarks", "results", "probe_h100_256k_above_start.jsonl"))]
    assert len(rows) == 5 and all("above the step's starting allocation" in r["compare"] for r in rows)
    for r in rows:
        model, seq = ModelSpec.from_recipe(RECIPE, r["overrides"])
        train = TrainSpec(seq_length=seq, norm="lean", **recipe_train_options(RECIPE, r["overrides"]))
        mem = memory(model, train, recipe_layout(RECIPE, r["overrides"]), Cluster(gpus_per_node=r["ranks"]))
        m = r["measured"]
        ratio = m["peak_above_start_gib"] * GIB / (mem.peak - mem.step_start)
        assert abs(ratio - 1) <= 0.03, (r["layout"], ratio)
        kept = m["kept_activations_gib"] * GIB / (mem.forward_end - mem.step_start)
        assert abs(kept - 1) <= 0.01, (r["layout"], kept)
        if r["fresh_process"]:  # the first row's start holds nothing of an earlier probe
            assert abs(m["peak_allocated_gib"] * GIB / mem.peak - 1) <= 0.03, (r["layout"], mem.peak / GIB)


def test_attention_backward_point_excludes_the_mlp_saved_tensors():
    """Issue 25: the layer's MLP backward runs first and frees what the MLP saved; the attention
    backward point counts one layer's rebuilt tensors without them (CPU probe: TSP's attention
    backward peak = the old attention point less the fc1 outputs of all shards), and the peak
    is the largest point."""
    from megatron_tsp.planner import formulas as F

    model, _ = ModelSpec.from_recipe(RECIPE, ["model.num_layers=4"])
    S, b, h = 2**19, model.dtype_bytes, model.hidden_size
    s = S / 4
    train = TrainSpec(seq_length=S, recompute="full", recompute_method="uniform", recompute_num_layers=1)
    # TSP: the fc1 outputs of all shards and the MLP function's input; Megatron: the MLP's
    # intermediates and linear_fc1's input
    for lay, in_flight, mlp in ((Layout("tsp", tsp_size=4), F.tsp_attention_in_flight, (2 * model.f + h) * b * s),
                                (Layout("cp", cp=4), F.baseline_attention_in_flight, (5 * model.f + h) * b * s)):
        mem = F.memory(model, train, lay, Cluster(gpus_per_node=4))
        static = mem.params + mem.grads + mem.optimizer + F.rope_table(model, train, lay)
        expected = static + 4 * b * h * s + mem.recompute_working_set - mlp + sum(in_flight(model, train, lay))
        assert mem.points["checkpointed layer backward (attention)"] == pytest.approx(expected), lay.label
        assert mem.peak == max(mem.points.values())


@pytest.mark.parametrize("flags,message", [
    (["--gpus-per-node", "0"], "--gpus-per-node must be a positive integer, got 0"),  # was: the profile's 4, silently
    (["--nodes", "0"], "--nodes must be a positive integer, got 0"),
    (["--seq-len", "0"], "--seq-len (model.seq_length) must be a positive integer, got 0"),  # was: the recipe's
    (["--seq-len", str(10**12)], f"--seq-len (model.seq_length) = {10**12} exceeds the longest context the planner "
                                 "models, 16777216 tokens"),  # was: a table with "MFU 62%", exit 0
    (["--seq-len", "1e12"], "argument --seq-length/--seq-len: invalid int value: '1e12'"),
    (["model.seq_length=33554432"], "model.seq_length) = 33554432 exceeds the longest context"),
    (["--gpu-memory-gb", "nan"], "--gpu-memory-gb must be a positive number of GiB, got nan"),
    (["--host-memory-gb", "-1"], "--host-memory-gb must be a positive number of GiB, got -1.0"),
    (["--frontier", "--max-seq-len", str(2**25)], "--max-seq-len = 33554432 exceeds the longest context"),
    (["--inference", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["--inference", "--new-tokens", "-1"], "--new-tokens must be >= 0, got -1"),
])
def test_impossible_cli_inputs_are_one_line_naming_the_flag(capsys, flags, message):
    try:
        rc = plan_main([RECIPE, *flags])
    except SystemExit as e:  # argparse's own type errors
        rc = e.code
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def test_the_longest_modelled_context_still_plans(capsys):
    from megatron_tsp.planner.model import MAX_SEQ_LEN

    assert plan_main([RECIPE, "--seq-len", str(MAX_SEQ_LEN), "--layout", "tsp4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"][0]["layout"] == "TSP D=4"


def test_tiled_mlp_working_set_follows_the_chunk():
    """parallel.mlp_chunk_tokens: TSP's MLP backward holds one chunk's [c, f/D] pieces (six, and the
    rebuilt fc1 output [c, 2f/D]) beside dx and the incoming gradient [s, h]; Megatron's MLP
    (TiledMLP) one chunk's pieces (all-gathered over T with sequence parallelism) and its rebuilt
    intermediates beside dx and the incoming gradient; the MLP saves only its input."""
    from megatron_tsp.planner.formulas import baseline_mlp_in_flight, mlp_intermediates, native_saved, tsp_mlp_in_flight

    S, c, b, f = 2**20, 8192, 2, 4 * H
    for D in (1, 2, 4):
        s = S / D
        t = TrainSpec(seq_length=S, tsp_mlp_exchange="ring", mlp_chunk_tokens=c)
        _, scratch = tsp_mlp_in_flight(MHA, t, Layout("tsp", tsp_size=D))
        assert scratch == pytest.approx(c * b * 8 * f / D + s * b * 2 * H), D
        # a chunk larger than the local tokens is all of them
        big = TrainSpec(seq_length=S, tsp_mlp_exchange="ring", mlp_chunk_tokens=2 * S, tsp_recompute="full")
        untiled = TrainSpec(seq_length=S, tsp_mlp_exchange="ring", tsp_recompute="full")
        assert tsp_mlp_in_flight(MHA, big, Layout("tsp", tsp_size=D)) == tsp_mlp_in_flight(MHA, untiled, Layout("tsp", tsp_size=D))
        assert "MLP fc1 output (all shards)" not in tsp_saved_per_token(MHA, True, exchange="ring", tiled=True)
        assert "MLP fc1 output (all shards)" in tsp_saved_per_token(MHA, True, exchange="ring")
    T = 4
    lay = Layout("tp_sp", tp=T)
    s = S / T
    _, scratch = baseline_mlp_in_flight(MHA, TrainSpec(seq_length=S, mlp_chunk_tokens=c), lay)
    core = c * T  # the chunk of every TP rank, all-gathered
    f_c = core * f / T * b
    want = max(f_c + core * H * b, 2 * f_c) + core * mlp_intermediates(MHA) / T * b + 2 * s * H * b
    assert scratch == pytest.approx(want)
    assert "MLP intermediates" not in native_saved(MHA, lay, tiled=True)
    assert "MLP intermediates" in native_saved(MHA, lay)


@pytest.mark.parametrize("layout", [Layout("tsp", tsp_size=4), Layout("tp_sp", tp=4), Layout("fsdp_cp", cp=4)],
                         ids=["tsp4", "tp_sp4", "fsdp_cp4"])
def test_tiled_mlp_lowers_the_frontier_peak(layout):
    """At 1M tokens with layer recompute the peak is one layer's backward: the tiled MLP's backward
    point is lower and grows with the chunk (the peak then may be the attention's), and it costs
    one more MLP forward (Megatron's) or fc1 (TSP's) of compute."""
    from megatron_tsp.planner.formulas import flops

    kw = dict(seq_length=2**20, recompute="full", recompute_num_layers=1, tsp_mlp_exchange="ring")
    mems = {c: memory(MHA, TrainSpec(**kw, mlp_chunk_tokens=c), layout, NODE4) for c in (0, 65536, 8192)}
    mlp_point = {c: m.points["checkpointed layer backward (MLP)"] for c, m in mems.items()}
    assert mlp_point[8192] < mlp_point[65536] < mlp_point[0], mlp_point
    assert mems[0].peak_point == "checkpointed layer backward (MLP)"
    assert mems[8192].peak <= mems[65536].peak <= mems[0].peak
    if layout.kind == "tsp":  # 149.8 -> 138.5 GiB per rank: the attention's backward is the peak then
        assert mems[0].peak - mems[8192].peak > 8 * GIB
        assert mems[8192].peak_point == "checkpointed layer backward (attention)"
    untiled, tiled = (flops(MHA, TrainSpec(**kw, mlp_chunk_tokens=c), layout)["matmul"] for c in (0, 8192))
    assert tiled > untiled


def test_streamed_kv_working_set_by_hand():
    """parallel.tsp_attention_kv = streamed: the attention backward holds, in units of one rank's
    K/V of a head shard u = [B S / D, 2 kv / D], six u in the model dtype and the fp32 partial
    (tsp/streamed_attention.py) instead of the gathered schedule's 3-4 K/V of all S tokens
    [B S, 2 kv / D]; dq accumulates in fp32. The same K/V bytes move (a ring instead of an
    all-gather), plus the dK/dV hop home."""
    from megatron_tsp.planner import formulas as F
    from megatron_tsp.planner.frontier import describe, options_of

    S, B, b = 2**21, 1, 2
    for model in (MHA, GQA):
        for D in (2, 4, 8):
            lay = Layout("tsp", tsp_size=D)
            u = B * S / D * 2 * model.kv_dim / D
            for mode, gathered_units in (("none", 4), ("full", 3)):
                kw = dict(seq_length=S, micro_batch_size=B, tsp_recompute=mode)
                g_comm, g_scratch = F.tsp_attention_in_flight(model, TrainSpec(**kw), lay)
                s_comm, s_scratch = F.tsp_attention_in_flight(model, TrainSpec(**kw, tsp_attention_kv="streamed"), lay)
                assert F.streamed_kv_buffers(model, TrainSpec(**kw), lay) == pytest.approx(u * (6 * b + 4))
                assert g_comm - s_comm == pytest.approx(gathered_units * D * u * b - u * (6 * b + 4)), (D, mode)
                assert s_scratch - g_scratch == pytest.approx(B * S / D * 4 * model.q_dim / D)
            KV = B * S * 2 * model.kv_dim * b
            for kv, name in (("gathered", "K/V all-gather"), ("streamed", "K/V ring")):
                items = comm_items(model, TrainSpec(**kw, tsp_attention_kv=kv), lay, Cluster(gpus_per_node=8))
                fwd = [i.volume for i in items if i.phase == "fwd" and i.name.startswith(name)]
                assert len(fwd) == 2 and sum(fwd) == pytest.approx((D - 1) / D * KV)  # the same bytes forward
    # D = 4, 2.5M tokens, the 7B with layer recompute: the attention backward's peak falls by ~7.5 GiB
    kw = dict(seq_length=2621440, recompute="full", recompute_num_layers=1, tsp_recompute="full", mlp_chunk_tokens=8192)
    peaks = {kv: memory(MHA, TrainSpec(**kw, tsp_attention_kv=kv), Layout("tsp", tsp_size=4), NODE4)
             for kv in ("gathered", "streamed")}
    assert peaks["gathered"].peak_point == "checkpointed layer backward (attention)"
    assert 7 * GIB < peaks["gathered"].peak - peaks["streamed"].peak < 8 * GIB
    opts = options_of(TrainSpec(seq_length=S, tsp_attention_kv="streamed"), Layout("tsp", tsp_size=4))
    assert opts["tsp_attention_kv"] == "streamed" and "K/V streamed" in describe(opts)


@pytest.mark.parametrize("layout", [Layout("cp", cp=4), Layout("tp_cp", tp=2, cp=2), Layout("fsdp_cp", cp=4)],
                         ids=["cp4", "tp2xcp2", "fsdp_cp4"])
def test_cp_ring_working_set_by_hand(layout):
    """parallel.cp_comm_type = p2p: the CP attention's backward holds, in units of one rank's K/V
    u = [B S / C, 2 kv / T], five u in the model dtype and the fp32 partial (stream_backward on
    the CP group) instead of CP_ATTENTION_KV_UNITS x the whole sequence's K/V; dq accumulates in
    fp32; the saved tensors lose the per-chunk outputs (the ring's o is linear_proj's input). The
    same K/V bytes move forward; backward one more hop (dK/dV home); all modelled exposed, so
    ties (and every context where all_gather fits) go to all_gather."""
    from megatron_tsp.planner import formulas as F
    from megatron_tsp.planner.frontier import _Search, describe, options_of

    S, B, b = 2**20, 1, 2
    C, T = layout.cp, layout.weight_shards
    for model in (MHA, GQA):
        u = B * S / C * 2 * model.kv_dim / T
        kw = dict(seq_length=S, micro_batch_size=B)
        g_comm, g_scratch = F.baseline_attention_in_flight(model, TrainSpec(**kw), layout)
        r_comm, r_scratch = F.baseline_attention_in_flight(model, TrainSpec(**kw, cp_comm_type="p2p"), layout)
        assert g_comm == pytest.approx(F.CP_ATTENTION_KV_UNITS * C * u * b)
        assert r_comm == pytest.approx(u * (5 * b + 4)) == F.cp_ring_kv_buffers(model, TrainSpec(**kw), layout)
        assert r_scratch - g_scratch == pytest.approx(B * S / C * 4 * model.q_dim / T)
        saved = {k: v for k, (v, _) in F.native_saved(model, layout).items()}
        ring_saved = {k: v for k, (v, _) in F.native_saved(model, layout, ring=True).items()}
        assert sum(saved.values()) - sum(ring_saved.values()) == pytest.approx(b * model.q_dim / T)
        KV = B * S * 2 * model.kv_dim / T * b
        for kind, name in (("all_gather", "CP K/V all-gather"), ("p2p", "CP K/V ring")):
            items = comm_items(model, TrainSpec(**kw, cp_comm_type=kind), layout, NODE4)
            fwd = [i.volume for i in items if i.phase == "fwd" and i.name.startswith(name)]
            bwd = sum(i.volume for i in items if i.phase == "bwd" and i.name.startswith("CP "))
            assert len(fwd) == 1 and fwd[0] == pytest.approx((C - 1) / C * KV)
            assert bwd == pytest.approx((2 * (C - 1) + (kind == "p2p")) / C * KV)
            assert not any(i.overlapped for i in items if i.name.startswith("CP "))
    # 1M tokens, the 7B with layer recompute: the ring lowers the attention backward's point from
    # CP 4 on; at CP 2 two ranks' K/V are the whole sequence's, and the fp32 buffers cost more
    kw = dict(seq_length=S, recompute="full", recompute_num_layers=1, mlp_chunk_tokens=8192)
    mems = {k: memory(MHA, TrainSpec(**kw, cp_comm_type=k), layout, NODE4) for k in ("all_gather", "p2p")}
    point = "checkpointed layer backward (attention)"
    assert (mems["p2p"].points[point] < mems["all_gather"].points[point]) == (C >= 4)
    # the frontier searches both; at a short context both fit and all_gather (first, no slower) wins
    search = _Search(MHA, TrainSpec(seq_length=8192), layout, NODE4, hardware.load("h200x4"))
    assert {f.get("cp_comm_type") for f in search.families()} == {"all_gather", "p2p"}
    _, best = search.best(8192)
    assert best.cp_comm_type == "all_gather"
    opts = options_of(TrainSpec(seq_length=S, cp_comm_type="p2p"), layout)
    assert opts["cp_comm_type"] == "p2p" and "K/V ring (p2p)" in describe(opts)
    assert "cp_comm_type" not in options_of(TrainSpec(seq_length=S), Layout("tsp", tsp_size=4))


def test_cp_ring_extends_the_cp_frontier():
    """With p2p searched, CP 4's longest context is longer than with all_gather alone; a bad
    value is an error naming the key and the flag."""
    from megatron_tsp.planner.frontier import layout_frontier

    hw = hardware.load("h200x4")
    lay = Layout("cp", cp=4)
    base = TrainSpec(seq_length=65536)
    full = layout_frontier(MHA, base, lay, NODE4, hw)
    # all_gather alone: the search without the ring family
    from megatron_tsp.planner import frontier as fr

    real = fr._Search.families
    try:
        fr._Search.families = lambda self: [f for f in real(self) if f.get("cp_comm_type") != "p2p"]
        gathered = layout_frontier(MHA, base, lay, NODE4, hw)
    finally:
        fr._Search.families = real
    # 1.20M vs 1.17M tokens on 4 x H200 (the ring's layer keeps no per-chunk outputs, its backward
    # no sequence-long K/V): the frontier's configuration there is the ring
    assert full["max_seq_len"] > gathered["max_seq_len"]
    assert full["at_max"]["options"]["cp_comm_type"] == "p2p"
    assert gathered["at_max"]["options"]["cp_comm_type"] == "all_gather"
    with pytest.raises(PlanError, match=r"parallel.cp_comm_type \(--cp-comm-type\) = 'ring'"):
        TrainSpec(seq_length=64, cp_comm_type="ring")


def test_cp_comm_type_flag_and_recipe_key(capsys):
    """`plan --cp-comm-type p2p` (and the recipe's parallel.cp_comm_type) plan the CP layouts with
    the ring: its note, its lower peak at 1M tokens; the TSP layout is unchanged."""
    flags = ["--json", "--gpus-per-node", "4", "--seq-len", str(2**20), "--recompute", "full",
             "--layout", "cp4", "--layout", "tsp4"]
    runs = {}
    for name, args in (("all_gather", [RECIPE]), ("p2p", [RECIPE, "--cp-comm-type", "p2p"]),
                       ("recipe", [RECIPE, "parallel.cp_comm_type=p2p"])):
        assert plan_main(args + flags) == 0
        runs[name] = {r["layout"]: r for r in json.loads(capsys.readouterr().out)["plans"]}
    ring = "attention: K/V around the CP ring (cp_comm_type p2p: two ranks' K/V at a time)"
    for name in ("p2p", "recipe"):
        assert ring in runs[name]["CP 4"]["notes"] and ring not in runs[name]["TSP D=4"]["notes"]
        assert runs[name]["CP 4"]["memory_gib"]["peak"] < runs["all_gather"]["CP 4"]["memory_gib"]["peak"]
        assert runs[name]["TSP D=4"]["memory_gib"] == runs["all_gather"]["TSP D=4"]["memory_gib"]
    assert ring not in runs["all_gather"]["CP 4"]["notes"]
