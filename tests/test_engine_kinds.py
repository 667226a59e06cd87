"""Engine kinds (issue 18): each kind and version read from its fixture (tests/fixtures/engines), the
kind recognised from the body, the configuration and the command line, refused values for every
kind, and reading only the lines used giving what the whole body gives."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from mpswatch.collectors.engines import EnginesCollector, render
from mpswatch.collectors.engines import status as engines_status
from mpswatch.config import ConfigError, load_config
from mpswatch.engine_kinds import KINDS, BadMetrics, EngineCommand
from mpswatch.engine_kinds import kinds as kinds_module
from mpswatch.engine_kinds import reading as reading_module
from mpswatch.engine_kinds.kinds import parse_engine_command, parse_engine_metrics, recognise_kind
from mpswatch.procfs import ProcFS

from tests.kit import fakevllm
from tests.kit.agentproc import agent_env, mpswatch_cmd
from tests.kit.fakevllm import FakeVllm, full_size_body, wait_ready
from tests.kit.scope import SessionProcesses
from tests.kit.snapshots import snapshot_of
from tests.test_engines import AGENT_NS, closed_port, write_net, write_proc

FIXTURES = Path(__file__).parent / "fixtures" / "engines"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# file: kind, model, running, waiting, prompt tokens, generation tokens, KV usage, latencies (name: count)
EXPECTED = {
    "vllm-0.6.3-v0.txt": ("vllm", "facebook/opt-125m", 2.0, 5.0, 21000.0, 7000.0, 0.25,
                          {"time_to_first_token": 100, "inter_token": 6900, "end_to_end": 100}),
    "vllm-0.8.4-v1.txt": ("vllm", "Qwen/Qwen2.5-1.5B-Instruct", 4.0, 0.0, 50000.0, 12500.0, 0.125,
                          {"time_to_first_token": 250, "inter_token": 12250, "queue": 250, "end_to_end": 250}),
    # two data-parallel engines: counters and gauges summed, KV usage averaged, histograms added up
    "vllm-0.11.0-v1-dp2.txt": ("vllm", "qwen-a", 8.0, 1.0, 50000.0, 10000.0, 0.375,
                               {"time_to_first_token": 200, "inter_token": 10000, "queue": 200, "end_to_end": 200}),
    # token_usage only; the older time_per_output_token_seconds as inter-token latency
    "sglang-0.4.3.txt": ("sglang", "meta-llama/Llama-3.1-8B-Instruct", 162.0, 2826.0, 812890.0, 755757.0, 0.28,
                         {"time_to_first_token": 1100, "inter_token": 740000, "end_to_end": 1120}),
    # two TP ranks report the same batch: rank 0 read; KV from the pool (30000 used of 200000), not token_usage
    "sglang-0.5.6-tp2.txt": ("sglang", "Qwen/Qwen3-8B", 12.0, 3.0, 400000.0, 90000.0, 0.15,
                             {"time_to_first_token": 1000, "inter_token": 89000, "end_to_end": 1000}),
    # a router's body: `sglang_` names, two workers summed (token_usage averaged)
    "sglang-0.5-router-underscores.txt": ("sglang", "Qwen/Qwen3-8B", 10.0, 3.0, 4000.0, 1200.0, 0.3,
                                          {"time_to_first_token": 400}),
    "llamacpp-b5600.txt": ("llamacpp", None, 2.0, 1.0, 6886.0, 3469.0, None, {}),
    # the KV gauges of older builds are not read: usage is unknown for every build
    "llamacpp-b4600-kv-gauges.txt": ("llamacpp", None, 2.0, 1.0, 6886.0, 3469.0, None, {}),
    "tgi-2.4.0.txt": ("tgi", None, 16.0, 7.0, 126000.0, 41500.0, None, {"queue": 415, "end_to_end": 415}),
}


def test_every_kind_has_a_parser_and_is_recognised_by_its_names():
    assert tuple(kinds_module.PARSERS) == KINDS
    assert [recognise_kind(f"# TYPE {prefix}x gauge\n") for prefix in ("vllm:", "sglang:", "sglang_", "llamacpp:", "tgi_")] \
        == ["vllm", "sglang", "sglang", "llamacpp", "tgi"]


def test_every_fixture_has_its_expectation():
    assert sorted(path.name for path in FIXTURES.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_kind_and_version_is_read(name):
    kind, model, running, waiting, prompt, generation, kv, latencies = EXPECTED[name]
    text = fixture(name)
    sample = parse_engine_metrics(text)
    assert recognise_kind(text) == kind and sample.kind == kind and sample.model == model
    assert (sample.requests_running, sample.requests_waiting) == (running, waiting)
    assert (sample.prompt_tokens_total, sample.generation_tokens_total) == (prompt, generation)
    assert sample.kv_cache_usage_ratio == (None if kv is None else pytest.approx(kv))
    assert {latency: h.count for latency, h in sample.latencies.items()} == latencies
    for histogram in sample.latencies.values():
        assert histogram.buckets[-1] == (math.inf, histogram.count) and histogram.sum > 0
        counts = [count for _, count in histogram.buckets]
        assert counts == sorted(counts)  # cumulative, summed bound by bound
    assert sample.rejected == {} and sample.token_series


def test_data_parallel_histograms_are_added_up_bound_by_bound():
    sample = parse_engine_metrics(fixture("vllm-0.11.0-v1-dp2.txt"))
    ttft = sample.latencies["time_to_first_token"]
    assert ttft.sum == pytest.approx(120 * 0.05 + 80 * 0.04) and ttft.count == 200
    # both engines' inter_token_latency_seconds; the hidden time_per_output_token_seconds beside it is not added
    assert sample.latencies["inter_token"].count == 6000 + 4000


def test_histograms_whose_label_sets_have_different_bounds_are_unknown():
    text = ('vllm:num_requests_running{engine="0"} 1\n'
            'vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0"} 1\n'
            'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf"} 2\n'
            'vllm:e2e_request_latency_seconds_count{engine="0"} 2\nvllm:e2e_request_latency_seconds_sum{engine="0"} 3\n'
            'vllm:e2e_request_latency_seconds_bucket{engine="1",le="2.0"} 1\n'
            'vllm:e2e_request_latency_seconds_bucket{engine="1",le="+Inf"} 2\n'
            'vllm:e2e_request_latency_seconds_count{engine="1"} 2\nvllm:e2e_request_latency_seconds_sum{engine="1"} 3\n')
    assert parse_engine_metrics(text).latencies == {}


def test_tgi_token_totals_are_the_request_histograms_sums_and_per_request_means():
    sample = parse_engine_metrics(fixture("tgi-2.4.0.txt"))
    assert sample.prompt_tokens_per_request == 126000.0 / 420 and sample.generation_tokens_per_request == 100.0
    assert set(sample.token_series) == {("tgi_request_input_length_sum",), ("tgi_request_generated_tokens_sum",)}


# ---------------------------------------------------------------- which kind

def test_a_body_with_vllm_and_tgi_names_is_vllm():
    """Some vLLM forks add TGI's names through an adapter: the engine's own names decide."""
    text = fixture("tgi-2.4.0.txt") + fixture("vllm-0.8.4-v1.txt")
    assert recognise_kind(text) == "vllm" and parse_engine_metrics(text).requests_running == 4.0


@pytest.mark.parametrize("text, error", [
    ("up 1\nprocess_open_fds 12\n", "no engine metric in the body"),
    ("<html>502</html>", "not Prometheus text"),
    ("# TYPE x counter\nx{ 1\n", "not Prometheus text"),
])
def test_a_body_of_no_kind_is_refused(text, error):
    with pytest.raises(BadMetrics, match=error):
        parse_engine_metrics(text)


def test_a_configured_kind_reads_the_body_as_that_kind_only():
    text = fixture("vllm-0.8.4-v1.txt")
    with pytest.raises(BadMetrics, match="no sglang: metric"):
        parse_engine_metrics(text, "sglang")
    assert parse_engine_metrics(fixture("sglang-0.4.3.txt"), "sglang").kind == "sglang"


@pytest.mark.parametrize("argv, expected", [
    (["python3", "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-8B", "--port", "30001"],
     EngineCommand(30001, "Qwen/Qwen3-8B", None, "sglang")),
    (["python", "-m", "sglang.launch_server", "--model", "/models/llama-3.1-8b", "--served-model-name", "l8"],
     EngineCommand(30000, "/models/llama-3.1-8b", "l8", "sglang")),
    (["/opt/llama.cpp/build/bin/llama-server", "-m", "/models/qwen2.5-1.5b-q4_k_m.gguf", "--metrics", "--port=8081"],
     EngineCommand(8081, "/models/qwen2.5-1.5b-q4_k_m.gguf", None, "llamacpp")),
    (["llama-server", "-hf", "ggml-org/gemma-3-1b-it-GGUF", "--alias", "gemma", "--metrics"],
     EngineCommand(8080, "ggml-org/gemma-3-1b-it-GGUF", "gemma", "llamacpp")),
    (["/usr/local/bin/text-generation-launcher", "--model-id", "HuggingFaceH4/zephyr-7b-beta", "--port", "8080"],
     EngineCommand(8080, "HuggingFaceH4/zephyr-7b-beta", None, "tgi")),
    (["vllm", "serve", "facebook/opt-125m"], EngineCommand(8000, "facebook/opt-125m", None, "vllm")),
])
def test_each_kind_is_recognised_from_its_command_line(argv, expected):
    assert parse_engine_command(argv) == expected


@pytest.mark.parametrize("argv", [
    ["python3", "-m", "sglang.bench_serving", "--backend", "sglang"],
    ["python3", "bench.py", "--note", "sglang.launch_server"],  # a mere argument that names it
    ["llama-cli", "-m", "x.gguf"],
    ["text-generation-router", "--port", "3000"],  # TGI's router: a child of its launcher
    ["text-generation-launcher", "--port", "99999"],
    ["llama-server", "--port", "x"],
])
def test_other_command_lines_are_no_engine(argv):
    assert parse_engine_command(argv) is None


def test_discovered_engines_of_each_kind_are_read_as_their_command_line_says(tmp_path):
    proc = tmp_path / "proc"
    write_proc(proc, 100, 1, ["python3", "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-8B", "--port", "30001"],
               listen=30001)
    write_proc(proc, 200, 1, ["/usr/bin/llama-server", "-m", "/models/qwen2.5-1.5b.gguf", "--metrics"], listen=8080)
    write_proc(proc, 300, 1, ["text-generation-launcher", "--model-id", "HuggingFaceH4/zephyr-7b-beta"])
    write_proc(proc, 301, 300, ["text-generation-router", "--port", "3000"], listen=3000)
    write_net(proc, 300, AGENT_NS, [])  # the launcher holds no socket; its router, a child, does
    (proc / "300" / "net" / "tcp").write_text((proc / "301" / "net" / "tcp").read_text())  # one namespace: one table
    bodies = {"http://127.0.0.1:30001/metrics": fixture("sglang-0.5.6-tp2.txt"),
              "http://127.0.0.1:8080/metrics": fixture("llamacpp-b5600.txt"),
              "http://127.0.0.1:3000/metrics": fixture("tgi-2.4.0.txt")}
    collector = EnginesCollector(procfs=ProcFS(proc), fetch=lambda url, timeout, cap: bodies[url].encode())
    engines = {e.name: e for e in collector.collect().engines}
    assert {name: (e.kind, e.up, e.requests_running) for name, e in engines.items()} == {
        "Qwen3-8B:30001": ("sglang", True, 12.0), "qwen2.5-1.5b.gguf:8080": ("llamacpp", True, 2.0),
        "zephyr-7b-beta:3000": ("tgi", True, 16.0)}
    # the model label of an engine whose body names none comes from its command line
    assert engines["qwen2.5-1.5b.gguf:8080"].model == "/models/qwen2.5-1.5b.gguf"


def test_a_discovered_engine_answering_another_kind_is_down_with_the_reason(tmp_path):
    """Its command line says SGLang; a body of vLLM's names is not read as if it were."""
    proc = tmp_path / "proc"
    write_proc(proc, 100, 1, ["python3", "-m", "sglang.launch_server", "--model-path", "m", "--port", "30001"],
               listen=30001)
    collector = EnginesCollector(procfs=ProcFS(proc),
                                 fetch=lambda url, timeout, cap: fixture("vllm-0.8.4-v1.txt").encode())
    [engine] = collector.collect().engines
    assert not engine.up and "no sglang: metric" in engine.error and engine.kind == "sglang"


