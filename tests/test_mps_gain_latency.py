"""The pure parts of the engine's latency figures, the interference proof (issue 18) and the
issue-21 sweep, on the CPU and without torch: exact percentiles, the timetable, vLLM's histograms
as the agent reads them, the detection delays from a recorded timeline, the sweep's plan and report."""

from __future__ import annotations

import argparse
import sys
import time

import pytest
from mpswatch.engine_kinds.vllm import parse_vllm_command, parse_vllm_metrics
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks import interference
from benchmarks.mps_gain import sweep
from benchmarks.mps_gain.cases import Case
from benchmarks.mps_gain.histograms import ITL_BUCKETS, TTFT_BUCKETS, LatencyHistograms
from benchmarks.mps_gain.timing import figures, parse_timetable, percentile, phase_at, timetable


def test_nothing_here_imports_torch():
    assert "torch" not in sys.modules


def test_exact_percentiles_interpolate_between_ranks():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([float(v) for v in range(101)], 0.99) == pytest.approx(99.0)
    assert figures("itl", [0.004, 0.001, 0.002, 0.003]) == {
        "itl_p50_s": 0.0025, "itl_p99_s": pytest.approx(0.00397), "itl_mean_s": pytest.approx(0.0025), "itl_n": 4}
    assert figures("ttft", []) == {"ttft_p50_s": None, "ttft_p99_s": None, "ttft_mean_s": None, "ttft_n": 0}


def test_timetable_quiet_then_cycles_of_burst_and_idle():
    phases = parse_timetable("30,20,20,2")
    assert [(p.name, p.kind, p.start, p.end) for p in phases] == [
        ("quiet", "quiet", 0, 30), ("burst1", "burst", 30, 50), ("idle1", "idle", 50, 70),
        ("burst2", "burst", 70, 90), ("idle2", "idle", 90, 110)]
    assert phase_at(phases, 30.0).name == "burst1" and phase_at(phases, 29.999).name == "quiet"
    assert phase_at(phases, -0.1) is None and phase_at(phases, 110.0) is None
    for bad in ("30,20,20", "30,0,20,2", "30,20,20,0"):
        with pytest.raises(ValueError):
            parse_timetable(bad)
    assert timetable(1, 2, 3, 1)[-1].end == 6


def test_latency_histograms_are_vllms_and_the_agent_reads_them():
    registry = CollectorRegistry()
    histograms = LatencyHistograms("Qwen/Qwen2.5-0.5B-Instruct")
    registry.register(histograms)
    histograms.observe("itl", 0.002, 32)  # one batch-32 decode step
    histograms.observe("itl", 0.01, 4)  # on the bucket's bound: counts in it
    histograms.observe("ttft", 0.3, 16)
    histograms.observe("e2e", 1.2, 2)
    histograms.observe("queue", 0.0, 2)
    text = generate_latest(registry).decode()
    assert 'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 36.0' in text
    assert 'vllm:time_per_output_token_seconds_count{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 36.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 0.0' in text
    assert 'vllm:request_queue_time_seconds_count{engine="0",model_name="Qwen/Qwen2.5-0.5B-Instruct"} 2.0' in text
    read = parse_vllm_metrics(text).latencies
    assert read["inter_token"].count == 36 and read["inter_token"].sum == pytest.approx(0.104)
    assert [bound for bound, _ in read["inter_token"].buckets][:-1] == list(ITL_BUCKETS)
    assert [bound for bound, _ in read["time_to_first_token"].buckets][:-1] == list(TTFT_BUCKETS)
    assert read["end_to_end"].count == 2 and read["queue"].sum == 0


def test_a_steps_observation_is_cheap():
    histograms = LatencyHistograms("m")
    calls = 20000
    started = time.perf_counter()
    for _ in range(calls):
        histograms.observe("itl", 0.0015, 32)
    assert (time.perf_counter() - started) / calls < 20e-6  # measured about 0.5 us; a step's budget is 100 us


# ---------------------------------------------------------------- the interference proof

A, B = "mpsint-steady:8001", "mpsint-bursting:8002"
PHASES = [{"name": p.name, "kind": p.kind, "start": 1000.0 + p.start, "end": 1000.0 + p.end}
          for p in parse_timetable("30,20,20,2")]


