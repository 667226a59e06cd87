"""End to end: the agent as a real process, real Prometheus (Debian's package) scraping it with the
shipped rules, real Alertmanager routing to a webhook receiver in this test. Loopback only."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.kit.agentproc import free_port
from tests.kit.replaystack import ALERTMANAGER, ALERTS, PROMETHEUS, ReplayStack

pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and ALERTMANAGER),
    reason="needs Debian's prometheus and prometheus-alertmanager (the README's test command installs them)",
)


class Receiver:
    """Records every webhook delivery Alertmanager makes."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.deliveries.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path: str, alertname: str, status: str) -> list[dict]:
        return [a for p, d in self.deliveries if p == path for a in d["alerts"]
                if a["labels"]["alertname"] == alertname and a["status"] == status]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def stack(tmp_path):
    receiver = Receiver()
    replay = ReplayStack(tmp_path, receiver.url)
    try:
        wait_until(lambda: _query(replay.prometheus, "mps_control_up") == [1.0], 60, "Prometheus scraping the agent")
        yield replay, receiver
    finally:
        replay.close()
        receiver.server.shutdown()


def _query(prometheus: str, expr: str) -> list[float]:
    try:
        data = get_json(f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}")
    except OSError:
        return []
    return [float(r["value"][1]) for r in data["data"]["result"]]


def test_a_dead_control_daemon_pages_and_the_page_resolves_after_recovery(stack):
    replay, receiver = stack
    assert _query(replay.prometheus, 'ALERTS{alertstate="firing"}') == []
    replay.kill_daemon()
    firing = wait_until(lambda: receiver.alerts("/pager", "MPSControlDaemonDown", "firing"), 150,
                        "MPSControlDaemonDown delivered to the pager")
    labels = firing[0]["labels"]
    assert labels["severity"] == "critical" and labels["state"] == "stale_pid_file" and labels["pipe_dir"] == replay.daemon.path
    # the runbook link is the alerting node's own agent, which serves the runbook there
    runbook_url = firing[0]["annotations"]["runbook_url"]
    assert runbook_url == f"http://{labels['instance']}/runbooks#mpscontroldaemondown"
    with urllib.request.urlopen(runbook_url, timeout=5) as response:
        assert "\n## MPSControlDaemonDown\n" in response.read().decode()
    replay.restore_daemon()
    wait_until(lambda: receiver.alerts("/pager", "MPSControlDaemonDown", "resolved"), 90,
               "MPSControlDaemonDown resolved at the pager")
    assert not receiver.alerts("/tickets", "MPSControlDaemonDown", "firing")


@pytest.fixture
def stack_without_mps(tmp_path):
    receiver = Receiver()
    replay = ReplayStack(tmp_path, receiver.url, mps_started=False)
    try:
        wait_until(lambda: _query(replay.prometheus, "mps_control_daemons") == [0.0], 60, "Prometheus scraping the agent")
        yield replay, receiver
    finally:
        replay.close()
        receiver.server.shutdown()


def test_mps_expected_and_never_started_pages_and_the_page_resolves_once_a_daemon_runs(stack_without_mps):
    replay, receiver = stack_without_mps
    assert _query(replay.prometheus, 'mps_control_expected{reason="configured"}') == [1.0]
    firing = wait_until(lambda: receiver.alerts("/pager", "MPSExpectedButNoDaemon", "firing"), 260,
                        "MPSExpectedButNoDaemon delivered to the pager")
    labels = firing[0]["labels"]
    assert labels["severity"] == "critical" and labels["reason"] == "configured"
    assert firing[0]["annotations"]["runbook_url"] == f"http://{labels['instance']}/runbooks#mpsexpectedbutnodaemon"
    replay.start_daemon()
    wait_until(lambda: receiver.alerts("/pager", "MPSExpectedButNoDaemon", "resolved"), 90,
               "MPSExpectedButNoDaemon resolved at the pager")
    assert _query(replay.prometheus, "mps_control_up") == [1.0]
    assert {a["labels"]["alertname"] for _, d in receiver.deliveries for a in d["alerts"]} == {"MPSExpectedButNoDaemon"}


def test_the_agents_own_failures_silence_what_follows_from_them_on_the_same_node(tmp_path):
    """The shipped Alertmanager example, as it is, given alerts through its API."""
    port = free_port()
    alertmanager = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={ALERTS / 'alertmanager.example.yml'}", f"--storage.path={tmp_path}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "alertmanager.log", "wb"))
    api = f"http://127.0.0.1:{port}/api/v2/alerts"

    def alert(name: str, instance: str, severity: str, **labels: str) -> dict:
        return {"labels": {"alertname": name, "instance": instance, "severity": severity, **labels}}

    try:
        wait_until(lambda: _reachable(api), 30, "Alertmanager answering")
        body = json.dumps([
            alert("MPSWatchCannotRunMPSControl", "n1", "warning", pipe_dir="/run/nvidia-mps", state="exec_failed"),
            alert("MPSEnginePipeDirNotServed", "n1", "critical", engine="a"),
            alert("MPSExpectedButNoDaemon", "n1", "critical", reason="engine_pipe_dir"),
            alert("MPSServerFault", "n1", "critical", pipe_dir="/run/nvidia-mps", uid="0"),  # not the agent's blindness
            alert("MPSEnginePipeDirNotServed", "n2", "critical", engine="a"),  # another node
            alert("MPSWatchCollectorFailing", "n3", "warning", collector="engines"),
            alert("MPSExpectedButNoDaemon", "n3", "critical", reason="engine_pipe_dir"),
            alert("MPSWatchCollectorFailing", "n4", "warning", collector="gpu"),
            alert("MPSEngineWithoutMPS", "n4", "critical", engine="a"),
            alert("MPSExpectedButNoDaemon", "n4", "critical", reason="configured"),  # the GPU says nothing on it
        ]).encode()
        urllib.request.urlopen(urllib.request.Request(api, body, {"Content-Type": "application/json"}), timeout=5)
        states = wait_until(lambda: _states(api) if len(_states(api)) == 10 else None, 30, "the alerts received")
        suppressed = {key for key, state in states.items() if state == "suppressed"}
        assert suppressed == {("MPSEnginePipeDirNotServed", "n1"), ("MPSExpectedButNoDaemon", "n1"),
                              ("MPSExpectedButNoDaemon", "n3"), ("MPSEngineWithoutMPS", "n4")}
    finally:
        alertmanager.terminate()
        alertmanager.wait(timeout=20)


def _reachable(url: str) -> bool:
    try:
        get_json(url)
        return True
    except OSError:
        return False


def _states(api: str) -> dict[tuple[str, str], str]:
    return {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"]["state"] for a in get_json(api)}


def test_every_dashboard_query_returns_series_on_a_healthy_node(stack):
    from tests.test_dashboards import queries

    replay, _ = stack
    prometheus = replay.prometheus
    # dcgm-exporter's series are there only where it runs too: not on this node; the fleet dashboard
    # reads the fleet rules, checked against a fleet by tests/test_fleet.py; a neighbour's slowdown exists
    # only while one engine is slowed by another, never on a healthy node (tests/test_interference.py)
    incident_only = ("DCGM_", "mps_engine_interference_slowdown_ratio")
    pending = {(name, title, expr) for name, title, expr in queries()
               if not any(marker in expr for marker in incident_only) and name != "fleet.json"}
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:
        pending = {(n, t, e) for n, t, e in pending if not _query(prometheus, e)}
        time.sleep(1)
    assert not pending, sorted(pending)
