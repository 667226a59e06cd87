"""Latency per engine (issue 18, point 2): vLLM's latency histograms read from its body, kept over a
window by the engines collector, and exported by a running agent as p50, p99 and mean, with the
window stated; `status` shows them, or `?` and why."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from mpswatch.collectors.engines import EnginesCollector
from mpswatch.engine_kinds.vllm import parse_vllm_metrics
from mpswatch.procfs import ProcFS

from tests.kit.agentproc import Agent, agent_env, key, mpswatch_cmd
from tests.kit.fakevllm import FIXTURES, LATENCY_OBSERVATIONS, FakeVllm, full_size_body

# Each set of LATENCY_OBSERVATIONS worked out by hand against its bucket layout (tests/kit/fakevllm.py's
# HISTOGRAMS): (p50, p99, mean) in seconds. Every body adds one set, so any window's increase is a
# whole number of sets, and these are its figures.
EXPECTED = {
    # 4 x 0.03 in (0.02, 0.04], 4 x 0.05 in (0.04, 0.06], 2 x 0.3 in (0.25, 0.5]
    # p50: rank 5, the 1st of 4 in (0.04, 0.06]: 0.04 + 0.02 * 1/4; p99: rank 9.9: 0.25 + 0.25 * 1.9/2
    "time_to_first_token": (0.045, 0.4875, 0.092),
    # 8 x 0.02 in (0.01, 0.025], 2 x 0.09 in (0.075, 0.1]
    "inter_token": (0.01 + 0.015 * 5 / 8, 0.075 + 0.025 * 1.9 / 2, 0.034),
    # 3 x 0.1 in (0, 0.3] (the lowest bucket starts at 0), 1 x 1.2 in (1.0, 1.5]
    "queue": (0.3 * 2 / 3, 1.0 + 0.5 * 0.96, 0.375),
    # 2 x 2.2 in (2.0, 2.5], 2 x 4.0 in (2.5, 5.0]
    "end_to_end": (2.5, 2.5 + 2.5 * 1.96 / 2, 3.1),
}


def test_expected_figures_match_the_observations_means():
    """The hand-worked means are the observation sets' own: the table above is about the fake."""
    names = {"time_to_first_token": "vllm:time_to_first_token_seconds", "inter_token": "vllm:inter_token_latency_seconds",
             "queue": "vllm:request_queue_time_seconds", "end_to_end": "vllm:e2e_request_latency_seconds"}
    for latency, (_, _, mean) in EXPECTED.items():
        observations = LATENCY_OBSERVATIONS[names[latency]]
        assert sum(observations) / len(observations) == pytest.approx(mean)


# ---------------------------------------------------------------- reading vLLM's histograms


def test_vllm_latency_histograms_are_read_and_summed_over_engines():
    lines = []
    for line in full_size_body().splitlines():  # each TTFT sample also for a second engine, as V1 0.10+ with DP
        lines += [line, line.replace('engine="0"', 'engine="1"')] if line.startswith("vllm:time_to_first") else [line]
    two_engines = "\n".join(lines) + "\n"
    sample = parse_vllm_metrics(two_engines)
    assert set(sample.latencies) == {"time_to_first_token", "inter_token", "queue", "end_to_end"}
    ttft, itl = sample.latencies["time_to_first_token"], sample.latencies["inter_token"]
    assert ttft.buckets[-1] == (float("inf"), 2 * 22 * 7.0) and ttft.count == 2 * 22 * 7.0 and ttft.sum == 2 * 1234.5
    assert itl.buckets[0] == (0.01, 0.0) and itl.buckets[1] == (0.025, 7.0) and itl.count == 19 * 7.0


