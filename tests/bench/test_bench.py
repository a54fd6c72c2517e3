"""`megatron-tsp bench`: the FLOP formula against hand and machine counts, and the orchestrator on
CPU (it launches its own torchrun with 2 gloo processes): rows and reports, an unavailable layout,
a simulated out-of-memory (OOM recorded, longer S not run, the benchmark goes on) and a hung rank
(killed after --timeout)."""

import json
import os

import pytest
import torch

from megatron_tsp.bench import launcher as bench_launcher, report as bench_report, rows as bench_rows, worker as bench_worker
from megatron_tsp.config import ModelShape


def test_flops_hand_count():
    # h=64, a=4 heads (d=16), g=2 KV groups, gated f=256, V=128, L=2, S=64
    shape = ModelShape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=256, vocab_size=128, seq_length=64)
    qkv, proj, mlp = 64 * (64 + 2 * 2 * 16), 64 * 64, 3 * 64 * 256  # 8192, 4096, 49152
    assert bench_rows.model_flops(shape)["matmul_params"] == 2 * (qkv + proj + mlp) == 122880
    f = bench_rows.model_flops(shape, batch=3)
    assert f["dense"] == 6 * 3 * 64 * 122880
    assert f["lm_head"] == 6 * 3 * 64 * 64 * 128
    # causal attention, counted pair by pair: QK^T and PV are 2*d FLOPs per (query, key) pair and head
    pairs = int(torch.tril(torch.ones(64, 64)).sum())
    assert pairs == 64 * 65 // 2
    assert f["attention"] == 3 * 2 * 3 * (2 * 2 * 16 * 4 * pairs)  # fwd+bwd x layers x batch x (QK + PV) per layer
    assert f["total"] == f["dense"] + f["lm_head"] + f["attention"]
    # a TSP shard's two zigzag chunks cover exactly the causal pairs of their queries
    S, D = 64, 2
    c = S // (2 * D)
    from megatron_tsp.tsp.zigzag import local_chunk_starts

    total = sum(bench_rows.causal_area(c, s) for r in range(D) for s in local_chunk_starts(S, D, r))
    assert total == pairs


def test_bench_models_are_the_recipes():
    """The bench's model shapes come from configs/ (the shape is defined once, in the recipe): a
    row's model is the recipe's with the bench's layers and S (GQA: the GQA recipe's), its
    overrides rebuild that model, and what a 7B run records of its model is what the recorded
    benchmark (benchmarks/results) recorded, with the same overrides as then."""
    import argparse
    import dataclasses

    from megatron_tsp.training.recipe import load_recipe

    for variant, path in (("mha", "configs/7b_16k.yaml"), ("gqa", "configs/7b_gqa_32k.yaml")):
        want = dataclasses.replace(load_recipe(os.path.join(bench_rows.REPO_ROOT, path)).model.shape(),
                                   num_layers=4, seq_length=65536)
        assert bench_rows.model_shape("7b", variant, 4, 65536) == want
    assert bench_rows.model_shape("tiny", "mha", 2, 64) == load_recipe(None).model.shape()  # the embedded tiny recipe
    assert bench_rows.model_shape("tiny", "gqa", 2, 64).num_query_groups == 2
    with open(os.path.join(bench_rows.REPO_ROOT, "benchmarks", "results", "bench_h200x4.json")) as f:
        assert bench_rows.model_config("7b") == json.load(f)["meta"]["model_config"]
    args = argparse.Namespace(seq="16K", layouts="tsp,tp_sp", variants="mha,gqa", gqa_layouts="tsp", gpus=4, model="7b",
                              layers=4, warmup=1, steps=1)
    rows = bench_rows.plan_rows(args)
    assert [r["id"] for r in rows] == ["tsp/mha/16K", "tp_sp/mha/16K", "tsp/gqa/16K"]
    for r in rows:
        assert load_recipe(None, r["overrides"]).model.shape() == bench_rows.model_shape("7b", r["variant"], 4, 16384)
    assert rows[2]["overrides"][:11] == [
        "model.num_layers=4", "model.hidden_size=4096", "model.num_attention_heads=32", "model.num_query_groups=8",
        "model.ffn_hidden_size=16384", "model.vocab_size=32000", "model.seq_length=16384", "model.swiglu=true",
        "model.normalization=RMSNorm", "model.position_embedding_type=rope", "model.dtype=bfloat16"]


