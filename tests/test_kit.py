"""The test kit itself: agents under test see only this session's processes, and the fake control
program is run by this interpreter, in both of its modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.kit import fakevllm, scope
from tests.kit.agentproc import agent_env, free_port, mpswatch_cmd
from tests.kit.fakecontrol import write_reply
from tests.kit.fakedaemon import FAKE_CONTROL, stand_in
from tests.kit.fakevllm import wait_ready


def outside_the_session() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != scope.VARIABLE}


def test_an_agent_under_test_does_not_see_processes_outside_the_session(fake_daemon, tmp_path):
    ours = fake_daemon("healthy_two_clients_driver580")
    foreign_pipe = tmp_path / "foreign" / "pipe"
    foreign_pipe.mkdir(parents=True)
    (foreign_pipe / "control").touch()
    foreign_daemon = stand_in("nvidia-cuda-mps-control", "-d",
                              env={**outside_the_session(), "CUDA_MPS_PIPE_DIRECTORY": str(foreign_pipe)})
    foreign_engine = wait_ready(subprocess.Popen(fakevllm.command(free_port(), "foreign"), env=outside_the_session(),
                                                 stdout=subprocess.PIPE, text=True))
    our_port = free_port()
    our_engine = wait_ready(subprocess.Popen(fakevllm.command(our_port, "ours"), stdout=subprocess.PIPE, text=True))
    try:
        visible = scope.SessionProcesses()
        assert visible(ours.process.pid) and visible(our_engine.pid)
        assert not visible(foreign_daemon.pid) and not visible(foreign_engine.pid)
        run = subprocess.run(mpswatch_cmd("status", "--json", "--mps-control-bin", FAKE_CONTROL, nvml="h200_all_mps"),
                             env=agent_env(), capture_output=True, text=True, timeout=60)
        report = json.loads(run.stdout)
        assert [d["pipe_dir"] for d in report["daemons"]] == [ours.path]  # found by discovery, as the only one
        assert [e["name"] for e in report["engines"]] == [f"ours:{our_port}"]
    finally:
        for process in (foreign_daemon, foreign_engine, our_engine):
            process.kill()
            process.wait()


def control(pipe_dir, command: str) -> subprocess.CompletedProcess:
    """The fake control program as the agent runs it: the command line on stdin."""
    return subprocess.run([FAKE_CONTROL], input=command + "\n", capture_output=True, text=True, timeout=10,
                          env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)})


def test_the_fake_control_program_is_run_by_this_interpreter_without_site_packages():
    with open(FAKE_CONTROL) as program:
        assert f"exec {sys.executable} -I -S " in program.read()


def test_the_fake_control_program_answers_from_a_scenario_and_logs_what_it_was_sent(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    answered = control(daemon.pipe_dir, "get_server_list")
    assert (answered.returncode, answered.stdout) == (0, daemon.scenario["replies"]["get_server_list"])
    daemon.update(mode="not_running")
    assert control(daemon.pipe_dir, "ps").returncode == 1
    assert daemon.commands() == ["get_server_list", "ps"]


def test_the_fake_control_program_replays_reply_files(tmp_path):
    write_reply(tmp_path, "get_server_status 476", "ACTIVE\n")
    assert control(tmp_path, "get_server_status 476").stdout == "ACTIVE\n"
    assert control(tmp_path, "shutdown").stdout == 'Unknown command "shutdown"\n'
