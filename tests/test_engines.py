"""Engines: vLLM bodies served on loopback, discovery from a procfs the test builds and from real
child processes, load balance, MPS attachment, and a real CPU-bound thread."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mpswatch.collectors.engines import CPU_BOUND_THREAD_RATIO, EnginesCollector, tokens_per_second
from mpswatch.derive import load_balance
from mpswatch.engine_kinds import BadMetrics, parameters_from_model_name, reading
from mpswatch.engine_kinds.vllm import parse_vllm_command, parse_vllm_metrics
from mpswatch.exposition import render
from mpswatch.procfs import ProcFS, parse_pressure, schedstat_wait_ns, stat_cpu_ticks
from mpswatch.snapshot import (
    DaemonState,
    GpuData,
    GpuProcess,
    GpuState,
    MpsControlData,
    MpsDaemon,
    NodeSnapshot,
)

from tests.kit import fakevllm
from tests.kit.fakevllm import FIXTURES, full_size_body, wait_ready
from tests.kit.scope import SessionProcesses
from tests.kit.snapshots import snapshot_of

UUID = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"


def body(name: str, tokens: float = 400.0) -> str:
    return (FIXTURES / name).read_text().replace("{running}", "3.0").replace("{waiting}", "1.0") \
        .replace("{kv}", "0.42").replace("{prompt}", str(tokens * 0.75)).replace("{generation}", str(tokens * 0.25))


def test_current_vllm_names_are_read():
    sample = parse_vllm_metrics(body("metrics-v0.10-names.txt"))
    assert sample.model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (sample.requests_running, sample.requests_waiting, sample.kv_cache_usage_ratio) == (3.0, 1.0, 0.42)
    assert (sample.prompt_tokens_total, sample.generation_tokens_total) == (300.0, 100.0)
    assert sample.gpu_memory_utilization == 0.45
    assert (sample.prompt_tokens_per_request, sample.generation_tokens_per_request) == (180.0, 60.0)


def test_older_vllm_names_are_read():
    sample = parse_vllm_metrics(body("metrics-v0.6-names.txt"))
    assert sample.kv_cache_usage_ratio == 0.42 and sample.model == "facebook/opt-125m"
    assert sample.gpu_memory_utilization == 0.9
    assert sample.prompt_tokens_per_request is None  # no request histograms in that body: unknown, not 0


@pytest.mark.parametrize("model, parameters", [
    ("Qwen/Qwen2.5-1.5B-Instruct", 1.5e9),
    ("Qwen/Qwen2.5-0.5B", 0.5e9),
    ("meta-llama/Llama-3.1-8B-Instruct", 8e9),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", 3.6e8),
    ("facebook/opt-125m", 1.25e8),
    ("Qwen/Qwen2.5-7B-Instruct-AWQ", 7e9),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", None),
    ("Qwen/Qwen3-30B-A3B", None),
    ("mistralai/MIXTRAL-8X7B", None),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", None),
    ("Qwen/Qwen2.5-7B-Instruct-1M", 7e9),
    ("/models/llama-3.1-8b-instruct/", 8e9),
    ("org/chat-A100-tuned-1.5B", 1.5e9),
    ("org/model-0B", None),
    ("my-org/chat-model", None),
    ("meta-llama/Llama-3.2-1B-Instruct-3B-distill", None),  # two counts: which one is unknown
    (None, None),
])
def test_the_parameter_count_is_read_from_the_model_name_or_left_unknown(model, parameters):
    assert parameters_from_model_name(model) == parameters


@pytest.mark.parametrize("text", ["<html>502</html>", "# TYPE x counter\nx{ 1\n", "up 1\n", ""])
def test_text_that_is_not_vllm_metrics_is_refused(text):
    with pytest.raises(BadMetrics):
        parse_vllm_metrics(text)


def test_tokens_per_second_handles_a_counter_reset_per_series():
    before = {("p", "0"): 1000.0, ("p", "1"): 500.0}
    assert tokens_per_second((10.0, before), (12.0, {("p", "0"): 1400.0, ("p", "1"): 600.0})) == 250.0
    # engine 1 restarted (its series went back) while engine 0 went on
    assert tokens_per_second((10.0, before), (12.0, {("p", "0"): 1400.0, ("p", "1"): 100.0})) == 250.0
    # a series that vanished adds nothing, one that appeared adds nothing yet
    assert tokens_per_second((10.0, before), (12.0, {("p", "0"): 1400.0, ("p", "2"): 9e9})) == 200.0
    assert tokens_per_second(None, (12.0, before)) is None


def test_data_parallel_engines_sum_counters_and_average_kv_usage():
    text = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.6\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7\n'
        "# TYPE vllm:prompt_tokens counter\n"
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0\n'
        'vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e9\n'
        'vllm:prompt_tokens_total{engine="1",model_name="m"} 50.0\n'
        'vllm:prompt_tokens_created{engine="1",model_name="m"} 1.7e9\n'
    )
    sample = parse_vllm_metrics(text)
    assert sample.kv_cache_usage_ratio == pytest.approx(0.65) and sample.prompt_tokens_total == 150.0
    assert len(sample.token_series) == 2


def test_load_balance_shares_and_imbalance():
    shares, ratio = load_balance({"a": 300.0, "b": 100.0})
    assert shares == {"a": 0.75, "b": 0.25} and ratio == 1.5
    assert load_balance({"a": 0.0, "b": 0.0}) == ({}, None)
    assert load_balance({"a": 50.0})[1] == 1.0


@pytest.mark.parametrize(
    "argv,name,port",
    [
        (["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct", "--port", "8001",
          "--served-model-name", "qwen-a"], "qwen-a:8001", 8001),
        (["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "facebook/opt-125m", "--host", "10.0.0.5"],
         "opt-125m:8000", 8000),
        (["vllm", "serve", "/models/llama/", "--port=9000"], "llama:9000", 9000),
        (["vllm", "serve", "--port", "8001", "/models/x", "--port", "8002"], "x:8002", 8002),
    ],
)
def test_vllm_command_lines_give_name_and_port(argv, name, port):
    command = parse_vllm_command(argv)
    assert (command.name, command.port) == (name, port)


@pytest.mark.parametrize("argv", [["python3", "-c", "from multiprocessing.spawn import spawn_main"],
                                  ["vllm", "bench", "serve"], ["vllm", "serve", "m", "--port", "x"],
                                  ["vllm", "serve", "m", "--port="], []])
def test_other_command_lines_are_not_engines(argv):
    assert parse_vllm_command(argv) is None


def test_proc_parsers():
    stat = "4242 (python3 -m (vllm)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 100"
    assert stat_cpu_ticks(stat) == 300
    assert schedstat_wait_ns("1500000 2500000 40\n") == 2500000
    assert parse_pressure("some avg10=12.50 avg60=3.00 avg300=1.00 total=1\nfull avg10=0 avg60=0\n") == {
        "avg10": 0.125, "avg60": 0.03}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collector_for(engines: dict[str, str], tmp_path, **kw) -> EnginesCollector:
    (tmp_path / "proc").mkdir(exist_ok=True)
    configured = [{"name": name, "url": url} for name, url in engines.items()]
    return EnginesCollector(configured=configured, discover=False, procfs=ProcFS(tmp_path / "proc"), **kw)


def test_each_bad_endpoint_marks_only_its_own_engine_down(servers, tmp_path):
    good, old = servers(), servers(body="metrics-v0.6-names.txt")
    slow, garbage, huge = servers(mode="slow"), servers(mode="garbage"), servers(mode="huge")
    trickle = servers(mode="trickle")
    engines = {"good": good.url, "old": old.url, "slow": slow.url, "garbage": garbage.url, "huge": huge.url,
               "trickle": trickle.url, "down": f"http://127.0.0.1:{closed_port()}/metrics"}
    collector = collector_for(engines, tmp_path, timeout_seconds=0.5, max_body_bytes=16 << 20)
    started = time.monotonic()
    first = {e.name: e for e in collector.collect().engines}
    took = time.monotonic() - started
    time.sleep(0.2)
    second = {e.name: e for e in collector.collect().engines}
    assert took < 1.5  # bounded by the deadline, not by the slow engine's 5 s
    assert first["good"].up and first["old"].up and first["old"].kv_cache_usage_ratio == 0.42
    assert not first["slow"].up and "no answer within 0.5 s" in first["slow"].error
    assert not first["trickle"].up and "no answer within 0.5 s" in first["trickle"].error
    assert not first["garbage"].up and "not Prometheus text" in first["garbage"].error
    assert not first["huge"].up and "larger than" in first["huge"].error
    assert not first["down"].up and first["down"].error
    assert first["good"].tokens_per_second is None  # one scrape: no rate yet
    assert second["good"].tokens_per_second > 0 and second["good"].prompt_tokens_total == 150.0
    assert not second["trickle"].up  # a byte every 0.1 s never makes an answer


AGENT_NS = "net:[4026531833]"


def write_proc(root: Path, pid: int, ppid: int, argv: list[str], environ: str = "", threads=None,
               listen: int | None = None) -> None:
    """A process; with `listen`, one that listens on 127.0.0.1:<listen> in the agent's own network
    namespace (which the test writes at `self`)."""
    d = root / str(pid)
    (d / "task").mkdir(parents=True)
    if listen is not None:
        write_net(root, pid, AGENT_NS, [("127.0.0.1", listen)])
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "stat").write_text(f"{pid} (x) S {ppid} {pid} {pid} 0 -1 0 0 0 0 0 100 20 0 0 20 0 1 0 100")
    (d / "environ").write_bytes(environ.encode())
    for tid, ticks, wait_ns in threads or [(pid, 120, 5000)]:
        t = d / "task" / str(tid)
        t.mkdir()
        (t / "stat").write_text(f"{tid} (x) R {ppid} {pid} {pid} 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0 100")
        (t / "schedstat").write_text(f"1000 {wait_ns} 3\n")


def write_net(root: Path, pid: int, netns: str, listeners: list[tuple[str, int]], addresses: list[str] = ()) -> None:
    """The process's network namespace as /proc shows it: its link, its listening sockets (inode
    <pid><n>, held by the process: its fd <n>) and its own addresses; and the agent's namespace (AGENT_NS) at `self`."""
    if not (root / "self").exists():
        (root / "self" / "ns").mkdir(parents=True)
        os.symlink(AGENT_NS, root / "self" / "ns" / "net")
    d = root / str(pid)
    (d / "ns").mkdir(exist_ok=True)
    (d / "net").mkdir(exist_ok=True)
    if (d / "ns" / "net").is_symlink():
        (d / "ns" / "net").unlink()
    os.symlink(netns, d / "ns" / "net")
    lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"]
    for n, (address, port) in enumerate(listeners):
        word = int.from_bytes(ipaddress.IPv4Address(address).packed, sys.byteorder)  # as the kernel prints it
        lines.append(f"   {n}: {word:08X}:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
                     f"     0        0 {pid}{n} 1")
    (d / "net" / "tcp").write_text("\n".join(lines) + "\n")
    (d / "fd").mkdir(exist_ok=True)
    for n in range(len(listeners)):  # the process holds its sockets
        if not (d / "fd" / str(n)).is_symlink():
            os.symlink(f"socket:[{pid}{n}]", d / "fd" / str(n))
    (d / "net" / "fib_trie").write_text("Local:\n  +-- 0.0.0.0/0 3 0 5\n" + "".join(
        f"     |-- {address}\n        /32 host LOCAL\n" for address in ["127.0.0.1", *addresses]))


