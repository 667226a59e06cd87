"""`mpswatch status --agent URL`: the running agent's report from its /status, which knows what a
one-shot look cannot: the clients of an MPS server that faulted and then died before anyone looked."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.kit.agentproc import REPO, Agent, agent_env, free_port, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon

LOGS = REPO / "tests" / "fixtures" / "h200-driver580"
NO_SERVER = {"get_server_list": "", "ps": "PID       ID        SERVER         DEVICE                    NAMESPACE      COMMAND        \n"}


@pytest.fixture
def faulted_node(tmp_path):
    """The scenario's server 632 in FAULT with clients 629 and 513; its server.log (the H200's session
    2, server PID made 632) blames 513."""
    daemon = FakeDaemon(tmp_path / "mps", "server_fault_driver580")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "server.log").write_text((LOGS / "session2-fault-server.log").read_text().replace("   440] ", "   632] "))
    config = tmp_path / "config.toml"
    config.write_text(f'[mps_control]\ndefault_pipe_dirs = ["{tmp_path}/no-default-pipe-dir"]\n'
                      f'[mps_logs]\nlog_dirs = ["{log_dir}"]\ntimezone = "UTC"\n')
    try:
        yield daemon, config
    finally:
        daemon.close()


def status(*args: str, config) -> tuple[int, str]:
    run = subprocess.run(mpswatch_cmd("status", "--config", str(config), "--mps-control-bin", FAKE_CONTROL, *args,
                                      nvml="h200_all_mps"),
                         env=agent_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    return run.returncode, run.stdout + run.stderr


def blast(report: dict) -> list[tuple]:
    return [(b["server_pid"], b["state"], b["blamed"] and b["blamed"]["pid"], sorted(c["pid"] for c in b["clients"]))
            for b in report["blast_radius"]]


def wait_for_blast(agent: Agent, expected: list[tuple], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        code, body = agent.get("/status")
        if code == 200 and (seen := blast(json.loads(body))) == expected:
            return
        time.sleep(0.2)
    raise AssertionError(f"the agent's /status never showed {expected}; last: {seen}")


def test_the_running_agent_tells_the_blast_radius_of_a_server_that_died_where_a_one_shot_look_cannot(faulted_node):
    daemon, config = faulted_node
    with Agent(["--config", str(config), "--mps-control-bin", FAKE_CONTROL], nvml="h200_all_mps") as agent:
        wait_for_blast(agent, [(632, "fault", 513, [513, 629])])
        daemon.update(replies={**daemon.scenario["replies"], **NO_SERVER})  # the server and its clients are gone
        wait_for_blast(agent, [(632, "gone", 513, [513, 629])])

        code, text = status("--json", config=config)
        assert code == 0 and blast(json.loads(text)) == [], text  # one look: the server is simply not there

        code, text = status("--json", "--agent", agent.url, config=config)
        assert code == 1 and blast(json.loads(text)) == [(632, "gone", 513, [513, 629])], text
        code, text = status("--agent", agent.url + "/", config=config)
        assert code == 1 and "blast radius of server 632" in text and "513" in text and "629" in text, text


def test_an_agent_that_cannot_be_asked_is_a_one_line_error_with_exit_2(tmp_path):
    code, text = status("--agent", f"http://127.0.0.1:{free_port()}", config=tmp_path / "none.toml")
    assert code == 2 and text.startswith("mpswatch status: cannot ask the agent at http://127.0.0.1:") and text.count("\n") == 1
    code, text = status("--agent", "ftp://example", config=tmp_path / "none.toml")
    assert code == 2 and "expected http://HOST:PORT" in text


@pytest.mark.parametrize("body", [b"not json", b'{"schema": "someone.else/v1"}', b"[]"])
def test_an_answer_that_is_not_a_status_report_is_refused(tmp_path, body):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, text = status("--agent", f"http://127.0.0.1:{server.server_address[1]}", config=tmp_path / "none.toml")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 2 and "did not answer" in text and text.count("\n") == 1, text


def test_the_agent_serves_its_status_report_as_json():
    with Agent([], nvml="h200") as agent:
        with urllib.request.urlopen(agent.url + "/status", timeout=5) as answer:
            assert answer.headers["Content-Type"] == "application/json"
            assert json.loads(answer.read())["schema"] == "mpswatch.status/v1"