def timeline(named: list[tuple[float, float]], flags: list[tuple[float, float]], other: list[float] = ()) -> list[dict]:
    """A sample every 0.5 s from 1000 to 1110: B named as A's neighbour inside `named` spans,
    B's burst flag inside `flags`, and a stray neighbour named at the `other` times."""
    samples = []
    for tick in range(0, 220):
        t = 1000.0 + tick * 0.5
        inside = any(start <= t - 1000 < end for start, end in named)
        entry = [{"engine": A, "neighbour": B, "value": 1.6}] if inside else []
        if t - 1000 in other:
            entry.append({"engine": B, "neighbour": A, "value": 1.3})
        burst = 1.0 if any(start <= t - 1000 < end for start, end in flags) else 0.0
        samples.append({"t": t, "interference": entry, "info": {},
                        "engines": {A: {"itl_slowdown": 1.6 if inside else 1.0}, B: {"burst": burst}}})
    return samples


def test_detection_delays_and_false_detections_from_a_timeline():
    samples = timeline(named=[(33.0, 57.5), (74.0, 96.0)], flags=[(31.0, 59.0), (71.0, 99.0)], other=[10.0, 65.0, 91.0])
    found = interference.detection(PHASES, samples, A, B, grace_s=12.0)
    first, second = found["bursts"]
    assert first["phase"] == "burst1" and first["detect_delay_s"] == 3.0 and first["detected_in_burst"]
    assert first["named_until_after_end_s"] == 7.0  # the last sample naming B: 57.0, the burst ended at 50
    assert first["burst_flag_delay_s"] == 1.0 and first["burst_flag_until_after_end_s"] == 8.5
    assert first["named_share_after_detection"] == 1.0 and first["steady_slowdown_max"] == 1.6
    assert second["detect_delay_s"] == 4.0 and second["named_until_after_end_s"] == 5.5
    # at 10 (quiet) and 65 (idle1, 15 s in: past the grace) a neighbour was named; 91 is 1 s into idle2
    assert found["false_detections"] == 2
    assert [s["phase"] for s in found["false_detection_samples"]] == ["quiet", "idle1"]
    assert found["named_in_idle_within_grace"] == 15 + 12  # 50-57 and 90-95.5 naming B (the stray at 91 among them)


def test_detection_without_the_agents_names_or_samples():
    found = interference.detection(PHASES, [], None, None)
    assert [b["detect_delay_s"] for b in found["bursts"]] == [None, None] and found["false_detections"] == 0
    found = interference.detection(PHASES, timeline(named=[], flags=[]), A, B)
    assert found["bursts"][0]["detect_delay_s"] is None and found["bursts"][0]["burst_flag_delay_s"] is None


AGENT_TEXT = """\
# TYPE mps_engine_info gauge
mps_engine_info{engine="mpsint-steady:8001",model="Qwen/Qwen2.5-0.5B-Instruct",url="http://127.0.0.1:8001/metrics",gpu_uuid="GPU-1",kind="vllm"} 1
mps_engine_info{engine="mpsint-bursting:8002",model="Qwen/Qwen2.5-1.5B-Instruct",url="http://127.0.0.1:8002/metrics",gpu_uuid="GPU-1",kind="vllm"} 1
mps_engine_info{engine="other:9000",model="x",url="http://127.0.0.1:9000/metrics",gpu_uuid="GPU-1",kind="vllm"} 1
mps_engine_burst{engine="mpsint-bursting:8002"} 1
mps_engine_burst{engine="mpsint-steady:8001"} 0
mps_engine_inter_token_latency_slowdown_ratio{engine="mpsint-steady:8001"} 1.8
mps_engine_inter_token_latency_baseline_seconds{engine="mpsint-steady:8001"} 0.0012
mps_engine_interference_slowdown_ratio{engine="mpsint-steady:8001",neighbour="mpsint-bursting:8002"} 1.8
mps_engine_latency_mean_seconds{engine="mpsint-steady:8001",latency="inter_token"} 0.0021
mps_engine_latency_mean_seconds{engine="mpsint-steady:8001",latency="time_to_first_token"} 0.5
mps_gpu_sm_active_ratio{gpu_uuid="GPU-1"} 0.5
"""


