"""What the agent exports == what it declares == what docs/metrics.md lists; promtool lints it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from mpswatch.collectors.mps_logs import EVENTS
from mpswatch.metrics import CATALOG

from tests.kit import fakevllm
from tests.kit.agentproc import Agent, free_port
from tests.kit.fakedaemon import FAKE_CONTROL
from tests.kit.fakepodresources import FakePodResources
from tests.kit.fakevllm import wait_ready
from tests.kit.kubecgroups import KubeCgroups, systemd_path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "h200-driver580"


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows = re.findall(r"^\| `((?:mps|process)_[a-z0-9_:]+)` \| (gauge|counter) \| ([^|]*) \|", DOCS.read_text(), re.MULTILINE)
    return {name: (kind, tuple(l.strip() for l in labels.split(",") if l.strip())) for name, kind, labels in rows}


def test_docs_list_exactly_the_declared_metrics_with_their_types_and_labels():
    assert documented() == {name: (spec.type, spec.labels) for name, spec in CATALOG.items()}


def test_docs_list_exactly_the_log_events_the_parser_knows():
    events = re.findall(r"^\| `([a-z_]+)` \| (?:control|server|either) \|", DOCS.read_text(), re.MULTILINE)
    assert sorted(events) == sorted(EVENTS)


def family_name(sample_name: str) -> str:
    return sample_name[: -len("_total")] + "_total" if sample_name.endswith("_total") else sample_name


def test_a_running_agent_exports_exactly_the_declared_set(fake_daemon, tmp_path):
    full = fake_daemon("clients_48_driver580")  # pid file, pinned limit
    garbage = fake_daemon("garbage_output")  # command failures
    fault = fake_daemon("server_fault_driver580")
    killed = fake_daemon("healthy_two_clients_driver580")  # killed, its server left running
    killed.start_server_stand_in()
    killed.kill()
    killed.update(mode="not_running")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    # the fault of session 2 once more, in server 632's log: the fault scenario's server, so it is blamed
    fault_log = (FIXTURES / "session2-fault-server.log").read_text()
    (log_dir / "server.log").write_text(
        fault_log + fault_log.replace("   440] ", "   632] ") + "\xff broken\n", errors="surrogateescape"
    )
    # the full daemon's server 476 started after the daemon's limits were set
    (log_dir / "control.log").write_text(
        "[2026-12-02 09:14:05.101 Control    61] Starting control daemon using socket /mps/nvidia.com/gpu/pipe/control\n"
        "[2026-12-02 09:14:05.119 Control    61] Cmd:set_default_active_thread_percentage 50\n"
        "[2026-12-02 09:14:05.402 Control   476] Starting new server 476 for user 0\n"
    )
    engine = wait_ready(subprocess.Popen(
        fakevllm.command(free_port(), "qwen-a", "--latencies"),
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": full.path, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"},
        stdout=subprocess.PIPE, text=True,
    ))
    # the engine a client of the full daemon's server: its MPS limits in force
    ps = full.scenario["replies"]["ps"] + f"{engine.pid} 49 476 GPU-2ea0ea17-0206-eb44 4026531836 vllm\n"
    full.update(replies={**full.scenario["replies"], "ps": ps})
    # the engine in a pod's cgroup (needs root: without it, no series names a pod), its pod listed by
    # a kubelet whose first List calls fail
    needs_a_pod = {"mps_pod_info", "mps_engine_pod_info"}
    # a slowed engine beside a bursting one: tests/test_interference.py's running agent exports it (and lints it)
    needs_a_burst = {"mps_engine_interference_slowdown_ratio"}
    try:
        cgroups = KubeCgroups.open("v2")
        cgroups.place(engine, "v2", systemd_path("0c3f2e1a-5b7d-4c2e-9f00-1a2b3c4d5e6f", "ab" * 32))
        needs_a_pod = set()
    except pytest.skip.Exception:
        cgroups = None
    h200 = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"  # tests.kit.fakenvml.h200's
    kubelet = FakePodResources(tmp_path / "kubelet.sock", {"team-a/qwen-a": {"vllm": [h200]}})
    kubelet.fail = grpc.StatusCode.UNAVAILABLE
    args = ["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--command-timeout", "1", "--log-dir", str(log_dir)]
    for daemon in (full, garbage, fault, killed):
        args += ["--pipe-dir", daemon.path]
    env = {
        "FAKENVML_MPS_CLIENT_PIDS": str(engine.pid),  # the engine's process is an MPS client on the fake GPU
        "MPSWATCH_GPU_INTERVAL_SECONDS": "0.5",
        "MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": "0.5",
        "MPSWATCH_PODS_POD_RESOURCES_SOCKET": str(tmp_path / "kubelet.sock"),
        "MPSWATCH_PODS_INTERVAL_SECONDS": "0.5",
        "MPSWATCH_DEVICE_PLUGIN_ROOT": str(full.pipe_dir.parent.parent),  # each fake daemon's dir is a resource
    }
    seen: set[str] = set()
    texts: list[str] = []
    try:
        with Agent(args, env=env, nvml="h200") as agent:
            def all_there(samples):
                seen.update(family_name(name) for name, _ in samples)
                if "mps_pod_resources_failures_total" in seen:
                    kubelet.fail = None
                return seen >= set(CATALOG) - needs_a_pod - needs_a_burst

            try:
                agent.wait_for(all_there, timeout=20)
            except AssertionError:
                pass  # the assertion below names what is missing
            texts.append(agent.get("/metrics")[1])
    finally:
        kubelet.close()
        if cgroups is not None:
            cgroups.close()
        engine.kill()
        engine.wait()
    assert seen == set(CATALOG) - needs_a_pod - needs_a_burst
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); the README's test command installs it")
    for text in texts:
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