def joined(engines_data, gpu_processes, daemons=()) -> NodeSnapshot:
    """The engines collector's data with a GPU and an MPS control daemon's, through the derive step."""
    gpu = GpuData("580.159.04", (GpuState(0, UUID, "NVIDIA H200", True, processes=tuple(gpu_processes)),))
    return snapshot_of(gpu=gpu, mps_control=MpsControlData(tuple(daemons), ()), engines=engines_data)


def test_discovery_walks_from_the_api_server_to_its_gpu_process(tmp_path):
    proc = tmp_path / "proc"
    env_a = "CUDA_MPS_PIPE_DIRECTORY=/run/nvidia-mps\0CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50\0"
    write_proc(proc, 100, 1, ["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "Qwen/Qwen2.5-1.5B", "--port", "8001",
                              "--served-model-name", "qwen-a"], env_a, listen=8001)
    write_proc(proc, 101, 100, ["VLLM::EngineCore"], env_a, threads=[(101, 500, 9000), (102, 20, 100)])
    write_proc(proc, 200, 1, ["vllm", "serve", "Qwen/Qwen2.5-0.5B", "--port", "8002"], "", listen=8002)
    write_proc(proc, 201, 200, ["VLLM::EngineCore"])
    write_proc(proc, 300, 1, ["python3", "unrelated.py"])
    bodies = {"http://127.0.0.1:8001/metrics": body("metrics-v0.10-names.txt"),
              "http://127.0.0.1:8002/metrics": body("metrics-v0.10-names.txt")}
    collector = EnginesCollector(procfs=ProcFS(proc), fetch=lambda url, timeout, cap: bodies[url].encode())
    snapshot = joined(
        collector.collect(),
        [GpuProcess(101, "mps_client", 900 << 20), GpuProcess(201, "exclusive", 700 << 20)],
        [MpsDaemon("/run/nvidia-mps", "default", DaemonState.UP, "answering")],
    )
    engines = {e.name: e for e in snapshot.derived.engines}
    assert set(engines) == {"qwen-a:8001", "Qwen2.5-0.5B:8002"}
    a, b = engines["qwen-a:8001"], engines["Qwen2.5-0.5B:8002"]
    assert a.pids == (100, 101) and a.gpu_pids == (101,) and a.gpu_uuid == UUID
    assert a.mps_attached is True and b.mps_attached is False
    assert a.mps_pipe_dir == "/run/nvidia-mps" and a.pipe_dir_served is True
    assert a.mps_active_thread_percentage == "50"
    assert a.mps_pipe_dir_set is True and b.mps_pipe_dir_set is False
    assert b.mps_pipe_dir == "/tmp/nvidia-mps" and b.pipe_dir_served is None  # MPS's default, not watched: unknown
    assert a.cpu_seconds_total == pytest.approx(240 / os.sysconf("SC_CLK_TCK"))
    assert a.runqueue_wait_seconds_total == pytest.approx((5000 + 9000 + 100) * 1e-9)  # all threads of both processes