def test_agent_samples_keep_our_engines_and_every_named_neighbour():
    sample = interference.agent_sample(AGENT_TEXT, 1234.5)
    assert sample["t"] == 1234.5
    assert sample["interference"] == [{"engine": A, "neighbour": B, "value": 1.8}]
    assert sample["engines"] == {B: {"burst": 1.0},
                                 A: {"burst": 0.0, "itl_slowdown": 1.8, "itl_baseline_s": 0.0012, "itl_mean_s": 0.0021}}
    assert set(sample["info"]) == {A, B} and sample["info"][A]["gpu_uuid"] == "GPU-1"
    assert interference.agent_name([sample], "mpsint-steady", 8001) == A
    assert interference.agent_name([sample], "elsewhere", 8002) == B
    assert interference.agent_name([], "mpsint-steady", 8001) is None
    assert interference.agent_sample("", 1.0)["interference"] == []


def test_itl_by_kind_gives_burst_over_calm():
    lines = [{"role": "steady", "phase": "quiet"},
             {"role": "steady", "summary": "calm", "itl_p50_s": 0.001, "itl_p99_s": 0.002, "itl_mean_s": 0.001, "itl_n": 9},
             {"role": "steady", "summary": "burst", "itl_p50_s": 0.003, "itl_p99_s": 0.01, "itl_mean_s": 0.004, "itl_n": 5}]
    summary = interference.itl_by_kind(lines)
    assert set(summary["by_kind"]) == {"calm", "burst"}
    assert summary["burst_over_calm"] == pytest.approx({"itl_p50": 3.0, "itl_p99": 5.0, "itl_mean": 4.0})
    assert interference.itl_by_kind([]) == {"by_kind": {}, "burst_over_calm": {}}


def test_the_agent_discovers_both_proof_engines_as_vllm(tmp_path):
    args = interference.parse_args(["--out", str(tmp_path / "x.json")])
    assert args.timetable == "30,20,20,2" and args.modes == ["mps", "timesliced"]
    for index, role in enumerate(interference.SERVED):
        command = interference.engine_command(role, index, 8100 + index, tmp_path, args)
        found = parse_vllm_command(command)
        assert found is not None and found.name == f"{interference.SERVED[role]}:{8100 + index}"
        assert command[command.index("--role") + 1] == role
    assert "Qwen/Qwen2.5-1.5B-Instruct" in interference.engine_command("bursting", 1, 1, tmp_path, args)
    assert interference.estimate_seconds(["mps", "timesliced"], args.timetable) < 300  # the 5 minutes


# ---------------------------------------------------------------- the issue-21 sweep


def test_sweep_repeats_alternate_their_order():
    cases = [Case(512, "decode", ms) for ms in (0.0, 1.0, 2.0)]
    ordered, which = sweep.repeated(cases, 3)
    assert [case.cpu_work_ms for case in ordered] == [0, 1, 2, 2, 1, 0, 0, 1, 2]
    assert which == (0, 0, 0, 1, 1, 1, 2, 2, 2)