# ---------------------------------------------------------------- values that cannot be, for every kind

@pytest.mark.parametrize("name, line, unknown, reason", [
    ("sglang-0.5.6-tp2.txt", 'sglang:kv_used_tokens{engine_type="unified",model_name="Qwen/Qwen3-8B",pp_rank="0",'
     'tp_rank="0"} 30000.0', "kv_cache_usage_ratio", "not_finite"),
    ("sglang-0.4.3.txt", 'sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 2826.0',
     "requests_waiting", "negative"),
    ("llamacpp-b5600.txt", "llamacpp:requests_processing 2", "requests_running", "not_finite"),
    ("llamacpp-b5600.txt", "llamacpp:tokens_predicted_total 3469", "generation_tokens_total", "negative"),
    ("tgi-2.4.0.txt", "tgi_queue_size 7", "requests_waiting", "not_finite"),
    ("tgi-2.4.0.txt", "tgi_request_generated_tokens_sum 41500.0", "generation_tokens_total", "negative"),
])
def test_a_value_that_cannot_be_makes_its_figure_unknown_for_every_kind(name, line, unknown, reason):
    text = fixture(name)
    assert line in text
    bad = line.rsplit(" ", 1)[0] + (" NaN" if reason == "not_finite" else " -1.0")
    sample = parse_engine_metrics(text.replace(line, bad))
    assert getattr(sample, unknown) is None and sample.rejected == {reason: 1}
    assert sample.requests_running is not None or unknown == "requests_running"  # the rest is read