def test_shares_and_imbalance_of_two_engines_on_one_gpu(tmp_path):
    proc = tmp_path / "proc"
    write_proc(proc, 100, 1, ["vllm", "serve", "m", "--port", "8001", "--served-model-name", "a"], listen=8001)
    write_proc(proc, 101, 100, ["VLLM::EngineCore"])
    write_proc(proc, 200, 1, ["vllm", "serve", "m", "--port", "8002", "--served-model-name", "b"], listen=8002)
    write_proc(proc, 201, 200, ["VLLM::EngineCore"])
    tokens = {"http://127.0.0.1:8001/metrics": 0.0, "http://127.0.0.1:8002/metrics": 0.0}
    rate = {"http://127.0.0.1:8001/metrics": 2000.0, "http://127.0.0.1:8002/metrics": 1000.0}

    def fetch(url, timeout, cap):
        tokens[url] += rate[url]
        return body("metrics-v0.10-names.txt", tokens[url]).encode()

    collector = EnginesCollector(procfs=ProcFS(proc), fetch=fetch)
    collector.collect()
    time.sleep(0.05)
    snapshot = joined(collector.collect(), [GpuProcess(101, "mps_client", 1), GpuProcess(201, "mps_client", 1)])
    shares = {e.name: e.load_share_ratio for e in snapshot.derived.engines}
    assert shares["a:8001"] == pytest.approx(2 / 3, rel=0.05) and shares["b:8002"] == pytest.approx(1 / 3, rel=0.1)
    assert snapshot.derived.imbalance[UUID] == pytest.approx(4 / 3, rel=0.05)


