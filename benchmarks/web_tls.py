"""What TLS and basic auth (a web configuration file, docs/configuration.md#tls-and-basic-auth) cost
a scrape: the agent's HTTP server in a process of its own serving the golden fixture node's
exposition (tests/fixtures/golden/node.prom), scraped one request after another, each on a new
connection as Prometheus does against a server that closes every connection (a full TLS handshake
each time). Three servers, one after the other: plain HTTP, TLS, TLS with basic auth (bcrypt cost
10, as `htpasswd -nBC 10` makes). Reported: scrape latency (median, p90), the server's CPU per
scrape (from /proc/<pid>/stat), and bcrypt's cost per check, first and remembered.

    python -m benchmarks.web_tls [--quick]   # 1000 scrapes a server (--quick: 200)
"""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bcrypt
import yaml

from tests.kit.agentproc import REPO, free_port
from tests.kit.tlscerts import make_pki

PASSWORD = "benchmark password"
MODES = ("plain", "tls", "tls+basic_auth")


class _FixedBody:
    """What the server's /metrics answers: the golden node's exposition, as rendered once."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def body(self) -> bytes:
        return self._body


def serve_forever(port: int, web_config: str) -> None:
    """The server process: mpswatch.exporter.serve with the web configuration, until killed."""
    from mpswatch.exporter import serve
    from mpswatch.webconfig import load_web_config

    body = (REPO / "tests/fixtures/golden/node.prom").read_bytes()
    web = load_web_config(web_config) if web_config else None
    serve(f"127.0.0.1:{port}", _FixedBody(body), lambda: (True, "ok"), web=web)  # type: ignore[arg-type]
    print("ready", flush=True)
    threading.Event().wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, work: Path, pki, scrapes: int) -> dict[str, float]:
    web_config = ""
    if mode != "plain":
        config: dict = {"tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}}
        if mode == "tls+basic_auth":
            config["basic_auth_users"] = {"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()}
        web_config = str(work / f"{mode}.yml")
        Path(web_config).write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "agent"), str(REPO)])}
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.web_tls", "--serve", str(port), web_config],
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        context = ssl.create_default_context(cafile=str(pki.ca_cert)) if mode != "plain" else None
        headers = {"Authorization": "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()}

        def scrape() -> float:
            start = time.perf_counter()
            connection = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context) if context
                          else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
            connection.request("GET", "/metrics", headers=headers)
            response = connection.getresponse()
            body = response.read()
            connection.close()
            assert response.status == 200 and body, response.status
            return time.perf_counter() - start

        for _ in range(20):  # warm-up; the first authenticated scrape pays bcrypt once
            scrape()
        cpu_before = cpu_seconds(server.pid)
        latencies = sorted(scrape() for _ in range(scrapes))
        cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        server.kill()
        server.wait()
    return {"median_ms": statistics.median(latencies) * 1e3, "p90_ms": latencies[int(0.9 * len(latencies))] * 1e3,
            "server_cpu_ms": cpu / scrapes * 1e3}


def bcrypt_costs() -> tuple[float, float]:
    """(first check, remembered check) of BasicAuth, median ms."""
    from mpswatch.webconfig import BasicAuth

    auth = BasicAuth({"prometheus": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10))})
    first, remembered = [], []
    for attempt in range(10):
        header = "Basic " + base64.b64encode(f"prometheus:{PASSWORD} {attempt}".encode()).decode()
        start = time.perf_counter()
        auth.allows(header)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        auth.allows(header)
        remembered.append(time.perf_counter() - start)
    return statistics.median(first) * 1e3, statistics.median(remembered) * 1e3


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve_forever(int(sys.argv[2]), sys.argv[3])
        return
    scrapes = 200 if "--quick" in sys.argv else 1000
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        results = {mode: measure(mode, work, pki, scrapes) for mode in MODES}
    plain = results["plain"]
    print(f"{scrapes} scrapes a server, one at a time, a new connection each")
    print(f"{'server':16} {'median ms':>9} {'p90 ms':>7} {'server CPU ms/scrape':>21} {'median / plain':>15}")
    for mode, figures in results.items():
        print(f"{mode:16} {figures['median_ms']:9.2f} {figures['p90_ms']:7.2f} {figures['server_cpu_ms']:21.2f} "
              f"{figures['median_ms'] / plain['median_ms']:15.2f}")
    first, remembered = bcrypt_costs()
    print(f"basic auth check, bcrypt cost 10: first {first:.1f} ms, remembered {remembered:.3f} ms (median of 10)")


if __name__ == "__main__":
    main()