def test_a_refused_bucket_makes_its_latency_unknown_and_a_duplicate_series_is_refused():
    text = fixture("tgi-2.4.0.txt")
    line = next(line for line in text.splitlines() if line.startswith('tgi_request_queue_duration_bucket{le="0.008"}'))
    sample = parse_engine_metrics(text.replace(line, line.rsplit(" ", 1)[0] + " +Inf"))
    assert "queue" not in sample.latencies and "end_to_end" in sample.latencies
    doubled = parse_engine_metrics(fixture("llamacpp-b5600.txt") + "llamacpp:requests_deferred 1\n")
    assert doubled.requests_waiting is None and doubled.rejected == {"duplicate_series": 1}


# ---------------------------------------------------------------- only the lines read

@pytest.mark.parametrize("name", [*sorted(EXPECTED), "full-size vLLM body"])
def test_reading_only_the_lines_used_gives_what_the_whole_body_gives(name, monkeypatch):
    text = full_size_body() if name == "full-size vLLM body" else fixture(name)
    filtered = parse_engine_metrics(text)
    monkeypatch.setattr(reading_module, "lines_read", lambda body, *_: body)
    assert parse_engine_metrics(text) == filtered


@pytest.mark.parametrize("name", ["vllm-0.11.0-v1-dp2.txt", "sglang-0.4.3.txt", "llamacpp-b5600.txt", "tgi-2.4.0.txt"])
def test_the_lines_read_leave_out_what_no_figure_uses(name):
    from mpswatch.engine_kinds import llamacpp, sglang, tgi, vllm
    read_names = {"vllm": vllm._READ_NAMES, "sglang": sglang._READ_NAMES, "llamacpp": llamacpp._READ_NAMES,
                  "tgi": tgi._READ_NAMES}[name.split("-")[0]]
    text = fixture(name)
    kept = reading_module.lines_read(text, read_names)
    assert 0 < len(kept.splitlines()) < len(text.splitlines())
    assert "python_gc" not in kept and "func_latency" not in kept and "batch_forward" not in kept


