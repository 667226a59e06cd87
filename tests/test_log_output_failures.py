"""`mpswatch run` whose stderr fails or blocks (a full disk, a pipe closed at start or mid-run, a
pipe nobody reads) keeps collecting and serving fresh data, and counts the log lines it lost."""

from __future__ import annotations

import fcntl
import os
import subprocess

from tests.kit.agentproc import Agent, agent_env, free_port, key, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL

F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's capacity
SUCCESS = key("mps_exporter_collector_success", collector="mps_control")
LAST_SUCCESS = key("mps_exporter_collector_last_success_timestamp_seconds", collector="mps_control")


class AgentWithStderr(Agent):
    """An agent under test whose stderr (where it logs) is `stderr`."""

    def __init__(self, args: list[str], stderr: int | object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = subprocess.DEVNULL
        self.proc = subprocess.Popen(
            mpswatch_cmd("run", "--listen", f"127.0.0.1:{self.port}", "--log-format", "json", *args, nvml="no_driver"),
            env=agent_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        self.wait_healthy()


def args_for(daemon) -> list[str]:
    return ["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--command-timeout", "2", "--pipe-dir", daemon.path]


def assert_still_collecting(agent: Agent, daemon) -> None:
    """Fresh data: two later successful cycles, and a change at the daemon seen (and logged)."""
    up = key("mps_control_up", pipe_dir=daemon.path)
    first = agent.wait_for(lambda s: s if s.get(SUCCESS) == 1 and s.get(up) == 1 else None)
    agent.wait_for(lambda s: s.get(LAST_SUCCESS, 0) > first[LAST_SUCCESS] + 0.9)  # two cycles later
    daemon.update(mode="not_running")  # logged as daemon_down: a write that fails or blocks
    agent.wait_for(lambda s: s.get(up) == 0)
    daemon.update(mode="answer")
    agent.wait_for(lambda s: s.get(up) == 1 and s.get(SUCCESS) == 1)
    assert agent.get("/healthz")[0] == 200
    assert agent.proc.poll() is None


def assert_counted(agent: Agent, at_least: int) -> None:
    """Lines written by the writer thread are counted in the next snapshot published after them."""
    lost = key("mps_exporter_log_lines_dropped_total", reason="write_failed")
    agent.wait_for(lambda s: s.get(lost, 0) >= at_least)


def stops_cleanly(agent: Agent) -> None:
    assert agent.stop() == 0  # no traceback, no exit status from a failed flush on the way out


def test_stderr_on_a_full_disk(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    with open("/dev/full", "wb") as full, AgentWithStderr(args_for(daemon), full) as agent:
        assert_still_collecting(agent, daemon)
        assert_counted(agent, 3)
        stops_cleanly(agent)


def test_stderr_a_pipe_closed_before_the_start(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with AgentWithStderr(args_for(daemon), write_end) as agent:
            assert_still_collecting(agent, daemon)
            assert_counted(agent, 3)
            stops_cleanly(agent)
    finally:
        os.close(write_end)


def test_stderr_a_pipe_closed_mid_run(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    with AgentWithStderr(args_for(daemon), subprocess.PIPE) as agent:
        events = [agent.proc.stderr.readline() for _ in range(3)]  # read while it runs: the pipe works
        assert all(b'"event"' in line for line in events), events
        agent.wait_for(lambda s: s.get(SUCCESS) == 1)
        agent.proc.stderr.close()
        assert_still_collecting(agent, daemon)
        assert_counted(agent, 2)  # daemon_down, daemon_up
        stops_cleanly(agent)


def test_stderr_a_pipe_nobody_reads(fake_daemon):
    """A blocked write holds up only the agent's log writer: collection goes on."""
    daemon = fake_daemon("healthy_two_clients_driver580")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    os.write(write_end, b"x" * 4096)  # full from the start
    try:
        with AgentWithStderr(args_for(daemon), write_end) as agent:
            for _ in range(3):  # each flap logs two lines the blocked writer cannot take
                assert_still_collecting(agent, daemon)
            assert agent.value("mps_exporter_log_lines_dropped_total", reason="write_failed") == 0
            stops_cleanly(agent)  # within the wait for a blocked writer (2 s)
    finally:
        os.close(read_end)
        os.close(write_end)