@pytest.fixture
def engine_process(tmp_path):
    started = []

    def start(name: str, spin_file: Path | None = None) -> tuple[subprocess.Popen, int]:
        port = closed_port()
        argv = fakevllm.command(port, name, *(["--spin-file", str(spin_file)] if spin_file else []))
        child = wait_ready(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        started.append(child)
        return child, port

    yield start
    for child in started:
        child.kill()
        child.wait()


def test_real_processes_with_vllm_command_lines_are_discovered_and_scraped(engine_process):
    child, port = engine_process("qwen-a")
    collector = EnginesCollector(procfs=ProcFS(visible=SessionProcesses()))  # this session's processes
    engines = {e.name: e for e in collector.collect().engines}
    engine = engines[f"qwen-a:{port}"]
    assert engine.found_by == "discovered" and engine.url == f"http://127.0.0.1:{port}/metrics"
    assert engine.up and engine.model == "qwen-a" and child.pid in engine.pids  # vLLM labels the served name
    assert engine.model_parameters == 1.5e9  # the size comes from the model its command line serves


def test_a_spinning_thread_makes_the_engine_cpu_bound_and_the_verdict_flips_back(engine_process, tmp_path):
    spin = tmp_path / "spin"
    spin.touch()
    child, port = engine_process("busy", spin_file=spin)
    collector = EnginesCollector(procfs=ProcFS(visible=SessionProcesses()))  # this session's processes
    name = f"busy:{port}"
    before = {e.name: e for e in collector.collect().engines}[name]
    started = time.monotonic()
    time.sleep(1.0)
    busy = {e.name: e for e in collector.collect().engines}[name]
    waited = (busy.runqueue_wait_seconds_total - before.runqueue_wait_seconds_total) / (time.monotonic() - started)
    if busy.busiest_thread_cpu_ratio < CPU_BOUND_THREAD_RATIO and waited > 1 - CPU_BOUND_THREAD_RATIO:
        spin.unlink()
        pytest.skip(f"no core free on this machine: the spinning thread ran {busy.busiest_thread_cpu_ratio:.0%} "
                    f"of the time and waited for a core {waited:.0%}")
    spin.unlink()
    time.sleep(0.5)
    collector.collect()
    time.sleep(1.0)
    calm = {e.name: e for e in collector.collect().engines}[name]
    assert busy.busiest_thread_cpu_ratio > 0.8 and busy.cpu_bound is True  # the fake has 3 requests running
    assert calm.busiest_thread_cpu_ratio < 0.3 and calm.cpu_bound is False
    assert calm.cpu_seconds_total >= busy.cpu_seconds_total > 0.5


def test_a_configured_local_engine_claims_its_process_instead_of_appearing_twice(tmp_path):
    proc = tmp_path / "proc"
    write_proc(proc, 100, 1, ["vllm", "serve", "m", "--port", "8001", "--served-model-name", "a"], listen=8001)
    collector = EnginesCollector(configured=[{"name": "engine-a", "url": "http://localhost:8001/metrics"}],
                                 procfs=ProcFS(proc), fetch=lambda url, t, cap: body("metrics-v0.10-names.txt").encode())
    engines = {e.name: e for e in collector.collect().engines}
    assert set(engines) == {"engine-a"} and engines["engine-a"].pids == (100,)


def test_an_engine_whose_pid_now_runs_something_else_is_gone(tmp_path):
    proc = tmp_path / "proc"
    write_proc(proc, 200, 1, ["vllm", "serve", "m", "--port", "8002", "--served-model-name", "b"], listen=8002)
    collector = EnginesCollector(procfs=ProcFS(proc), fetch=lambda url, t, cap: body("metrics-v0.10-names.txt").encode())
    assert [e.name for e in collector.collect().engines] == ["b:8002"]
    (proc / "200" / "cmdline").write_bytes(b"postgres\0")  # the PID was reused
    assert collector.collect().engines == ()


def test_cpu_seconds_never_count_a_thread_twice_when_the_budget_skips_it(tmp_path, monkeypatch):
    import mpswatch.collectors.engines as engines_module

    proc = tmp_path / "proc"
    write_proc(proc, 100, 1, ["vllm", "serve", "m", "--port", "8001"], threads=[(100, 50, 1000), (101, 70, 2000)],
               listen=8001)
    write_proc(proc, 102, 100, ["VLLM::EngineCore"], threads=[(102, 500, 4000)])
    collector = EnginesCollector(procfs=ProcFS(proc), fetch=lambda url, t, cap: body("metrics-v0.10-names.txt").encode())
    first = collector.collect().engines[0]
    monkeypatch.setattr(engines_module, "MAX_THREADS_PER_ENGINE", 1)  # the budget now skips threads
    second = collector.collect().engines[0]
    monkeypatch.setattr(engines_module, "MAX_THREADS_PER_ENGINE", 1024)
    third = collector.collect().engines[0]
    assert first.cpu_seconds_total == second.cpu_seconds_total == third.cpu_seconds_total  # no CPU was used
    assert first.runqueue_wait_seconds_total == second.runqueue_wait_seconds_total == third.runqueue_wait_seconds_total


def test_an_engine_served_by_prometheus_client_s_own_http_server_is_read(tmp_path):
    # vLLM serves its /metrics through prometheus_client, as the synthetic engine of the GPU tests does
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    registry = CollectorRegistry()
    Gauge("vllm:num_requests_running", "running", ["engine", "model_name"], registry=registry).labels("0", "m").set(2)
    tokens = Counter("vllm:prompt_tokens", "prompt", ["engine", "model_name"], registry=registry)
    tokens.labels("0", "m").inc(500)
    port = closed_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        collector = collector_for({"e": f"http://127.0.0.1:{port}/metrics"}, tmp_path)
        collector.collect()
        tokens.labels("0", "m").inc(500)
        time.sleep(0.1)
        [engine] = collector.collect().engines
    finally:
        server.shutdown()
    assert engine.up and engine.requests_running == 2 and engine.prompt_tokens_total == 1000
    assert engine.tokens_per_second > 0


@pytest.mark.parametrize("text", [
    pytest.param(lambda: body("metrics-v0.10-names.txt"), id="v0.10 names"),
    pytest.param(lambda: body("metrics-v0.6-names.txt"), id="v0.6 names"),
    pytest.param(lambda: full_size_body(), id="full-size vLLM body"),
])
def test_reading_only_the_lines_used_gives_what_parsing_the_whole_body_gives(text, monkeypatch):
    text = text()
    filtered = parse_vllm_metrics(text)
    monkeypatch.setattr(reading, "lines_read", lambda body, *_: body)
    assert parse_vllm_metrics(text) == filtered
    assert filtered.prompt_tokens_total is not None and filtered.requests_running is not None


# ---------------------------------------------------------------- engines in network namespaces of their own

POD_A, POD_B = "net:[4026532890]", "net:[4026532951]"
QWEN = ["vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct", "--served-model-name", "qwen"]  # vLLM's default port: 8000


def pod_engine(proc: Path, pid: int, netns: str, pod_ip: str, listen_on: str = "0.0.0.0") -> None:
    write_proc(proc, pid, 1, QWEN)
    write_net(proc, pid, netns, [(listen_on, 8000)], [pod_ip])


def fetch_from(urls: set[str]):
    def fetch(url, timeout, cap):
        if url not in urls:
            raise ConnectionRefusedError(f"nothing at {url}")
        return body("metrics-v0.10-names.txt").encode()
    return fetch


def test_two_pods_serving_the_same_name_on_the_same_port_are_two_engines_with_stable_labels(tmp_path):
    proc = tmp_path / "proc"
    pod_engine(proc, 100, POD_A, "10.231.0.11")
    pod_engine(proc, 200, POD_B, "10.231.0.12")
    urls = {"http://10.231.0.11:8000/metrics", "http://10.231.0.12:8000/metrics"}
    collector = EnginesCollector(procfs=ProcFS(proc), fetch=fetch_from(urls))
    first = {e.name: e for e in collector.collect().engines}
    assert {name: (e.url, e.pids, e.up) for name, e in first.items()} == {
        "qwen:8000": ("http://10.231.0.11:8000/metrics", (100,), True),  # the first started (or lower PID) keeps the name
        "qwen:8000@pid200": ("http://10.231.0.12:8000/metrics", (200,), True),
    }
    assert [e.name for e in collector.collect().engines] == ["qwen:8000", "qwen:8000@pid200"]
    shutil.rmtree(proc / "100")  # pod A's engine exits: pod B's keeps its label, no series churn
    assert [e.name for e in collector.collect().engines] == ["qwen:8000@pid200"]
    pod_engine(proc, 300, POD_A, "10.231.0.11")  # pod A's engine restarted: the free name again
    assert [(e.name, e.pids) for e in collector.collect().engines] == [("qwen:8000", (300,)), ("qwen:8000@pid200", (200,))]


def test_an_engine_listening_only_on_loopback_inside_its_pod_is_down_and_says_why(tmp_path):
    proc = tmp_path / "proc"
    pod_engine(proc, 100, POD_A, "10.231.0.11", listen_on="127.0.0.1")
    collector = EnginesCollector(procfs=ProcFS(proc), fetch=fetch_from(set()))
    [engine] = collector.collect().engines
    assert engine.name == "qwen:8000" and not engine.up and engine.url is None and engine.pids == (100,)
    assert engine.error == (f"listens on 127.0.0.1:8000 inside network namespace {POD_A}, which this agent cannot "
                            "reach; start it with --host 0.0.0.0")
    assert engine.cpu_seconds_total is not None  # its process figures are kept
    samples = [s for family in render(snapshot_of(engines=collector.collect()), "test") for s in family.samples]
    assert [s.labels["url"] for s in samples if s.name == "mps_engine_info"] == [""]  # scraped nowhere
    assert [s.value for s in samples if s.name == "mps_engine_up"] == [0]


def test_an_engine_still_starting_is_down_until_its_socket_appears_then_scraped(tmp_path):
    proc = tmp_path / "proc"
    pod_engine(proc, 100, POD_A, "10.231.0.11")
    write_net(proc, 100, POD_A, [], ["10.231.0.11"])  # no socket yet
    collector = EnginesCollector(procfs=ProcFS(proc), fetch=fetch_from({"http://10.231.0.11:8000/metrics"}))
    [starting] = collector.collect().engines
    write_net(proc, 100, POD_A, [("0.0.0.0", 8000)], ["10.231.0.11"])
    [serving] = collector.collect().engines
    assert not starting.up and starting.error == f"no socket listens on port 8000 in network namespace {POD_A} (yet: still starting?)"
    assert serving.up and serving.url == "http://10.231.0.11:8000/metrics" and serving.name == starting.name


def test_a_discovered_engine_never_takes_a_configured_engine_s_name(tmp_path):
    proc = tmp_path / "proc"
    pod_engine(proc, 100, POD_A, "10.231.0.11")
    collector = EnginesCollector(configured=[{"name": "qwen:8000", "url": "http://10.231.0.99:8000/metrics"}],
                                 procfs=ProcFS(proc), fetch=fetch_from({"http://10.231.0.11:8000/metrics"}))
    engines = {e.name: e for e in collector.collect().engines}
    assert engines["qwen:8000"].url == "http://10.231.0.99:8000/metrics" and engines["qwen:8000"].pids == ()
    assert engines["qwen:8000@pid100"].url == "http://10.231.0.11:8000/metrics" and engines["qwen:8000@pid100"].up


def test_a_configured_pod_url_claims_the_engine_scraped_there_and_keeps_its_url(tmp_path):
    proc = tmp_path / "proc"
    pod_engine(proc, 100, POD_A, "10.231.0.11")
    pod_engine(proc, 200, POD_B, "10.231.0.12")
    configured = [{"name": "pod-b", "url": "http://10.231.0.12:8000/metrics?x=1"}]
    urls = {"http://10.231.0.11:8000/metrics", "http://10.231.0.12:8000/metrics?x=1"}
    collector = EnginesCollector(configured=configured, procfs=ProcFS(proc), fetch=fetch_from(urls))
    engines = {e.name: (e.url, e.found_by, e.pids) for e in collector.collect().engines}
    assert engines == {"pod-b": ("http://10.231.0.12:8000/metrics?x=1", "configured", (200,)),
                       "qwen:8000": ("http://10.231.0.11:8000/metrics", "discovered", (100,))}


def test_a_configured_loopback_url_claims_the_engine_in_the_agent_s_namespace_not_a_pod_s(tmp_path):
    proc = tmp_path / "proc"
    pod_engine(proc, 100, POD_A, "10.231.0.11")  # a pod's, on the same port, with a lower PID
    write_proc(proc, 200, 1, QWEN, listen=8000)  # the agent's namespace
    collector = EnginesCollector(configured=[{"name": "local", "url": "http://127.0.0.1:8000/metrics"}],
                                 procfs=ProcFS(proc), fetch=fetch_from({"http://127.0.0.1:8000/metrics",
                                                                        "http://10.231.0.11:8000/metrics"}))
    engines = {e.name: (e.found_by, e.pids) for e in collector.collect().engines}
    assert engines == {"local": ("configured", (200,)), "qwen:8000": ("discovered", (100,))}