# ---------------------------------------------------------------- real processes of three kinds

@pytest.fixture
def kind_processes(tmp_path):
    started = []

    def start(kind: str) -> int:
        port = closed_port()
        argv = fakevllm.command(port, "qwen-a" if kind == "vllm" else None, kind=kind, link_dir=tmp_path)
        started.append(wait_ready(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)))
        return port

    yield start
    for child in started:
        child.kill()
        child.wait()


def test_an_sglang_and_a_llamacpp_engine_beside_a_vllm_one_are_each_read_with_their_kind(kind_processes, tmp_path):
    ports = {kind: kind_processes(kind) for kind in ("vllm", "sglang", "llamacpp")}
    configured = FakeVllm(body=str(FIXTURES / "sglang-0.4.3.txt"))  # configured, kind recognised from its body
    try:
        collector = EnginesCollector(configured=[{"name": "configured", "url": configured.url}],
                                     procfs=ProcFS(visible=SessionProcesses()))
        data = collector.collect()
    finally:
        configured.close()
    engines = {e.name: e for e in data.engines}
    assert {name: (e.kind, e.up) for name, e in engines.items()} == {
        f"qwen-a:{ports['vllm']}": ("vllm", True), f"Qwen2.5-1.5B-Instruct:{ports['sglang']}": ("sglang", True),
        f"Qwen2.5-1.5B-Instruct:{ports['llamacpp']}": ("llamacpp", True), "configured": ("sglang", True)}
    assert engines[f"Qwen2.5-1.5B-Instruct:{ports['sglang']}"].kv_cache_usage_ratio == pytest.approx(0.15)
    assert engines[f"Qwen2.5-1.5B-Instruct:{ports['llamacpp']}"].kv_cache_usage_ratio is None
    snapshot = snapshot_of(engines=data)
    out = _Families()
    render(data, snapshot.derived, out)
    assert sorted(labels[-1] for name, labels in out.added if name == "mps_engine_info") == [
        "llamacpp", "sglang", "sglang", "vllm"]
    shown = {entry["name"]: entry["kind"] for entry in engines_status(data, snapshot.derived, 0.0).entries["engines"]}
    assert shown["configured"] == "sglang" and shown[f"qwen-a:{ports['vllm']}"] == "vllm"


