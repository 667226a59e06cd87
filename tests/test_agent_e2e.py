"""`mpswatch run` as a real process against the fixture control program, scraped over HTTP."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from mpswatch import __version__
from mpswatch.collectors.mps_control import READ_ONLY_COMMANDS

from tests.kit.agentproc import Agent, agent_env, key, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL

FAST = ["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--command-timeout", "1"]


def series(samples, name):
    return {labels: value for (n, labels), value in samples.items() if n == name}


def state_of(samples, pipe_dir):
    return [dict(l)["state"] for l, v in series(samples, "mps_control_state").items()
            if v == 1 and dict(l)["pipe_dir"] == pipe_dir]


def agent_for(*daemons, extra=(), tmp_path=None, nvml=None):
    args = [*FAST, *extra]
    for daemon in daemons:
        args += ["--pipe-dir", daemon if isinstance(daemon, str) else daemon.path]
    return Agent(args, log_path=tmp_path / "agent.log" if tmp_path else None, nvml=nvml)


def test_healthy_daemon_with_two_clients(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    d = daemon.path
    with agent_for(daemon) as agent:
        s = agent.wait_for(lambda s: s if s.get(key("mps_control_up", pipe_dir=d)) == 1 else None)
        assert s[key("mps_control_info", pipe_dir=d, pid=str(daemon.process.pid))] == 1
        assert s[key("mps_clients", pipe_dir=d, uid="", gpu_uuid="GPU-2ea0ea17-0206-eb44")] == 2
        assert s[key("mps_server_clients", pipe_dir=d, uid="")] == 2
        assert s[key("mps_server_status", pipe_dir=d, uid="", status="ACTIVE")] == 1
        assert s[key("mps_server_status", pipe_dir=d, uid="", status="FAULT")] == 0
        assert s[key("mps_server_active_thread_ratio", pipe_dir=d, uid="")] == 1
        assert s[key("mps_default_active_thread_ratio", pipe_dir=d)] == 1
        assert s[key("mps_client_limit", pipe_dir=d)] == 48
        assert sorted(dict(l)["pid"] for l in series(s, "mps_client_info")) == ["437", "438"]
        assert series(s, "mps_default_device_pinned_memory_limit_bytes") == {}  # unset: absent, not 0
        assert s[key("mps_exporter_collector_success", collector="mps_control")] == 1
        assert s[key("mps_exporter_build_info", version=__version__)] == 1


def test_48_clients_fill_the_device(fake_daemon):
    daemon = fake_daemon("clients_48_driver580")
    d = daemon.path
    with agent_for(daemon) as agent:
        s = agent.wait_for(lambda s: s if s.get(key("mps_control_up", pipe_dir=d)) == 1 else None)
        assert s[key("mps_clients", pipe_dir=d, uid="", gpu_uuid="GPU-2ea0ea17-0206-eb44")] == 48
        assert len(series(s, "mps_client_info")) == 48
        assert s[key("mps_default_device_pinned_memory_limit_bytes", pipe_dir=d)] == 3 * 1024**3
        assert s[key("mps_server_active_thread_ratio", pipe_dir=d, uid="")] == 0.5


def test_server_in_fault(fake_daemon):
    daemon = fake_daemon("server_fault_driver580")
    d = daemon.path
    with agent_for(daemon) as agent:
        s = agent.wait_for(lambda s: s if s.get(key("mps_control_up", pipe_dir=d)) == 1 else None)
        assert s[key("mps_server_status", pipe_dir=d, uid="", status="FAULT")] == 1
        assert s[key("mps_server_status", pipe_dir=d, uid="", status="ACTIVE")] == 0
        assert s[key("mps_clients", pipe_dir=d, uid="", gpu_uuid="GPU-9ce49c92-f91f-680e")] == 2


def test_hung_daemon_goes_down_within_two_cycles_while_metrics_keep_answering(fake_daemon, tmp_path):
    daemon = fake_daemon("healthy_two_clients_driver580")
    d = daemon.path
    interval = 1.0
    args = ["--mps-control-bin", FAKE_CONTROL, "--interval", str(interval), "--command-timeout", "1", "--pipe-dir", d]
    with Agent(args, log_path=tmp_path / "agent.log") as agent:
        up = key("mps_control_up", pipe_dir=d)
        agent.wait_for(lambda s: s.get(up) == 1)
        daemon.update(mode="hang")
        hung_at = time.monotonic()
        slowest = 0.0
        while True:
            t0 = time.monotonic()
            samples = agent.scrape()
            slowest = max(slowest, time.monotonic() - t0)
            if samples.get(up) == 0:
                break
            assert time.monotonic() - hung_at < 2 * interval + 1.0, "up stayed 1 past two cycles"
            time.sleep(0.05)
        assert time.monotonic() - hung_at <= 2 * interval + 0.5
        assert slowest < 1.0
        assert state_of(samples, d) == ["timeout"]
        assert series(samples, "mps_clients") == {}  # what a hung daemon serves is unknown
        assert agent.get("/healthz")[0] == 200
        for _ in range(5):  # stays answering, quickly, for as long as the hang lasts
            t0 = time.monotonic()
            assert agent.scrape().get(up) == 0
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.2)
        timeouts = agent.scrape()[key("mps_control_command_failures_total", pipe_dir=d, command="get_server_list", reason="timeout")]
        assert timeouts >= 1
        daemon.update(mode="answer")
        ended_at = time.monotonic()
        agent.wait_for(lambda s: s.get(up) == 1, timeout=2 * interval + 1.0)
        assert time.monotonic() - ended_at <= 2 * interval + 0.5
    log = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    downs = [e for e in log if e["event"] == "daemon_down"]
    assert len(downs) == 1 and downs[0]["state"] == "timeout" and downs[0]["collector"] == "mps_control"


def test_garbage_output(fake_daemon):
    daemon = fake_daemon("garbage_output")
    d = daemon.path
    with agent_for(daemon) as agent:
        s = agent.wait_for(lambda s: s if state_of(s, d) == ["garbage_output"] else None)
        assert s[key("mps_control_up", pipe_dir=d)] == 0
        assert s[key("mps_control_command_failures_total", pipe_dir=d, command="get_server_list", reason="garbage_output")] >= 1
        assert s[key("mps_exporter_collector_success", collector="mps_control")] == 1


def test_stale_pid_file_and_the_orphaned_server_after_the_daemon_was_killed(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    d = daemon.path
    with agent_for(daemon) as agent:
        agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=d)) == 1)
        assert series(agent.scrape(), "mps_orphaned_servers") == {}  # only counted while the daemon is gone
        server_pid = daemon.start_server_stand_in()
        daemon.kill()
        daemon.update(mode="not_running")
        s = agent.wait_for(lambda s: s if state_of(s, d) == ["stale_pid_file"] else None)
        assert s[key("mps_control_up", pipe_dir=d)] == 0
        assert series(s, "mps_control_info") == {}
        assert s[key("mps_orphaned_servers", pipe_dir=d)] == 1
        status = subprocess.run(mpswatch_cmd("status", "--json", "--mps-control-bin", FAKE_CONTROL, "--pipe-dir", d),
                                env=agent_env(), capture_output=True, text=True, timeout=60)
        [reported] = json.loads(status.stdout)["daemons"]
        assert reported["orphaned_server_pids"] == [server_pid] and "orphaned" in reported["reason"]
        daemon.server.kill()
        daemon.server.wait()
        agent.wait_for(lambda s: s.get(key("mps_orphaned_servers", pipe_dir=d)) == 0)


def test_a_server_that_vanishes_while_serving_clients_is_counted_lost_once(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    d = daemon.path
    with agent_for(daemon) as agent:
        agent.wait_for(lambda s: s.get(key("mps_clients", pipe_dir=d, uid="", gpu_uuid="GPU-2ea0ea17-0206-eb44")) == 2)
        assert agent.value("mps_servers_lost_total", pipe_dir=d) == 0
        # what an H200 daemon answered after its server was killed: no server, and `ps` cannot find it
        replies = {**daemon.scenario["replies"], "get_server_list": "", "ps": "Server not found\n"}
        daemon.update(replies=replies)
        s = agent.wait_for(lambda s: s if s.get(key("mps_servers_lost_total", pipe_dir=d)) == 1 else None)
        assert series(s, "mps_server_info") == {}
        # with no server listed `ps` is not asked (it could only answer `Server not found`): no failure counted
        assert key("mps_control_command_failures_total", pipe_dir=d, command="ps", reason="error_reply") not in s
        assert key("mps_control_command_failures_total", pipe_dir=d, command="ps", reason="garbage_output") not in s
        time.sleep(2)
        assert agent.value("mps_servers_lost_total", pipe_dir=d) == 1  # counted once, not every cycle


@pytest.mark.parametrize(
    "scenario,process,control_bin,state",
    [
        ("no_daemon_driver580", False, FAKE_CONTROL, "not_running"),
        ("healthy_two_clients_driver580", True, "/nonexistent/nvidia-cuda-mps-control", "exec_failed"),
    ],
)
def test_a_daemon_that_cannot_be_asked_is_down_with_its_reason(fake_daemon, scenario, process, control_bin, state):
    daemon = fake_daemon(scenario, process=process)
    d = daemon.path
    with Agent(["--mps-control-bin", control_bin, "--interval", "0.5", "--pipe-dir", d]) as agent:
        s = agent.wait_for(lambda s: s if state_of(s, d) == [state] else None)
        assert s[key("mps_control_up", pipe_dir=d)] == 0
        assert s[key("mps_control_command_failures_total", pipe_dir=d, command="get_server_list", reason=state)] >= 1


def test_a_slow_daemon_is_slow_not_hung_and_costs_only_its_own_freshness(fake_daemon):
    """A daemon whose every answer takes 0.8 s overruns its share of the cycle (two command timeouts):
    it answered, so it stays up (issue 17, busy nodes must not page); what it was not asked waits for
    the next cycle, and its probe, outlasting the cycle's budget, is deferred, never the other daemon's."""
    healthy, slow = fake_daemon("healthy_two_clients_driver580"), fake_daemon("server_fault_driver580")
    with agent_for(healthy, slow) as agent:
        agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=slow.path)) == 1)
        slow.update(delay_seconds=0.8)
        agent.wait_for(lambda s: s.get(key("mps_control_probes_deferred")) == 1, timeout=15)
        ends = time.monotonic() + 5
        while time.monotonic() < ends:
            s = agent.scrape()
            assert state_of(s, slow.path) == ["up"] and state_of(s, healthy.path) == ["up"]
            assert s[key("mps_exporter_collector_success", collector="mps_control")] == 1
            time.sleep(0.2)
        slow.update(delay_seconds=0)
        agent.wait_for(lambda s: s.get(key("mps_control_probes_deferred")) == 0, timeout=15)


def test_one_hung_daemon_does_not_hide_another(fake_daemon):
    healthy, hung = fake_daemon("healthy_two_clients_driver580"), fake_daemon("hung_daemon")
    with agent_for(healthy, hung) as agent:
        s = agent.wait_for(lambda s: s if s.get(key("mps_control_up", pipe_dir=hung.path)) == 0 else None)
        assert s[key("mps_control_up", pipe_dir=healthy.path)] == 1
        assert s[key("mps_server_clients", pipe_dir=healthy.path, uid="")] == 2


def test_daemons_are_discovered_from_running_processes(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    with Agent(["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5"]) as agent:
        s = agent.wait_for(lambda s: s if s.get(key("mps_control_up", pipe_dir=daemon.path)) == 1 else None)
        assert s[key("mps_control_info", pipe_dir=daemon.path, pid=str(daemon.process.pid))] == 1
        assert [dict(l)["pipe_dir"] for l in series(s, "mps_control_up")] == [daemon.path]  # this session's only


def test_only_read_only_commands_reach_the_daemon(fake_daemon):
    daemon = fake_daemon("server_fault_driver580")
    with agent_for(daemon) as agent:
        agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=daemon.path)) == 1)
        time.sleep(1.0)
    sent = daemon.commands()
    assert sent and {line.split()[0] for line in sent} <= READ_ONLY_COMMANDS


@pytest.mark.parametrize("path,code", [("/healthz", 200), ("/", 200), ("/nope", 404)])
def test_http_endpoints(fake_daemon, path, code):
    with agent_for(fake_daemon("no_daemon_driver580", process=False)) as agent:
        assert agent.get(path)[0] == code


def test_without_a_driver_the_agent_runs_on_and_reports_the_gpu_collector_state(fake_daemon):
    with agent_for(fake_daemon("healthy_two_clients_driver580"), extra=["--log-level", "info"], nvml="no_driver") as agent:
        s = agent.wait_for(lambda s: s if key("mps_exporter_collector_success", collector="gpu") in s
                           and key("mps_exporter_collector_success", collector="mps_control") in s else None)
        assert s[key("mps_exporter_collector_success", collector="gpu")] == 0
        assert s[key("mps_exporter_collector_errors_total", collector="gpu", reason="nvml_unavailable")] >= 1
        assert not [k for k in s if k[0].startswith("mps_gpu_")]
        assert s[key("mps_exporter_collector_success", collector="mps_control")] == 1
        assert agent.get("/healthz")[0] == 200
        time.sleep(1.0)
        assert agent.proc.poll() is None


def test_a_command_killed_by_the_agent_stopping_is_not_blamed_on_the_daemon(fake_daemon, tmp_path):
    daemon = fake_daemon("healthy_two_clients_driver580")
    d = daemon.path
    args = ["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--command-timeout", "10", "--pipe-dir", d]
    with Agent(args, log_path=tmp_path / "agent.log") as agent:
        agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=d)) == 1)
        daemon.update(mode="hang")
        time.sleep(1.5)  # a query is now waiting on the hung daemon, well within its 10 s
    log = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    assert [e["event"] for e in log if e.get("collector") == "mps_control"].count("daemon_down") == 0
    assert any(e["event"] == "agent_stopping" for e in log)