def test_sweep_plan_groups_and_thread_shares():
    launches = sweep.plan(list(sweep.CONFIGS), list(sweep.CPU_WORK_MS), ["alone", "timesliced", "mps"], 2,
                          list(sweep.SPLITS), list(sweep.SHARE_CONFIGS), list(sweep.SHARE_CPU_WORK_MS))
    assert [(s.group, s.launch.mode, s.split_text) for s in launches] == [
        ("0.5B@512", "alone", "100/100"), ("0.5B@512", "timesliced", "100/100"), ("0.5B@512", "mps", "100/100"),
        ("1.5B@1024", "alone", "100/100"), ("1.5B@1024", "timesliced", "100/100"), ("1.5B@1024", "mps", "100/100"),
        ("shares-0.5B@512-70-30", "mps", "70/30"), ("shares-0.5B@512-50-50", "mps", "50/50")]
    assert len(launches[0].launch.cases) == 14 and launches[3].launch.cases[0] == Case(1024, "decode", 0.0)
    assert launches[6].engine_env() == [{"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "70"},
                                        {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}]
    assert launches[0].engine_env() is None
    assert not any(s.split for s in sweep.plan([sweep.Config("0.5B", 512)], [0.0], ["alone", "timesliced"], 1,
                                               [(70, 30)], [sweep.Config("0.5B", 512)], [1.5]))
    assert sweep.calibrated(100.0, 50.0, 25.0) == 50.0 and sweep.calibrated(100.0, 0.0, 0.0) == 100.0


def test_sweep_plans_prefill_configurations_and_shares_of_other_sizes():
    prefill, shares = sweep.Config("1.5B", 1024, "prefill"), sweep.Config("1.5B", 1024)
    launches = sweep.plan([prefill], [0.0, 2.0], ["alone", "mps"], 1, [(50, 50)], [shares], [3.0])
    assert [(s.group, s.launch.mode, s.launch.size, s.split_text) for s in launches] == [
        ("1.5B@1024:prefill", "alone", "1.5B", "100/100"), ("1.5B@1024:prefill", "mps", "1.5B", "100/100"),
        ("shares-1.5B@1024-50-50", "mps", "1.5B", "50/50")]
    assert ":" not in "".join(s.launch.name for s in launches)  # launch names name folders
    assert launches[0].launch.cases == (Case(1024, "prefill", 0.0), Case(1024, "prefill", 2.0))
    assert launches[2].launch.cases == (Case(1024, "decode", 3.0),)


def test_sweep_configurations_with_their_own_cpu_levels_keep_them_and_others_take_the_sweeps():
    args = sweep.parse_args(["--out", "x", "--configs", "3B@512=0+1.5+3,1.5B@1024:prefill", "--cpu-work-ms", "0,2",
                             "--share-configs", "1.5B@1024:prefill=2+0"])
    own, default = args.configs
    assert own == sweep.Config("3B", 512) and own.cpu_work_ms == (0.0, 1.5, 3.0) and default.cpu_work_ms == ()
    launches = sweep.plan(args.configs, args.cpu_work_ms, ["alone", "mps"], 1, [(70, 30)], args.share_configs,
                          args.share_cpu_work_ms)
    assert [[case.cpu_work_ms for case in s.launch.cases] for s in launches] == [
        [0.0, 1.5, 3.0], [0.0, 1.5, 3.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]]
    assert launches[0].group == "3B@512" and launches[4].group == "shares-1.5B@1024-prefill-70-30"
    assert launches[4].needs == "1.5B@1024:prefill" and launches[0].needs is None
    for wrong in ("3B@512=", "3B@512=1+x", "3B@512=-1", "3B@512=nan", "3B@512=inf", "3B@512=1,5"):
        with pytest.raises(ValueError, match="SIZE@CONTEXT"):
            sweep.Config.parse(wrong)


def test_thread_shares_need_their_configuration_s_default_mps_rows_in_the_same_sweep():
    for shares in ("1.5B@512", "0.5B@512=3+0", "0.5B@512:prefill"):  # not measured, or not at these levels
        with pytest.raises(SystemExit):
            sweep.parse_args(["--out", "x", "--configs", "0.5B@512=0+1.5", "--share-configs", shares])
    assert sweep.parse_args(["--out", "x", "--configs", "0.5B@512=0+1.5", "--share-configs", "1.5B@512", "--splits="])
    assert sweep.shares_unmeasured([sweep.Config("0.5B", 512)], [0.0, 1.5], [sweep.Config("0.5B", 512)], [1.5, 0.0]) == []
    # a split whose configuration the budget skipped is skipped too, whatever time is left
    assert "1.5B@512, whose default MPS rows" in sweep.skip_reason("1.5B@512", ["1.5B@512"], 10.0, 5.0, 530.0)
    assert sweep.skip_reason("1.5B@512", ["3B@512"], 10.0, 5.0, 530.0) is None
    assert "past the 530 s budget" in sweep.skip_reason(None, [], 500.0, 40.0, 530.0)
    assert sweep.skip_reason(None, [], 500.0, 40.0, 0.0) is None  # no budget


def engine_line(case: int, tokens: float, itl: float) -> dict:
    return {"case": case, "tokens": tokens, "seconds": 1.0, "itl_p50_s": itl, "itl_p99_s": 2 * itl,
            "itl_mean_s": itl, "ttft_p50_s": None, "ttft_p99_s": None}


def test_sweep_rows_and_their_report():
    def launch(mode: str, engines: int, split=None, size="0.5B", context=512) -> sweep.SweepLaunch:
        cases, which = sweep.repeated([Case(context, "decode", 1.5)], 2)
        return sweep.SweepLaunch("g", sweep.Launch("g", size, mode, cases), which, split)

    alone = sweep.rows(launch("alone", 1), [[engine_line(0, 1000, 0.002), engine_line(1, 1100, 0.002)]], {})
    mps = sweep.rows(launch("mps", 2), [[engine_line(0, 900, 0.003), engine_line(1, 900, 0.003)],
                                        [engine_line(0, 900, 0.003), engine_line(1, 1000, 0.003)]], {0: None})
    shares = sweep.rows(launch("mps", 2, (70, 30)), [[engine_line(0, 1200, 0.0025)], [engine_line(0, 600, 0.004)]], {})
    assert [(row["repeat"], row["tokens_per_second"]) for row in mps] == [(0, 1800.0), (1, 1900.0)]
    assert mps[0]["itl_p99_s"] == 0.006 and mps[0]["per_engine_latency"][1]["itl_p50_s"] == 0.003
    assert shares == [] or shares[0]["split"] == "70/30"
    assert len(shares) == 1  # the second repeat: engine 1 did not report it
    text = sweep.render({"gpu": "NVIDIA H200", "driver": "1", "date": "d", "seconds": 2.0, "warmup": 0.5,
                         "rows": alone + mps + shares})
    assert "| 1.5 | 1,050 | – | +76% (+73 … +80) | – | – | 2.00 / – / 3.00 | 4.00 / – / 6.00 |" in text
    assert "| 1.5 | 70/30 | 2.50 / 5.00 | 4.00 / 8.00 | 1,200 / 600 | 1,800 | +80% |" in text
    assert "| 1.5 | 100/100 | 3.00 / 6.00 | 3.00 / 6.00 | 900 / 950 | 1,850 | +76% (+73 … +80) |" in text


def test_sweep_arguments(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path / "s.json"), "--configs", "0.5B@512,3B@512:prefill", "--splits", ""])
    assert args.configs == [sweep.Config("0.5B", 512), sweep.Config("3B", 512, "prefill")]
    assert args.splits == [] and args.seconds == 2.0 and args.share_configs == [sweep.Config("0.5B", 512)]
    quick = sweep.parse_args(["--out", str(tmp_path / "s.json"), "--quick", "--device", "cpu"])
    assert quick.configs == [sweep.Config("0.5B", 128)] and quick.cpu_work_ms == [0.0, 1.0]
    for wrong in ([], ["--out", "x", "--splits", "120/30"], ["--out", "x", "--configs", "9B@512"],
                  ["--out", "x", "--configs", "0.5B@512:chat"], ["--out", "x", "--share-configs", "0.5B"]):
        with pytest.raises(SystemExit):
            sweep.parse_args(wrong)
    assert isinstance(args, argparse.Namespace)


def test_sweep_report_gives_time_to_first_token_for_prefill_configurations():
    def launch(mode: str) -> sweep.SweepLaunch:
        return sweep.SweepLaunch("g", sweep.Launch("g", "1.5B", mode, (Case(1024, "prefill", 0.0),)), (0,))

    def line(tokens: float, ttft: float) -> dict:
        return {**engine_line(0, tokens, 0.004), "ttft_p50_s": ttft, "ttft_p99_s": 1.5 * ttft}

    rows = (sweep.rows(launch("alone"), [[line(1000, 0.1)]], {})
            + sweep.rows(launch("mps"), [[line(600, 0.18)], [line(600, 0.2)]], {}))
    text = sweep.render({"gpu": "NVIDIA H100", "driver": "1", "date": "d", "seconds": 2.0, "warmup": 0.5, "rows": rows})
    assert "**1.5B prefill at 1024**" in text
    assert "| 0 | 1,000 | – | +20% | – | – | 4.00 / – / 4.00 | 8.00 / – / 8.00 | 100.00 / – / 180.00 | 150.00 / – / 270.00 |" in text