class _Families:
    """Records what a renderer adds."""

    def __init__(self) -> None:
        self.added: list[tuple[str, list[object]]] = []

    def add(self, name: str, labels: list[object], value: float) -> None:
        self.added.append((name, labels))


def test_vllm_current_kv_name_wins_over_the_older_one_beside_it():
    """Around v0.8–0.9 both names can be served; they are one measure, not two engines to average."""
    sample = parse_engine_metrics('vllm:kv_cache_usage_perc{model_name="m"} 0.5\n'
                                  'vllm:gpu_cache_usage_perc{model_name="m"} 0.1\n')
    assert sample.kv_cache_usage_ratio == 0.5


@pytest.mark.parametrize("name, preemptions", [
    ("vllm-0.6.3-v0.txt", 0.0), ("vllm-0.8.4-v1.txt", 2.0), ("vllm-0.11.0-v1-dp2.txt", 1.0),
    ("sglang-0.5.6-tp2.txt", None), ("llamacpp-b5600.txt", None), ("tgi-2.4.0.txt", None),
])
def test_preemptions_are_vllms_counter_and_unknown_for_the_kinds_without_one(name, preemptions):
    assert parse_engine_metrics(fixture(name)).preemptions_total == preemptions


# ---------------------------------------------------------------- configuration, and families without samples