def test_a_gqa_recipe_of_another_model_is_refused(monkeypatch):
    monkeypatch.setitem(bench_rows.MODELS, "mixed", bench_rows.BenchModel("configs/7b_16k.yaml", "configs/tiny.yaml",
                                                                          layers=2, seq="64"))
    try:
        with pytest.raises(SystemExit, match="configs/tiny.yaml must be configs/7b_16k.yaml's model .* hidden_size: 64 vs 4096"):
            bench_rows.model_shape("mixed", "gqa", 2, 64)
        assert bench_rows.model_shape("mixed", "mha", 2, 64).hidden_size == 4096
    finally:
        bench_rows.model_recipe.cache_clear()


def test_flops_match_flop_counter_on_megatron_gpt():
    """The matmul part (layers + LM head) equals what torch's FlopCounterMode counts on a real
    Megatron GPT's forward + backward, less SDPA's ops (attention is checked above: torch >= 2.15
    counts SDPA on CPU, non-causal and with its backward's recompute; older ones do not count it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_tsp.training import loop as driver
    from megatron_tsp.training.recipe import load_recipe
    from megatron_tsp.training.build import build_gpt

    recipe = load_recipe(None, ["parallel.layout=dp", "parallel.size=1", "model.num_query_groups=2",
                                "model.seq_length=32", "model.ffn_hidden_size=96"])
    pgs = driver.init_groups(recipe)
    shape = recipe.model.shape()
    model = build_gpt(shape, layout="tp_sp", core_attention="sdpa", pg_collection=pgs)
    tokens = torch.randint(0, shape.vocab_size, (2, shape.seq_length))
    pos = torch.arange(shape.seq_length).expand(2, -1)
    with FlopCounterMode(display=False) as counter:
        model(tokens, pos, None, labels=tokens).float().sum().backward()
    f = bench_rows.model_flops(shape, batch=2)
    counted = counter.get_flop_counts()["Global"]
    matmul = sum(n for op, n in counted.items() if "scaled_dot_product" not in str(op))
    assert matmul == f["dense"] + f["lm_head"], counted


@pytest.mark.slow  # a whole two-launch benchmark (~100 s on 2 cores): once per CI run, in the newest venv
def test_bench_cpu(tmp_path, monkeypatch):
    """One benchmark on CPU, 2 gloo processes, tiny model, S = 64, 128, 256: an unavailable layout
    (a recipe key the package rejects), TSP whose S=128 row hangs on rank 0 (killed after --timeout,
    S=256 then skipped), TP+SP whose S=128 row runs out of memory on rank 1 (OOM recorded, S=256
    recorded as OOM without running). The rows before the failures are measured, the benchmark
    finishes (two torchrun launches) and writes its reports."""
    monkeypatch.setitem(bench_rows.LAYOUTS, "bogus", bench_rows.RowLayout("tsp", extra=("parallel.no_such_key=1",),
                                                                          suffix="bogus"))
    monkeypatch.setenv(bench_rows.FAKE_HANG_ENV, "tsp:128:0")
    monkeypatch.setenv(bench_rows.FAKE_OOM_ENV, "tp_sp:128:1")
    out = tmp_path / "out"
    rc = bench_launcher.main(["--gpus", "2", "--model", "tiny", "--out", str(out), "--tag", "t", "--seq", "64,128,256",
                     "--layouts", "bogus,tsp,tp_sp", "--variants", "mha", "--warmup", "1", "--steps", "2",
                     "--timeout", "45", "--profile"])  # a row's budget; 15 s timed out rows on a loaded machine
    assert rc == 0
    with open(out / "bench_t.json") as f:
        report = json.load(f)
    rows = {r["id"]: r for r in report["rows"]}
    assert set(rows) == {f"{lay}/mha/{s}" for lay in ("tsp", "tp_sp", "bogus") for s in (64, 128, 256)}

    for lay in ("tsp", "tp_sp"):
        r = rows[f"{lay}/mha/64"]
        assert r["status"] == "ok", r
        assert len(r["step_times_s"]) == 2 and r["steps_timed"] == 2 and r["world"] == 2
        assert r["median_step_s"] == pytest.approx(sum(r["step_times_s"]) / 2)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(64 / r["median_step_s"] / 2)
        assert r["model_flops_per_step"] == bench_rows.model_flops(bench_rows.model_shape("tiny", "mha", 2, 64))["total"]
        assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / (r["median_step_s"] * 2 * r["peak_tflops"] * 1e12))
        assert r["loss_last"] == r["loss_last"]  # not NaN
        assert r["recipe_parallel"]["layout"] == lay and r["recipe_parallel"]["size"] == 2
        assert r["attention_probe"]["kind"] == ("tsp" if lay == "tsp" else "sdpa") and r["attention_probe"]["seconds"] > 0
        prof = (out / f"profile_{lay}_mha_64.md").read_text()  # --profile: one extra, untimed step
        assert "step wall time" in prof and ("TSPAttentionFunction" in prof) == (lay == "tsp"), prof[:2000]
    for s in (64, 128, 256):
        assert rows[f"bogus/mha/{s}"]["status"] == "unavailable" and "no_such_key" in rows[f"bogus/mha/{s}"]["note"]
    assert rows["tsp/mha/128"]["status"] == "timeout"
    assert rows["tsp/mha/256"]["status"] == "skipped" and rows["tsp/mha/256"]["measured"] is False
    oom = rows["tp_sp/mha/128"]
    assert oom["status"] == "oom" and "rank 1" in oom["note"] and "simulated" in oom["note"], oom
    assert "measured" not in oom
    assert rows["tp_sp/mha/256"]["status"] == "oom" and rows["tp_sp/mha/256"]["measured"] is False

    assert report["meta"]["command"].startswith("megatron-tsp bench --gpus 2")
    assert report["devices"][0]["world"] == 2 and report["devices"][0]["peak_tflops"] > 0
    md = (out / "bench_t.md").read_text()
    for line in (f"| TSP D=2 | mha | 64 | {rows['tsp/mha/64']['median_step_s']:.3f} |",
                 f"| TP=2+SP | mha | 64 | {rows['tp_sp/mha/64']['median_step_s']:.3f} |",
                 "| TSP D=2, bogus | mha | 64, 128, 256 | unavailable",
                 "| layout | variant | S | step s | tok/s/process |",
                 "| TP=2+SP | mha | 128 | OOM |", "| TP=2+SP | mha | 256 | OOM |", "| TSP D=2 | mha | 128 | timeout |",
                 "**CPU run** (gloo)"):
        assert line in md, line
    headers = [line for line in md.splitlines() if line.startswith("| layout |")]
    assert headers
    for gpu_only in ("GiB", "MFU", "TFLOP/s"):  # GPU measurements: no such column on CPU (the note may name them)
        assert all(gpu_only not in h for h in headers), (gpu_only, headers)
    for gpu_only in ("## Targets", "Measured peak", "peak 0.00 GiB"):
        assert gpu_only not in md, gpu_only
    # the reports are rebuilt from the JSON-lines file alone
    os.remove(out / "bench_t.md")
    assert bench_launcher.main(["--from-jsonl", str(out / "bench_t.jsonl")]) == 0
    assert (out / "bench_t.md").read_text() == md


def test_profile_summary_categories_and_stream_busy_time():
    from megatron_tsp.bench import profiling

    assert profiling.category("ncclDevKernel_AllGather_RING_LL") == "nccl"
    assert profiling.category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention backward"
    assert profiling.category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == "attention forward"
    assert profiling.category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert profiling.category("void at::native::CatArrayBatchedCopy<...>") == "copy / cat"
    assert profiling.category("void at::native::vectorized_elementwise_kernel<4, MulFunctor>") == "elementwise"
    assert profiling._union([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17

    prof = profiling.StepProfile()
    with prof:
        torch.ones(4).mul(2)
    fake = [{"name": "nvjet_gemm", "stream": 7, "ts": 0.0, "dur": 600.0},
            {"name": "cudnn_sdpa_fprop", "stream": 7, "ts": 500.0, "dur": 200.0},
            {"name": "ncclDevKernel_Broadcast", "stream": 9, "ts": 0.0, "dur": 300.0}]
    prof.kernels = lambda: fake
    text = prof.summary(1e-3, title="t")
    assert "| gemm | 0.60 | 1 | 60.0% |" in text and "| attention forward | 0.20 | 1 | 20.0% |" in text
    assert "| 7 | 2 | 0.70 | 70.0% |" in text and "| 9 | 1 | 0.30 | 30.0% |" in text  # overlap counted once


def test_targets_verdicts():
    """The target verdicts from made-up rows: ratios, OOM baselines, missing rows."""
    def row(layout, seq, alloc=None, step=None, status="ok", probe_mfu=None):
        r = {"kind": "row", "id": f"{layout}/mha/{seq}", "layout": layout, "variant": "mha", "seq": seq,
             "label": layout, "layers": 2, "status": status, "note": ""}
        if status == "ok":
            r.update(peak_alloc_gb=alloc, median_step_s=step, peak_tflops=800.0)
            if probe_mfu is not None:
                r["attention_probe"] = {"mfu": probe_mfu, "tflops": 800 * probe_mfu}
        return r

    K = 1024
    rows = [row("tsp", 16 * K, 10, 1.05), row("tsp", 64 * K, 20, 3.0), row("tsp", 128 * K, 30, 9.0, probe_mfu=0.45),
            row("tp", 16 * K, 30, 1.0), row("tp", 64 * K, 60, 3.0), row("tp", 128 * K, status="oom"),
            row("tp_sp", 16 * K, 10, 1.0), row("tp_sp", 64 * K, 19.5, 2.9), row("tp_sp", 128 * K, status="oom"),
            row("tsp_compute_only", 64 * K, 20, 2.5), row("tsp_compute_only", 128 * K, 20, 8.0)]
    got = {t["target"].split(".")[0]: t for t in bench_report.evaluate_targets(rows)}
    assert got["1"]["verdict"] == "reached" and "tp OOM" in got["1"]["detail"]  # TP OOM at 128K
    assert got["3"]["verdict"] == "reached"  # 1.00, 1.03, TP+SP OOM at 128K
    assert got["4a"]["verdict"] == "not reached"  # 64K: 3.0 / 2.9 > 1.0; 128K not comparable
    assert got["4b"]["verdict"] == "reached"  # 1.05 <= 1.1
    assert got["5"]["verdict"] == "not reached"  # 64K: 3.0 / 2.5 = 1.2 > 1.15
    assert got["6"]["verdict"] == "reached"
    assert "2" not in got  # no CP rows planned: no CP target


def test_rows_leave_no_model_memory_behind():
    """What a row leaves behind after its model is deleted: nothing of the model's size (Megatron's
    RoPE lru_cache keeps each model's S x d table alive until _release_caches clears it)."""
    import gc

    from megatron_tsp.training import loop as driver
    from megatron_tsp.training.recipe import load_recipe

    S = 72  # a length no other test uses
    recipe = load_recipe(None, ["parallel.layout=tsp", "parallel.size=1", "train.distributed_optimizer=true",
                                "train.micro_batch_size=1", "train.global_batch_size=1", "train.steps=1",
                                f"model.seq_length={S}"])
    pgs = driver.init_groups(recipe)
    model, ddp, optimizer = driver.build(recipe, pgs)
    batches = list(driver.micro_batches(driver.build_train_dataset(recipe), 0, recipe, 0, 1, torch.device("cpu")))
    driver.train_step(ddp, optimizer, batches, recipe, pgs)

    def left():
        gc.collect()
        return [o for o in gc.get_objects() if torch.is_tensor(o) and o.dim() >= 1 and o.shape[0] == S
                and o.is_floating_point()] + [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)]

    del model, ddp, optimizer, batches
    assert left(), "the RoPE cache should still hold the S x d table here (else this test checks nothing)"
    bench_worker._release_caches()
    assert left() == []