def test_before_v0_10_inter_token_latency_is_time_per_output_token():
    body = "\n".join(line.replace("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
                     for line in full_size_body().splitlines()) + "\n"
    assert parse_vllm_metrics(body).latencies["inter_token"].count == 19 * 7.0


def test_a_histogram_without_samples_or_with_a_refused_sample_is_unknown():
    """HELP and TYPE only (before a first request), or a NaN bucket: absent, never zeros."""
    text = (FIXTURES / "metrics-v0.10-names.txt").read_text()
    text = text.replace("{running}", "1").replace("{waiting}", "0").replace("{kv}", "0.5")
    text = text.replace("{prompt}", "1").replace("{generation}", "1")
    assert "time_to_first_token" in parse_vllm_metrics(text).latencies
    nan = text.replace('le="0.04",model_name="Qwen/Qwen2.5-1.5B-Instruct"} 371.0',
                       'le="0.04",model_name="Qwen/Qwen2.5-1.5B-Instruct"} NaN')
    refused = parse_vllm_metrics(nan)
    assert "time_to_first_token" not in refused.latencies and refused.rejected["not_finite"] == 1
    bad_le = text.replace('le="0.04"', 'le="fast"')
    assert "time_to_first_token" not in parse_vllm_metrics(bad_le).latencies
    empty = "\n".join(line for line in text.splitlines()
                      if not line.startswith("vllm:time_to_first_token_seconds")) + "\n"
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in empty
    assert parse_vllm_metrics(empty).latencies == {}


# ---------------------------------------------------------------- the engines collector's window


@pytest.fixture
def fake_with_latencies():
    fake = FakeVllm(latencies=LATENCY_OBSERVATIONS)
    yield fake
    fake.close()


def test_the_collector_keeps_the_window_and_states_it(fake_with_latencies, tmp_path):
    (tmp_path / "proc").mkdir()
    collector = EnginesCollector(configured=[{"name": "a", "url": fake_with_latencies.url}], discover=False,
                                 procfs=ProcFS(tmp_path / "proc"), latency_window_seconds=30)
    [first] = collector.collect().engines
    assert first.up and first.latencies == {} and first.latency_window_seconds is None  # one scrape: unknown
    time.sleep(0.05)
    [second] = collector.collect().engines
    assert second.latency_window_seconds is not None and 0 < second.latency_window_seconds < 30
    for latency, (p50, p99, mean) in EXPECTED.items():
        found = second.latencies[latency]
        assert found.quantiles[0.5] == pytest.approx(p50) and found.quantiles[0.99] == pytest.approx(p99)
        assert found.mean == pytest.approx(mean)


# ---------------------------------------------------------------- end to end


def test_a_running_agent_exports_each_engines_latency_over_its_window(tmp_path):
    """A configured fake vLLM whose histograms advance by one observation set per body: the agent's
    p50, p99 and mean are the set's, worked out by hand, and the window is stated."""
    fake = FakeVllm(latencies=LATENCY_OBSERVATIONS)
    steady = FakeVllm()  # the tests' body: a histogram that never moves, so nothing observed in the window
    args = ["--engine", f"a={fake.url}", "--engine", f"steady={steady.url}", "--pipe-dir", str(tmp_path / "none")]
    env = {"MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": "0.3", "MPSWATCH_ENGINE_SCRAPE_DISCOVER": "false",
           "MPSWATCH_ENGINE_SCRAPE_LATENCY_WINDOW_SECONDS": "5"}
    try:
        with Agent(args, env=env, log_path=tmp_path / "agent.log") as agent:
            def window_of_two_scrapes(samples):
                span = samples.get(key("mps_engine_latency_window_seconds", engine="a"))
                return samples if span is not None and span > 0.5 else None
            samples = agent.wait_for(window_of_two_scrapes, timeout=30)
            report = json.loads(agent.get("/status")[1])  # what `mpswatch status --agent URL` shows
    finally:
        fake.close()
        steady.close()
    assert samples[key("mps_engine_latency_window_seconds", engine="a")] <= 5
    for latency, (p50, p99, mean) in EXPECTED.items():
        assert samples[key("mps_engine_latency_p50_seconds", engine="a", latency=latency)] == pytest.approx(p50)
        assert samples[key("mps_engine_latency_p99_seconds", engine="a", latency=latency)] == pytest.approx(p99)
        assert samples[key("mps_engine_latency_mean_seconds", engine="a", latency=latency)] == pytest.approx(mean)
    [entry] = [e for e in report["engines"] if e["name"] == "a"]
    assert entry["latencies"]["inter_token"]["p99"] == pytest.approx(EXPECTED["inter_token"][1])
    assert "ITL p50/p99 19/99 ms over " in entry["reason"]  # 19.375 and 98.75 ms
    # the steady engine has a TTFT histogram and a window, but no request in it: no figure, no zero
    assert key("mps_engine_latency_window_seconds", engine="steady") in samples
    assert not [k for k in samples if k[0].startswith("mps_engine_latency_") and ("engine", "steady") in k[1]
                and k[0] != "mps_engine_latency_window_seconds"]


def test_a_one_shot_status_shows_latency_as_unknown_and_why(fake_with_latencies, tmp_path):
    args = ["status", "--json", "--engine", f"a={fake_with_latencies.url}", "--pipe-dir", str(tmp_path / "none")]
    env = agent_env({"MPSWATCH_ENGINE_SCRAPE_DISCOVER": "false"})
    done = subprocess.run(mpswatch_cmd(*args), env=env, capture_output=True, text=True, timeout=60)
    report = json.loads(done.stdout)
    [engine] = [e for e in report["engines"] if e["name"] == "a"]
    assert engine["latencies"] == {} and engine["latency_window_seconds"] is None
    assert "TTFT p50/p99 ?/? ms, ITL p50/p99 ?/? ms" in engine["reason"]
    assert any(note.startswith("? for ") and "latency" in note for note in report["notes"])


def test_an_engine_without_latency_histograms_says_so_and_needs_no_second_look(tmp_path):
    """`?` and "needs two samples" would promise figures a second look cannot give."""
    old = FakeVllm(body="metrics-v0.6-names.txt")
    try:
        args = ["status", "--json", "--engine", f"old={old.url}", "--pipe-dir", str(tmp_path / "none")]
        env = agent_env({"MPSWATCH_ENGINE_SCRAPE_DISCOVER": "false"})
        done = subprocess.run(mpswatch_cmd(*args), env=env, capture_output=True, text=True, timeout=60)
    finally:
        old.close()
    report = json.loads(done.stdout)
    [engine] = [e for e in report["engines"] if e["name"] == "old"]
    assert engine["up"] and "no latency histograms" in engine["reason"] and "TTFT" not in engine["reason"]
    assert not any("latency" in note for note in report["notes"])