def test_a_configured_engine_may_name_its_kind_and_a_kind_not_known_is_refused(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[[engines]]\nname = "a"\nurl = "http://127.0.0.1:30000/metrics"\nkind = "sglang"\n'
                    '[[engines]]\nname = "b"\nurl = "http://127.0.0.1:8000/metrics"\n')
    assert [(e.name, e.kind) for e in load_config(path, env={}).engines] == [("a", "sglang"), ("b", "auto")]
    path.write_text('[[engines]]\nname = "a"\nurl = "http://127.0.0.1:30000/metrics"\nkind = "ollama"\n')
    with pytest.raises(ConfigError, match="an engine's kind is one of auto, vllm, sglang, llamacpp, tgi"):
        load_config(path, env={})


def test_a_configured_kind_is_how_its_answers_are_read(tmp_path):
    configured = [{"name": "says-sglang", "url": "http://x:1/metrics", "kind": "sglang"},
                  {"name": "auto", "url": "http://y:1/metrics"}]
    collector = EnginesCollector(configured=configured, discover=False, procfs=ProcFS(tmp_path),
                                 fetch=lambda url, timeout, cap: fixture("vllm-0.8.4-v1.txt").encode())
    engines = {e.name: e for e in collector.collect().engines}
    assert not engines["says-sglang"].up and "no sglang: metric" in engines["says-sglang"].error
    assert engines["auto"].up and engines["auto"].kind == "vllm"


@pytest.mark.parametrize("text", [
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n",
    "# TYPE sglang:num_running_reqs gauge\n",
    "# TYPE llamacpp:requests_processing gauge\n",
    "# TYPE tgi_queue_size gauge\n",
])
def test_families_with_no_samples_yet_are_unknown_not_zero(text):
    """Some servers give HELP and TYPE lines before their first request: the engine is up, its figures unknown."""
    sample = parse_engine_metrics(text)
    assert (sample.requests_running, sample.requests_waiting, sample.prompt_tokens_total) == (None, None, None)
    assert sample.latencies == {} and sample.rejected == {}


def test_the_agent_reports_each_engine_with_its_kind(kind_processes, tmp_path):
    """Through the whole agent (`mpswatch status --json`, the test kit's launcher): discovered engines
    of three kinds and a configured one whose kind the configuration names."""
    ports = {kind: kind_processes(kind) for kind in ("vllm", "sglang", "llamacpp")}
    configured = FakeVllm(body=str(FIXTURES / "tgi-2.4.0.txt"))
    config = tmp_path / "config.toml"
    config.write_text(f'[[engines]]\nname = "tgi"\nurl = "{configured.url}"\nkind = "tgi"\n')
    try:
        run = subprocess.run(mpswatch_cmd("status", "--json", "--config", str(config), nvml="no_driver"),
                             env=agent_env(), capture_output=True, text=True, timeout=60)
    finally:
        configured.close()
    engines = {e["name"]: (e["kind"], e["up"], e["requests_running"]) for e in json.loads(run.stdout)["engines"]}
    assert engines == {f"qwen-a:{ports['vllm']}": ("vllm", True, 3.0),
                       f"Qwen2.5-1.5B-Instruct:{ports['sglang']}": ("sglang", True, 12.0),
                       f"Qwen2.5-1.5B-Instruct:{ports['llamacpp']}": ("llamacpp", True, 2.0),
                       "tgi": ("tgi", True, 16.0)}, run.stderr[-2000:]
