"""The pure parts of benchmarks/mps_gain (issue 10), on the CPU: shapes and their arithmetic, the
case list, the engine's command line as the agent reads it, results, signals and the table.
None of this may import torch: the engine alone needs it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from mpswatch.engine_kinds.vllm import parse_vllm_command

from benchmarks.mps_gain import cases as cases_module
from benchmarks.mps_gain import report, run
from benchmarks.mps_gain.cases import SHAPES, Case, format_cases, parse_cases


def test_nothing_here_imports_torch():
    assert "torch" not in sys.modules


@pytest.mark.parametrize("size, published", [("0.5B", 0.49), ("1.5B", 1.54), ("3B", 3.09), ("7B", 7.61)])
def test_params_billion_from_the_shapes_match_qwens_published_sizes(size, published):
    assert SHAPES[size].params_billion == pytest.approx(published, abs=0.01)


def test_two_7b_engines_at_8k_context_fit_an_h200():
    shape = SHAPES["7B"]
    cache = Case(8192, "decode").kv_cache_bytes(shape)
    assert shape.kv_bytes_per_token == 28 * 2 * 4 * 128 * 2
    assert cache == 32 * 8192 * 57344  # 15.0 GB
    weights = shape.params * 2
    assert 2 * (weights + cache) < 100e9  # an H200 has about 139 GiB
    assert Case(8192, "prefill").kv_cache_bytes(shape) < 1e9


def test_workload_batches():
    assert Case(128, "decode").batch == 32 and Case(8192, "decode").batch == 32
    assert [Case(context, "prefill").batch for context in (128, 512, 2048, 8192)] == [64, 16, 4, 1]
    assert Case(512, "prefill").cache_tokens == 512 + 16 and Case(512, "decode").cache_tokens == 512


def test_case_specs_round_trip_and_take_a_default_cpu_work():
    cases = [Case(128, "decode"), Case(8192, "prefill"), Case(512, "decode", 2.5)]
    assert parse_cases(format_cases(cases)) == cases
    assert parse_cases("512:decode,512:decode:0", cpu_work_ms=3) == [Case(512, "decode", 3), Case(512, "decode", 0)]
    for bad in ("512", "512:train", "0:decode", "512:decode:-1"):
        with pytest.raises(ValueError):
            Case.parse(bad)


def test_plan_builds_each_model_once_per_mode_and_loops_it_over_every_case():
    launches = run.plan(["0.5B", "1.5B"], [128, 512, 2048, 8192], ["decode", "prefill"], list(run.MODES), [])
    assert [(launch.size, launch.mode, launch.engines) for launch in launches] == [
        ("0.5B", "alone", 1), ("0.5B", "timesliced", 2), ("0.5B", "mps", 2),
        ("1.5B", "alone", 1), ("1.5B", "timesliced", 2), ("1.5B", "mps", 2),
    ]
    assert all(len(launch.cases) == 8 for launch in launches)
    assert {(case.context, case.workload) for case in launches[0].cases} == {
        (context, workload) for context in (128, 512, 2048, 8192) for workload in ("decode", "prefill")
    }


def test_plan_adds_the_cpu_bound_case_in_every_mode():
    launches = run.plan([], [512], ["decode"], list(run.MODES), [3.0, 30.0])
    assert [launch.name for launch in launches] == ["cpu-bound-alone", "cpu-bound-timesliced", "cpu-bound-mps"]
    assert launches[0].size == "0.5B"
    assert launches[0].cases == (Case(512, "decode", 3.0), Case(512, "decode", 30.0))


def test_estimate_counts_process_starts_the_mps_daemon_and_every_case():
    launches = run.plan(["0.5B"], [512], ["decode", "prefill"], list(run.MODES), [])
    per_case = run.CASE_OVERHEAD_S + 1 + 3
    expected = 3 * run.LAUNCH_START_S + run.MPS_DAEMON_S + 3 * 2 * per_case
    assert run.estimate_seconds(launches, seconds=3, warmup=1) == pytest.approx(expected)


def test_the_agent_discovers_the_engine_as_vllm(tmp_path):
    launch = run.Launch("0.5B", "0.5B", "mps", (Case(512, "decode"),))
    args = argparse.Namespace(seconds=3.0, warmup=1.0, device="cuda")
    command = run.engine_command(launch, 1, 8123, tmp_path, args)
    found = parse_vllm_command(command)
    assert found is not None
    assert (found.port, found.model, found.name) == (8123, "Qwen/Qwen2.5-0.5B-Instruct", "mpsgain-1:8123")
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.45"


def test_combine_sums_the_engines_and_leaves_out_a_case_one_engine_missed():
    launch = run.Launch("3B", "3B", "timesliced", (Case(128, "decode"), Case(512, "decode")))
    lines = [
        [{"case": 0, "tokens": 3000, "seconds": 3.0}, {"case": 1, "tokens": 900, "seconds": 3.0}],
        [{"case": 0, "tokens": 1500, "seconds": 3.0}],
    ]
    [case] = run.combine(launch, lines, {0: {"gpus": [], "engines": []}})
    assert case == {
        "size": "3B", "params_billion": SHAPES["3B"].params_billion, "context": 128, "workload": "decode",
        "cpu_work_ms": 0.0, "mode": "timesliced", "tokens_per_second": 1500.0,
        "per_engine_tokens_per_second": [1000.0, 500.0], "signals": {"gpus": [], "engines": []},
    }


AGENT_METRICS = """\
# TYPE mps_gpu_sm_active_ratio gauge
mps_gpu_sm_active_ratio{gpu_uuid="GPU-1"} 0.61
# TYPE mps_gpu_dram_bandwidth_ratio gauge
mps_gpu_dram_bandwidth_ratio{gpu_uuid="GPU-1"} 0.42
# TYPE mps_gpu_memory_used_bytes gauge
mps_gpu_memory_used_bytes{gpu_uuid="GPU-1"} 6.4e10
# TYPE mps_gpu_info gauge
mps_gpu_info{gpu="0",gpu_uuid="GPU-1",name="NVIDIA H200",driver_version="580.159.04",compute_mode="Default"} 1
# TYPE mps_engine_info gauge
mps_engine_info{engine="mpsgain-0:8001",model="Qwen/Qwen2.5-7B-Instruct",url="http://127.0.0.1:8001/metrics",gpu_uuid="GPU-1"} 1
mps_engine_info{engine="qwen-a:9000",model="Qwen/Qwen2.5-1.5B-Instruct",url="http://127.0.0.1:9000/metrics",gpu_uuid=""} 1
# TYPE mps_engine_tokens_per_second gauge
mps_engine_tokens_per_second{engine="mpsgain-0:8001"} 812.5
mps_engine_tokens_per_second{engine="qwen-a:9000"} 3.0
# TYPE mps_engine_busiest_thread_cpu_ratio gauge
mps_engine_busiest_thread_cpu_ratio{engine="mpsgain-0:8001"} 0.93
# TYPE mps_engine_cpu_bound gauge
mps_engine_cpu_bound{engine="mpsgain-0:8001"} 1
# TYPE mps_engine_mps_attached gauge
mps_engine_mps_attached{engine="mpsgain-0:8001"} 1
# TYPE mps_engine_gpu_memory_bytes gauge
mps_engine_gpu_memory_bytes{engine="mpsgain-0:8001",gpu_uuid="GPU-1"} 3.0e10
# TYPE mps_gpu_memory_by_kind_bytes gauge
mps_gpu_memory_by_kind_bytes{gpu_uuid="GPU-1",kind="mps_server"} 5.0e8
"""


def test_signals_keep_the_gpu_and_our_engines_only():
    signals = run.signals_from_metrics(AGENT_METRICS)
    assert signals["gpus"] == [{
        "gpu": "0", "uuid": "GPU-1", "mps_gpu_sm_active_ratio": 0.61, "mps_gpu_dram_bandwidth_ratio": 0.42,
        "mps_gpu_sm_occupancy_ratio": None, "mps_gpu_tensor_active_ratio": None, "mps_gpu_utilization_ratio": None,
        "mps_gpu_memory_used_bytes": 6.4e10,
    }]
    assert signals["engines"] == [{
        "engine": "mpsgain-0:8001", "model": "Qwen/Qwen2.5-7B-Instruct", "url": "http://127.0.0.1:8001/metrics",
        "gpu_uuid": "GPU-1", "mps_engine_tokens_per_second": 812.5, "mps_engine_busiest_thread_cpu_ratio": 0.93,
        "mps_engine_cpu_bound": 1.0, "mps_engine_mps_attached": 1.0, "mps_engine_gpu_memory_bytes": 3.0e10,
    }]


def result_case(mode: str, tokens_per_second: float, sm: float | None = None, size: str = "0.5B",
                context: int = 512, workload: str = "decode", busiest: float | None = None) -> dict:
    signals = None
    if sm is not None:
        signals = {"gpus": [{"gpu": "0", "uuid": "GPU-1", "mps_gpu_sm_active_ratio": sm,
                             "mps_gpu_dram_bandwidth_ratio": sm / 2}],
                   "engines": [{"engine": "mpsgain-0:1", "gpu_uuid": "GPU-1", "mps_engine_cpu_bound": 0.0,
                                "mps_engine_busiest_thread_cpu_ratio": busiest}]}
    return {"size": size, "params_billion": SHAPES[size].params_billion, "context": context, "workload": workload,
            "cpu_work_ms": 0.0, "mode": mode, "tokens_per_second": tokens_per_second,
            "per_engine_tokens_per_second": [tokens_per_second], "signals": signals}


def results(cases: list[dict], date: str = "2026-11-30T10:00:00+00:00", seconds: float = 3.0) -> dict:
    return {"gpu": "NVIDIA H200", "driver": "580.159.04", "date": date, "seconds": seconds, "cases": cases}


def test_merge_takes_a_case_measured_twice_from_the_last_file():
    first = results([result_case("alone", 100.0), result_case("mps", 150.0)])
    second = results([result_case("mps", 170.0), result_case("alone", 50.0, size="7B")],
                     date="2026-11-30T11:00:00+00:00", seconds=2.5)
    merged = report.merge([first, second])
    assert merged["date"] == "2026-11-30T10:00:00+00:00, 2026-11-30T11:00:00+00:00"
    assert merged["seconds"] == 2.5 and merged["gpu"] == "NVIDIA H200"
    assert [(case["size"], case["mode"], case["tokens_per_second"]) for case in merged["cases"]] == [
        ("0.5B", "alone", 100.0), ("0.5B", "mps", 170.0), ("7B", "alone", 50.0)]


def test_table_rows_give_gains_over_alone_and_the_agents_signals():
    table = report.render_table(results([
        result_case("alone", 1000.0, sm=0.40, busiest=0.12),
        result_case("timesliced", 1100.0),
        result_case("mps", 1530.0, sm=0.80),
        result_case("alone", 200.0, size="7B", context=8192, workload="prefill"),
        result_case("mps", 190.0, size="7B", context=8192, workload="prefill"),
    ]))
    lines = table.splitlines()
    assert lines[0].startswith("NVIDIA H200, driver 580.159.04")
    assert lines[4] == "| 0.5B | 512 | decode | 0 | 1,000 | +10% | +53% | 0.40 → 0.80 | 0.20 → 0.40 | 0.12 |"
    assert lines[5] == "| 7B | 8192 | prefill | 0 | 200 | – | -5% | – → – | – → – | – |"


def test_the_table_goes_between_the_markers(tmp_path):
    doc = tmp_path / "mps-gain.md"
    doc.write_text(f"# Title\n\n{report.START}\nold table\n{report.END}\n\nAfter.\n")
    report.write_table(doc, "| new |")
    assert doc.read_text() == f"# Title\n\n{report.START}\n| new |\n{report.END}\n\nAfter.\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit):
        report.write_table(doc, "| new |")


def test_the_docs_frame_has_the_markers():
    text = (Path(report.ROOT) / "docs" / "mps-gain.md").read_text()
    assert text.index(report.START) < text.index(report.END)
    assert cases_module.PREFILL_TOKENS == 8192 and "8192" in text
