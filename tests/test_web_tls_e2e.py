"""End to end: Debian's Prometheus scraping the agent over TLS with basic auth, from a web
configuration file in the exporter toolkit's format; the same target refused without the password,
with a wrong one, over plain HTTP and without trusting the agent's CA; and the same file serving
Debian's node_exporter, where it is installed. Loopback only.

The printed table is what docs/validation.md records."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import bcrypt
import pytest
import yaml

from tests.kit.agentproc import agent_env, free_port, mpswatch_cmd
from tests.kit.replaystack import PROMETHEUS
from tests.kit.tlscerts import OPENSSL, make_pki

pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and OPENSSL),
    reason="needs Debian's prometheus (the README's test command installs it) and the openssl program",
)

USER, PASSWORD = "prometheus", "scrape me, 2026"
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


def https_get(url: str, context: ssl.SSLContext, password: str | None) -> int:
    request = urllib.request.Request(url)
    if password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def tls_agent(tmp_path):
    pki = make_pki(tmp_path / "pki")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()  # htpasswd -nBC 10's cost
    (tmp_path / "web.yml").write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
        "basic_auth_users": {USER: hashed},
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
    }))
    port = free_port()
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen(
        mpswatch_cmd("run", "--listen", f"127.0.0.1:{port}", "--log-format", "json",
                     "--web.config.file", str(tmp_path / "web.yml"), nvml="h200"),
        env=agent_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    try:
        wait_until(lambda: agent.poll() is None and https_get(f"https://127.0.0.1:{port}/healthz", context, PASSWORD) == 200,
                   30, "the agent answering over TLS")
        yield port, pki, context, tmp_path / "web.yml"
    finally:
        agent.terminate()
        agent.wait(timeout=20)
        log.close()


def test_prometheus_scrapes_over_tls_with_basic_auth_and_is_refused_without(tmp_path, tls_agent):
    port, pki, context, web_config = tls_agent
    tls = {"scheme": "https", "tls_config": {"ca_file": str(pki.ca_cert)}}
    jobs = {
        "tls_basic_auth": {**tls, "basic_auth": {"username": USER, "password": PASSWORD}},
        "no_password": tls,
        "wrong_password": {**tls, "basic_auth": {"username": USER, "password": "guess"}},
        "plain_http": {"scheme": "http", "basic_auth": {"username": USER, "password": PASSWORD}},
        "untrusted_ca": {"scheme": "https", "basic_auth": {"username": USER, "password": PASSWORD}},
    }
    scrape_configs = [{"job_name": name, **job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                      for name, job in jobs.items()]
    node_exporter = None
    if NODE_EXPORTER:  # the same file, unchanged, serving node_exporter
        node_port = free_port()
        node_exporter = subprocess.Popen(
            [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{node_port}", f"--web.config.file={web_config}",
             "--collector.disable-defaults", "--collector.loadavg"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "node_exporter.log", "wb"),
        )
        scrape_configs.append({"job_name": "node_exporter_same_file", **jobs["tls_basic_auth"],
                               "static_configs": [{"targets": [f"127.0.0.1:{node_port}"]}]})
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape_configs}))
    expected_jobs = {c["job_name"] for c in scrape_configs}
    prometheus_port = free_port()
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    api = f"http://127.0.0.1:{prometheus_port}/api/v1"
    try:
        def scraped() -> dict[str, dict] | None:
            with urllib.request.urlopen(f"{api}/targets", timeout=5) as response:
                targets = json.loads(response.read())["data"]["activeTargets"]
            by_job = {t["labels"]["job"]: t for t in targets if t["health"] != "unknown"}
            return by_job if set(by_job) == expected_jobs else None

        targets = wait_until(scraped, 60, "Prometheus scraping every job")

        def up() -> dict[str, float] | None:
            with urllib.request.urlopen(f"{api}/query?query=up", timeout=5) as response:
                result = json.loads(response.read())["data"]["result"]
            values = {r["metric"]["job"]: float(r["value"][1]) for r in result}
            return values if set(values) == expected_jobs else None

        values = wait_until(up, 30, "up for every job")
        with urllib.request.urlopen(f"{api}/query?query=mps_exporter_build_info", timeout=5) as response:
            build_info = json.loads(response.read())["data"]["result"]
    finally:
        for process in (prometheus, node_exporter):
            if process is not None:
                process.terminate()
                process.wait(timeout=20)

    print(f"\n{'job':24} {'up':>3}  {'scrape s':>8}  last error")
    for name in [c["job_name"] for c in scrape_configs]:
        t = targets[name]
        print(f"{name:24} {values[name]:>3.0f}  {t['lastScrapeDuration']:>8.4f}  {t['lastError'] or '-'}")
    assert values == {"tls_basic_auth": 1.0, "no_password": 0.0, "wrong_password": 0.0, "plain_http": 0.0, "untrusted_ca": 0.0,
                      **({"node_exporter_same_file": 1.0} if node_exporter else {})}
    assert [r["metric"]["job"] for r in build_info] == ["tls_basic_auth"]  # only the authenticated scrape got data
    assert "401 Unauthorized" in targets["no_password"]["lastError"]
    assert "401 Unauthorized" in targets["wrong_password"]["lastError"]
    assert "400 Bad Request" in targets["plain_http"]["lastError"]
    assert "certificate" in targets["untrusted_ca"]["lastError"]
    # and straight from a client: every path refused without the password
    for path in ("/metrics", "/healthz", "/"):
        assert https_get(f"https://127.0.0.1:{port}{path}", context, None) == 401
        assert https_get(f"https://127.0.0.1:{port}{path}", context, "guess") == 401
