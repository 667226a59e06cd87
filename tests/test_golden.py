"""Golden end-to-end, in node_exporter's manner (its end-to-end-test.sh): the real `mpswatch run`
process against a fixture node, its /metrics compared byte for byte with a committed file, and
`mpswatch status` (text and --json) for the same node likewise.

The node (tests/fixtures/golden/README.md says where each input's shape comes from):
  - two control daemons answered by the fake control program: `healthy_two_clients_driver580`
    (server 476 ACTIVE, clients 437 and 438) and `server_fault_driver580` (server 632 in FAULT),
    their pid files naming 4101 and 4102;
  - a /proc of its own (proc_root) holding only those two daemons, server 476's owner and a fixed
    CPU pressure, so that nothing running on the test machine shows through;
  - one MPS log dir: session 1's control.log and server.log there at start (read back), session 2's
    lines (a fault) appended once the agent has read them, as a restarted daemon appends;
  - the NVML recording of an H200 (tests.kit.fakenvml.h200);
  - two configured vLLM engines on the H200 (tests/kit/fakevllm.py): `busy`, whose token counters
    advance by 100 on every scrape and whose latency histograms by one set of observations, and
    `idle`, whose counters stay at 0 (and whose one histogram, TTFT, does not move);
  - no kubelet: the node is off Kubernetes, and the pods collector finds no process in a pod.

The exposition is taken once every collector has completed at least two cycles after the appended
log lines were read. Before comparing, normalise() replaces the values that cannot be the same
from one run to the next; everything else (family order, HELP and TYPE lines, label order, values)
is compared exactly.

Regenerate the golden files, after a change that is meant to change them, with
    MPSWATCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
and review their diff like code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.kit.agentproc import Agent, agent_env, key, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon
from tests.kit.fakevllm import LATENCY_OBSERVATIONS, FakeVllm

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "fixtures" / "golden"
LOGS = HERE / "fixtures" / "h200-driver580"
UPDATE = os.environ.get("MPSWATCH_UPDATE_GOLDEN") == "1"
H200 = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"  # the NVML recording's GPU
DAEMON_PIDS = {"healthy_two_clients_driver580": 4101, "server_fault_driver580": 4102}
COLLECTORS = ("engines", "gpu", "mps_control", "mps_logs", "pods", "process")
NUMBER = r"[-+0-9.e]+|NaN|[+-]Inf"

# What cannot be the same from one run to the next, and only that: (pattern, replacement).
METRICS_NORMALISATION = [
    # how long a collector run or a control command took, and when a collector last succeeded
    (rf"^(mps_exporter_collector_duration_seconds\{{.*\}}) (?:{NUMBER})$", r"\1 <duration>"),
    (rf"^(mps_exporter_collector_last_success_timestamp_seconds\{{.*\}}) (?:{NUMBER})$", r"\1 <timestamp>"),
    # the agent's own process: its CPU time, memory, descriptors and start
    (rf"^(process_[a-z_]+) (?:{NUMBER})$", r"\1 <process>"),
    (rf"^(mps_control_command_duration_seconds\{{.*\}}) (?:{NUMBER})$", r"\1 <duration>"),
    (rf"^(mps_control_probe_timestamp_seconds\{{.*\}}) (?:{NUMBER})$", r"\1 <timestamp>"),
    (rf"^(mps_control_program_cpu_seconds_total) (?:{NUMBER})$", r"\1 <cpu seconds>"),
    # the busy engine's counters grow by 100 tokens a scrape, and the agent's scrapes are not counted
    (rf'^(mps_engine_(?:prompt|generation)_tokens_total\{{engine="busy"\}}) (?:{NUMBER})$', r"\1 <tokens>"),
    (rf'^(mps_engine_tokens_per_second\{{engine="busy"\}}) (?:{NUMBER})$', r"\1 <tokens/s>"),
    # the latency window spans the scrapes' times; the busy engine's figures are those of one set of its
    # observations (tests/test_engine_latency.py checks them), but from as many sets as it served,
    # so their last digits vary
    (rf"^(mps_engine_latency_window_seconds\{{.*\}}) (?:{NUMBER})$", r"\1 <seconds>"),
    (rf'^(mps_engine_latency_(?:p50|p99|mean)_seconds\{{engine="busy",.*\}}) (?:{NUMBER})$', r"\1 <seconds>"),
    # likewise its inter-token baseline and slowdown (tests/test_interference.py checks the rule)
    (rf'^(mps_engine_inter_token_latency_(?:baseline_seconds|slowdown_ratio)\{{engine="busy"\}}) (?:{NUMBER})$',
     r"\1 <from its histograms>"),
]
STATUS_NORMALISATION = [
    (r'"generated_at": "[^"]+"', '"generated_at": "<time>"'),
    (rf'"(duration_seconds|age_seconds)": (?:{NUMBER})', r'"\1": "<seconds>"'),
    (r" +\d+[smhd] ago\b", " <age> ago"),  # right-aligned in the text form: the padding goes too
]


def normalise(text: str, rules: list[tuple[str, str]], tmp: Path, ports: dict[int, str]) -> str:
    """The temporary directory becomes <tmp> and each engine's random port <port:NAME>; then the rules."""
    text = text.replace(str(tmp), "<tmp>")
    for port, name in ports.items():
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:<port:{name}>")
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
    return text


