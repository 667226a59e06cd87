"""Signals to `mpswatch run`: SIGHUP reloads the configuration in the same process (or, when the
file does not load, changes nothing); SIGTERM and SIGINT stop it; on every stop and reload the
control program it is running is killed and reaped, never left behind."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.kit.agentproc import Agent, parse_exposition
from tests.kit.fakedaemon import FAKE_CONTROL

# a control program that never answers: it records its PID and blocks
BLOCKING_CONTROL = """#!/bin/sh
echo $$ >> "$CUDA_MPS_PIPE_DIRECTORY/pids"
exec sleep 600
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def events(log: Path) -> list[str]:
    return [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]


class Node:
    """A pipe dir whose control program blocks, and the agent's config file."""

    def __init__(self, tmp_path: Path) -> None:
        self.pipe_dir = tmp_path / "pipe"
        self.pipe_dir.mkdir()
        (self.pipe_dir / "control").touch()
        self.control_bin = tmp_path / "nvidia-cuda-mps-control"
        self.control_bin.write_text(BLOCKING_CONTROL)
        self.control_bin.chmod(0o755)
        self.config = tmp_path / "mpswatch.toml"
        self.log = tmp_path / "agent.log"
        self.log_dirs = [tmp_path / "logs-a", tmp_path / "logs-b"]
        for log_dir in self.log_dirs:
            log_dir.mkdir()
        self.write_config(self.log_dirs[:1])

    def write_config(self, log_dirs: list[Path]) -> None:
        self.config.write_text(
            f'[mps_control]\npipe_dirs = ["{self.pipe_dir}"]\ncontrol_bin = "{self.control_bin}"\n'
            f"interval_seconds = 0.5\ntimeout_seconds = 30\n\n"
            f"[mps_logs]\nlog_dirs = {json.dumps([str(d) for d in log_dirs])}\ninterval_seconds = 0.5\n"
        )

    def pids(self) -> list[int]:
        path = self.pipe_dir / "pids"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def blocked_control_program(self) -> int:
        deadline = time.monotonic() + 10
        while not self.pids():
            assert time.monotonic() < deadline, "the agent never ran its control program"
            time.sleep(0.05)
        pid = self.pids()[0]
        assert _alive(pid)
        return pid

    def events(self) -> list[str]:
        return events(self.log)

    def kill_leftovers(self) -> None:
        for pid in self.pids():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def watched_log_dirs(agent: Agent, timeout: float = 15.0) -> set[str]:
    """The log dirs the agent's /metrics names, through a reload's moment without a listener."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = agent.get("/metrics", timeout=1.0)
        except OSError:
            status, body = 0, ""
        if status == 200:
            found = {dict(labels)["log_dir"] for name, labels in parse_exposition(body) if name == "mps_log_events_total"}
            if found:
                return found
        time.sleep(0.1)
    raise AssertionError("no mps_log_events_total series")


@pytest.fixture
def node(tmp_path):
    made = Node(tmp_path)
    yield made
    made.kill_leftovers()


def test_sighup_reloads_the_config_in_the_same_process_and_kills_the_running_control_program(node):
    with Agent(["--config", str(node.config)], log_path=node.log, nvml="h200") as agent:
        first, second = (str(d) for d in node.log_dirs)
        assert watched_log_dirs(agent) == {first}
        blocked = node.blocked_control_program()
        node.write_config(node.log_dirs)
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while watched_log_dirs(agent) != {first, second}:
            assert time.monotonic() < deadline, "the new config never took effect"
            time.sleep(0.1)
        assert agent.proc.poll() is None  # the same process, reloaded
        assert _gone_within(blocked, 5), f"control program {blocked} outlived the reload"
        agent.wait_healthy()
        assert agent.stop() == 0
    events = node.events()
    assert events.count("agent_started") == 2 and "agent_reloading" in events
    assert "daemon_down" not in events  # the query the agent killed says nothing about the daemon


def test_sighup_with_a_config_that_does_not_load_changes_nothing_and_sigterm_then_stops_cleanly(node):
    with Agent(["--config", str(node.config)], log_path=node.log, nvml="h200") as agent:
        assert watched_log_dirs(agent) == {str(node.log_dirs[0])}
        blocked = node.blocked_control_program()
        node.config.write_text("[mps_logs\nlog_dirs = ")
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload_failed" not in node.events():
            assert time.monotonic() < deadline, "the failed reload was not logged"
            time.sleep(0.1)
        assert agent.proc.poll() is None and watched_log_dirs(agent) == {str(node.log_dirs[0])}
        assert _alive(blocked)  # nothing was stopped: its query runs on to its deadline
        assert agent.stop() == 0
        assert _gone_within(blocked, 5), f"control program {blocked} outlived the agent"
    assert node.events().count("agent_started") == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_agent_with_its_control_program(node, signum):
    with Agent(["--config", str(node.config)], log_path=node.log, nvml="h200") as agent:
        blocked = node.blocked_control_program()
        agent.proc.send_signal(signum)
        assert agent.proc.wait(timeout=10) == 0
        assert _gone_within(blocked, 5), f"control program {blocked} outlived the agent"
    assert "agent_stopping" in node.events() and "daemon_down" not in node.events()


def test_three_reloads_in_a_row_while_collecting(fake_daemon, tmp_path):
    """With collectors busy (a daemon answering, NVML, engines) a signal may land on any thread;
    the main thread acts on each (it waits with a timeout), and each reload is a fresh start."""
    daemon = fake_daemon("healthy_two_clients_driver580")
    args = ["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--pipe-dir", daemon.path, "--log-dir", str(tmp_path)]
    log = tmp_path / "agent.log"
    with Agent(args, log_path=log, nvml="h200") as agent:
        up = ("mps_control_up", frozenset({("pipe_dir", daemon.path)}))
        for reloads in range(1, 4):
            agent.wait_for(lambda s: s.get(up) == 1)
            agent.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while events(log).count("agent_started") < reloads + 1:
                assert time.monotonic() < deadline, f"SIGHUP number {reloads} was not acted on"
                time.sleep(0.05)
            agent.wait_healthy()
        assert agent.stop() == 0