def test_resume_keeps_done_rows_and_refuses_another_model(tmp_path, monkeypatch):
    """--resume: rows already measured are not rerun (here all are: no torchrun is launched), a
    second command's rows join the first's in one report; a file written with another layer
    count is refused."""
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--gpus", "2", "--model", "tiny", "--out", str(out), "--tag", "r", "--seq", "64,128", "--layouts", "tsp,tp_sp",
            "--variants", "mha", "--warmup", "1", "--steps", "2", "--resume"]
    args = bench_launcher.parser().parse_args(argv)
    args.seq, args.tag = "64,128", "r"
    rows = bench_rows.plan_rows(args)
    meta = {"kind": "meta", "command": "first", "model": "tiny", "layers": 2, "gpus": 2, "warmup": 1, "steps": 2,
            "plan": [r["id"] for r in rows if r["layout"] == "tp_sp"]}
    with open(out / "bench_r.jsonl", "w") as f:
        f.write(json.dumps(meta) + "\n")
        for r in reversed(rows):
            rec = bench_rows.row_base(r, status="ok")
            rec.update(peak_alloc_gb=1.0, peak_reserved_gb=1.0, median_step_s=0.5, tokens_per_s_per_gpu=r["seq"],
                       mfu=0.1, peak_tflops=1.0)
            f.write(json.dumps(rec) + "\n")
    monkeypatch.setattr(bench_launcher, "_launch", lambda *a, **k: pytest.fail("nothing is left to run"))
    assert bench_launcher.main(argv) == 0
    report = json.loads((out / "bench_r.json").read_text())
    assert [r["id"] for r in report["rows"]] == ["tp_sp/mha/64", "tp_sp/mha/128", "tsp/mha/64", "tsp/mha/128"]
    assert report["meta"]["commands"][0] == "first" and report["meta"]["commands"][1].startswith("megatron-tsp bench")
    with pytest.raises(SystemExit, match="layers = 2"):
        bench_launcher.main(argv + ["--layers", "3"])

    # --redo: the named layouts' rows run again although done; the others stay
    launched = []

    def fake_launch(rows, *a, **k):
        launched.extend(r["id"] for r in rows)
        return {"rc": 0, "timeout": False, "row": None}

    monkeypatch.setattr(bench_launcher, "_launch", fake_launch)
    bench_launcher.main(argv + ["--redo", "tsp"])
    assert launched == ["tsp/mha/64", "tsp/mha/128"]
    with pytest.raises(SystemExit, match="--redo goes with --resume"):
        bench_launcher.main([a for a in argv if a != "--resume"] + ["--redo", "tsp"])


