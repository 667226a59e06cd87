"""End to end: the agent as a real process, real Prometheus (Debian's package) scraping it with the
shipped rules, real Alertmanager routing to a webhook receiver in this test. Loopback only."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.kit.replaystack import ALERTMANAGER, PROMETHEUS, ReplayStack

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
    assert firing[0]["annotations"]["runbook_url"] == "alerts/runbooks.md#mpscontroldaemondown"
    replay.restore_daemon()
    wait_until(lambda: receiver.alerts("/pager", "MPSControlDaemonDown", "resolved"), 90,
               "MPSControlDaemonDown resolved at the pager")
    assert not receiver.alerts("/tickets", "MPSControlDaemonDown", "firing")


def test_every_dashboard_query_returns_series_on_a_healthy_node(stack):
    from tests.test_dashboards import queries

    replay, _ = stack
    prometheus = replay.prometheus
    pending = {(name, title, expr) for name, title, expr in queries()}
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:
        pending = {(n, t, e) for n, t, e in pending if not _query(prometheus, e)}
        time.sleep(1)
    assert not pending, sorted(pending)
