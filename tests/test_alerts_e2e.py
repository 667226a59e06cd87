"""End to end: the agent as a real process, real Prometheus (Debian's package) scraping it with the
shipped rules, real Alertmanager routing to a webhook receiver in this test. Loopback only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.agentproc import Agent, free_port
from tests.fakedaemon import FAKE_CONTROL

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "alerts"
FIXTURES = HERE / "fixtures" / "h200-driver580"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

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
def stack(tmp_path, fake_daemon):
    """Agent, Alertmanager and Prometheus on loopback; yields what the test needs."""
    daemon = fake_daemon("healthy_two_clients_driver580")
    receiver = Receiver()
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "server.log").write_text((FIXTURES / "session1-server.log").read_text())
    engine = subprocess.Popen(  # a vLLM-like engine, attached to the fake GPU as an MPS client
        [sys.executable, str(HERE / "fakevllm.py"), "vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct", "--port",
         str(free_port()), "--served-model-name", "qwen-a"],
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": daemon.path}, stdout=subprocess.PIPE, text=True,
    )
    processes = [engine]
    assert engine.stdout.readline().strip() == "ready"
    agent = Agent(["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--pipe-dir", daemon.path,
                   "--log-dir", str(log_dir)],
                  env={"MPSWATCH_GPU_NVML_MODULE": "tests.fakenvml:h200", "FAKENVML_MPS_CLIENT_PIDS": str(engine.pid),
                       "MPSWATCH_GPU_INTERVAL_SECONDS": "0.5", "MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": "0.5"},
                  log_path=tmp_path / "agent.log")
    try:
        am_config = yaml.safe_load((ALERTS / "alertmanager.example.yml").read_text())
        for entry in am_config["receivers"]:
            for hook in entry["webhook_configs"]:
                hook["url"] = receiver.url + urllib.parse.urlsplit(hook["url"]).path
        am_config["route"].update(group_wait="1s", group_interval="1s")
        (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
        am_port = free_port()
        processes.append(subprocess.Popen(
            [ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "alertmanager.log", "wb"),
        ))
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS / "mpswatch.rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "mpswatch", "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]}],
        }))
        processes.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
        ))
        prometheus = f"http://127.0.0.1:{prom_port}"
        wait_until(lambda: _query(prometheus, 'mps_control_up') == [1.0], 60, "Prometheus scraping the agent")
        yield daemon, receiver, prometheus
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        agent.stop()
        receiver.server.shutdown()


def _query(prometheus: str, expr: str) -> list[float]:
    try:
        data = get_json(f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}")
    except OSError:
        return []
    return [float(r["value"][1]) for r in data["data"]["result"]]


def test_a_dead_control_daemon_pages_and_the_page_resolves_after_recovery(stack):
    daemon, receiver, prometheus = stack
    assert _query(prometheus, 'ALERTS{alertstate="firing"}') == []
    daemon.kill()
    daemon.update(mode="not_running")  # killed: the pid file stays behind
    firing = wait_until(lambda: receiver.alerts("/pager", "MPSControlDaemonDown", "firing"), 150,
                        "MPSControlDaemonDown delivered to the pager")
    labels = firing[0]["labels"]
    assert labels["severity"] == "critical" and labels["state"] == "stale_pid_file" and labels["pipe_dir"] == daemon.path
    assert firing[0]["annotations"]["runbook_url"] == "alerts/runbooks.md#mpscontroldaemondown"
    daemon.update(mode="answer")
    wait_until(lambda: receiver.alerts("/pager", "MPSControlDaemonDown", "resolved"), 90,
               "MPSControlDaemonDown resolved at the pager")
    assert not receiver.alerts("/tickets", "MPSControlDaemonDown", "firing")


def test_every_dashboard_query_returns_series_on_a_healthy_node(stack):
    from tests.test_dashboards import queries

    _, _, prometheus = stack
    pending = {(name, title, expr) for name, title, expr in queries()}
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:
        pending = {(n, t, e) for n, t, e in pending if not _query(prometheus, e)}
        time.sleep(1)
    assert not pending, sorted(pending)