def compare(name: str, actual: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(actual)
        return
    assert actual == path.read_text(), (
        f"{name} differs from the golden file; if the change is meant, regenerate with "
        "MPSWATCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py and review the diff"
    )


def write_proc(root: Path, daemons: list[FakeDaemon]) -> None:
    """The node's /proc as the agent sees it: the daemons as `nvidia-cuda-mps-control -d`, server 476
    with its owner's uid, the kernel's CPU pressure (PSI) at fixed averages."""
    for daemon in daemons:
        pid = DAEMON_PIDS[daemon.pipe_dir.parent.name]
        (daemon.pipe_dir / "nvidia-cuda-mps-control.pid").write_text(f"{pid}\n")
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"nvidia-cuda-mps-control\0-d\0")
    (root / "476").mkdir()
    (root / "476" / "cmdline").write_bytes(b"nvidia-cuda-mps-server\0")
    (root / "476" / "status").write_text("Name:\tnvidia-cuda-mps\nUid:\t1000\t1000\t1000\t1000\n")
    (root / "pressure").mkdir()
    (root / "pressure" / "cpu").write_text(
        "some avg10=12.50 avg60=4.25 avg300=1.00 total=123456789\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


def write_config(path: Path, tmp: Path, daemons: list[FakeDaemon], log_dir: Path, engines: dict[str, FakeVllm]) -> None:
    """Every place the agent would look on its own points into tmp: nothing on the test machine is found.
    Deadlines are generous, so that a busy test machine cannot time out a fake daemon or engine."""
    pipe_dirs = ", ".join(f'"{d.path}"' for d in daemons)
    engine_tables = "".join(
        f'[[engines]]\nname = "{name}"\nurl = "{fake.url}"\ngpu_uuid = "{H200}"\n\n' for name, fake in engines.items()
    )
    path.write_text(f"""\
proc_root = "{tmp}/proc"
device_plugin_root = "{tmp}/no-device-plugin"

[mps_control]
pipe_dirs = [{pipe_dirs}]
default_pipe_dirs = ["{tmp}/no-default-pipe-dir"]
control_bin = "{FAKE_CONTROL}"
interval_seconds = 0.5
timeout_seconds = 10

[mps_logs]
log_dirs = ["{log_dir}"]
default_log_dir = "{tmp}/no-default-log-dir"
interval_seconds = 0.5
timezone = "UTC"

[gpu]
interval_seconds = 0.5
deadline_seconds = 30

[engine_scrape]
discover = false
interval_seconds = 0.5
timeout_seconds = 10

[pods]
pod_resources_socket = "{tmp}/no-kubelet.sock"
interval_seconds = 0.5

{engine_tables}""")


def successes(samples) -> dict[str, float]:
    return {dict(labels)["collector"]: value for (name, labels), value in samples.items()
            if name == "mps_exporter_collector_last_success_timestamp_seconds"}


def lines_read(samples, log_dir: Path) -> dict[str, float]:
    return {dict(labels)["source"]: value for (name, labels), value in samples.items()
            if name == "mps_log_lines_total" and dict(labels)["log_dir"] == str(log_dir)}


def append(source: Path, target: Path) -> None:
    with open(target, "a") as handle:
        handle.write(source.read_text())


def line_count(*paths: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def test_the_fixture_node_exports_and_reports_exactly_the_golden_files(tmp_path):
    daemons = [FakeDaemon(tmp_path / "mps", scenario, process=False) for scenario in DAEMON_PIDS]
    write_proc(tmp_path / "proc", daemons)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    for source in ("control", "server"):
        shutil.copy(LOGS / f"session1-{source}.log", log_dir / f"{source}.log")
    engines = {"busy": FakeVllm(tokens_per_request=100.0, model_label="Qwen/Qwen2.5-1.5B-Instruct",
                                latencies=LATENCY_OBSERVATIONS),
               "idle": FakeVllm(tokens_per_request=0.0, model_label="Qwen/Qwen2.5-7B-Instruct")}
    ports = {fake.port: name for name, fake in engines.items()}
    config = tmp_path / "config.toml"
    write_config(config, tmp_path, daemons, log_dir, engines)
    try:
        with Agent(["--config", str(config)], log_path=tmp_path / "agent.log", nvml="h200") as agent:
            agent.wait_for(lambda s: set(successes(s)) == set(COLLECTORS))
            # the busy engine's quiet inter-token baseline (mpswatch.interference) needs ten scrapes or so
            baseline = key("mps_engine_inter_token_latency_baseline_seconds", engine="busy")
            agent.wait_for(lambda s: baseline in s, timeout=30)
            for source in ("control", "server"):  # the daemon restarts and appends to the same files
                append(LOGS / f"session2-fault-{source}.log", log_dir / f"{source}.log")
            expected = {source: line_count(LOGS / f"session1-{source}.log", LOGS / f"session2-fault-{source}.log")
                        for source in ("control", "server")}
            read = agent.wait_for(lambda s: s if lines_read(s, log_dir) == expected else None)
            # two more cycles of every collector after the appended lines were read
            after = successes(read)
            agent.wait_for(lambda s: all(successes(s)[c] > after[c] for c in COLLECTORS))
            once_more = successes(agent.scrape())
            agent.wait_for(lambda s: all(successes(s)[c] > once_more[c] for c in COLLECTORS))
            status, body = agent.get("/metrics")
            assert status == 200
        status_runs = {
            form: subprocess.run(mpswatch_cmd("status", *flags, "--config", str(config), nvml="h200"),
                                 env=agent_env(), capture_output=True, text=True, timeout=60)
            for form, flags in (("json", ["--json"]), ("txt", []))
        }
    finally:
        for fake in engines.values():
            fake.close()
    compare("node.prom", normalise(body, METRICS_NORMALISATION, tmp_path, ports))
    for form, run in status_runs.items():
        assert run.returncode == 1, run.stderr  # a server in FAULT: DOWN
        assert run.stderr == ""
        compare(f"status.{form}", normalise(run.stdout, STATUS_NORMALISATION, tmp_path, ports))
