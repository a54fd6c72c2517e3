"""The probe's frontier search (probe.frontier.Search) against a stand-in probe whose peak is a
known function of S: doubling, then bisection to 2%, offload while the host holds it, and the
probe log that lets a later run resume."""

import json

from megatron_tsp.probe.frontier import ProbeLog, Search, extrapolated_time, lean, layout_overrides

UNIT = 8192


def fake(limit_tokens, offload_limit=None):
    """A probe that fits up to `limit_tokens` (with offload: up to `offload_limit`)."""
    calls = []

    def probe(S, opts):
        calls.append((S, tuple(opts)))
        limit = offload_limit if "parallel.offload_activations=true" in opts and offload_limit else limit_tokens
        return {"oom": "out of memory" if S > limit else None, "peak_allocated_gib": S / limit * 70}
    return probe, calls


def test_doubles_then_bisects_to_two_percent():
    probe, calls = fake(1_000_000)
    row = Search("tsp", 4, None, probe, lambda S, o: 0.0, log=lambda *_: None).run(16384, 2**24, UNIT)
    S = row["max_seq_len"]
    assert S <= 1_000_000 and S % UNIT == 0 and row["first_miss"] > 1_000_000
    assert row["first_miss"] / S <= 1.02 or row["first_miss"] - S == UNIT
    assert len(calls) <= 14 and len({c[0] for c in calls}) == len(calls)  # each context probed once
    assert all("parallel.tsp_recompute=full" in c[1] for c in calls)  # TSP's lean options


def test_offload_only_while_the_host_holds_it():
    probe, calls = fake(300_000, offload_limit=2_000_000)
    host_gib = 64.0
    need = lambda S, opts: S * 32 * 8192 / 4 / 2**30  # noqa: E731  (offloaded inputs of one rank)
    row = Search("tp_sp", 4, host_gib, probe, need, log=lambda *_: None).run(65536, 2**24, UNIT)
    for S, opts in calls:
        assert ("parallel.offload_activations=true" in opts) == (need(S, opts) <= host_gib)
    assert row["max_seq_len"] <= 300_000 or need(row["max_seq_len"], ()) <= host_gib


def test_offload_with_more_layers_per_checkpoint_when_the_host_is_short():
    """N layers per checkpoint offload 1/N of the inputs: the smallest N the host holds."""
    probe, calls = fake(10**9)
    need = lambda S, opts: S / 2**20 * 64 / int(next(o for o in opts if "recompute_num_layers" in o).split("=")[1])  # noqa: E731
    Search("tsp", 4, 100.0, probe, need, log=lambda *_: None, layers=32).fits(2**21)  # 128 GiB at N = 1
    assert "parallel.recompute_num_layers=2" in calls[0][1] and "parallel.offload_activations=true" in calls[0][1]


def test_capped_when_everything_fits():
    probe, _ = fake(10**9)
    row = Search("cp4", 4, None, probe, lambda S, o: 0.0, log=lambda *_: None).run(65536, 2**20, UNIT)
    assert row["capped"] and row["max_seq_len"] == 2**20


def test_nothing_fits():
    probe, _ = fake(1000)
    row = Search("tsp", 4, None, probe, lambda S, o: 0.0, log=lambda *_: None).run(65536, 2**20, UNIT)
    assert row["max_seq_len"] is None and row["at_max"] is None


def test_log_resumes(tmp_path):
    path = str(tmp_path / "probes.jsonl")
    log = ProbeLog(path)
    log.put("k1", {"seq_len": 1, "measured": {"oom": None}})
    again = ProbeLog(path)
    assert again.get("k1")["seq_len"] == 1 and again.get("k2") is None
    assert json.loads(open(path).readline())["key"] == "k1"


def test_extrapolated_time_is_linear_plus_quadratic():
    t = extrapolated_time(real_s=3.0, memory_mode_s=1.0, S0=131072, S=262144)
    assert t["step_time_s"] == 1.0 * 2 + 2.0 * 4 and t["extrapolated"]


def test_layout_names_and_lean_options():
    assert layout_overrides("cp4", 8) == ["parallel.layout=dp", "parallel.size=1", "parallel.context_size=8"]
    assert "parallel.offload_activations=true" in lean("tsp", True)
    assert not any("tsp_" in o for o in lean("fsdp_cp4", True))
    assert "parallel.tsp_attention_kv=streamed" in lean("tsp", True, attention_kv="streamed")
    assert not any("attention_kv" in o for o in lean("tsp", True) + lean("fsdp_cp4", True, attention_kv="streamed"))
    for name in ("cp4", "tp2_cp2", "fsdp_cp4"):
        assert "parallel.cp_comm_type=p2p" in lean(name, True, cp_comm_type="p2p")
        assert not any("cp_comm_type" in o for o in lean(name, True))
    for name in ("tsp", "tp_sp"):
        assert not any("cp_comm_type" in o for o in lean(name, True, cp_comm_type="p2p"))


def test_from_a_close_guess_few_probes():
    """From the planner's guess (steps of 6%): a guess 3% short finds the frontier in a few probes."""
    probe, calls = fake(1_000_000)
    row = Search("tsp", 4, None, probe, lambda S, o: 0.0, log=lambda *_: None).run(970_000, 2**24, UNIT, 1.06)
    assert row["max_seq_len"] <= 1_000_000 < row["first_miss"] and row["first_miss"] / row["max_seq_len"] <= 1.02
    assert len(calls) <= 4


def test_from_a_guess_too_long_steps_down():
    probe, calls = fake(1_000_000)
    row = Search("tsp", 4, None, probe, lambda S, o: 0.0, log=lambda *_: None).run(1_100_000, 2**24, UNIT, 1.06)
    assert row["max_seq_len"] <= 1_000_000 < row["first_miss"] and len(calls) <= 5