def test_merged_runs_name_the_commit_of_each_row():
    """A report merged from --resume runs of several commits says which rows each measured."""
    recs = [{"kind": "meta", "commit": "aaa", "plan": ["tsp/mha/64"]},
            {"kind": "row", "id": "tsp/mha/64", "layout": "tsp", "variant": "mha", "seq": 64, "status": "ok"},
            {"kind": "meta", "commit": "bbb", "plan": ["tp_sp/mha/64"]},
            {"kind": "row", "id": "tp_sp/mha/64", "layout": "tp_sp", "variant": "mha", "seq": 64, "status": "ok"}]
    meta, _, rows = bench_report.collect(recs)
    assert {r["id"]: r["run_commit"] for r in rows} == {"tsp/mha/64": "aaa", "tp_sp/mha/64": "bbb"}
    assert bench_report._commits(rows, meta) == "`aaa`: tsp/mha/64; `bbb`: tp_sp/mha/64"
    assert bench_report._commits(rows[:1], meta) == "`aaa`"


def test_cpu_machine_cannot_run_7b_rows(tmp_path, monkeypatch, capsys):
    """No GPU: --dry-run says the 7B rows cannot run here (none "available here"), and a real
    run refuses at once with exit code 2 instead of an error per row."""
    monkeypatch.setattr(bench_launcher, "machine_cannot", lambda model, gpus: None if model == "tiny" else "no GPUs")
    out = str(tmp_path / "out")
    assert bench_launcher.main(["--dry-run", "--out", out]) == 0
    said = capsys.readouterr().out
    assert "not runnable on this machine: no GPUs; 0 rows available here" in said, said
    monkeypatch.setattr(bench_launcher, "_launch", lambda *a, **k: pytest.fail("nothing may run"))
    assert bench_launcher.main(["--out", out]) == 2
    assert "not runnable on this machine" in capsys.readouterr().err


def test_machine_cannot_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine")
    assert "none" in bench_launcher.machine_cannot("7b", 4) and bench_launcher.machine_cannot("tiny", 2) is None


def test_every_row_failed_exits_nonzero(tmp_path, monkeypatch):
    """Workers that die before their first row: every row is an error, the report is written, exit 1."""
    monkeypatch.setattr(bench_launcher, "_launch", lambda *a, **k: {"rc": 1, "timed_out": False, "over_budget": False,
                                                                    "current": None, "fails": []})
    out = tmp_path / "out"
    assert bench_launcher.main(["--gpus", "2", "--model", "tiny", "--out", str(out), "--tag", "f", "--seq", "64",
                                "--layouts", "tsp", "--variants", "mha"]) == 1
    rows = json.loads((out / "bench_f.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["error"]


def test_help_placeholders_filled_and_out_default_outside_results():
    text = bench_launcher.parser().format_help()
    assert "{n}" not in text and "{half}" not in text and "TSP D=N" in text
    assert "bench_results" in text
    assert not bench_launcher.DEFAULT_OUT.startswith("benchmarks")
