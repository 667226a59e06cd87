"""The agent's HTTP server, in process: what each path answers and how it answers."""

import http.client
import socket

import pytest
from mpswatch.exporter import CachedExposition, serve
from mpswatch.exposition import render
from mpswatch.snapshot import NodeSnapshot
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.agentproc import free_port


@pytest.fixture
def server():
    health = {"ok": True}
    exposition = CachedExposition(NodeSnapshot, lambda snapshot: render(snapshot, "9.9.9"))
    port = free_port()
    httpd = serve(f"127.0.0.1:{port}", exposition, lambda: (health["ok"], "detail here"))
    yield port, health
    httpd.shutdown()
    httpd.server_close()


def request(port, method, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request(method, path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response, body


def test_metrics_with_a_query_string_is_still_the_exposition(server):
    port, _ = server
    response, body = request(port, "GET", "/metrics?collect[]=x")
    assert response.status == 200
    assert response.getheader("Content-Type") == CONTENT_TYPE_LATEST
    assert int(response.getheader("Content-Length")) == len(body)
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "mpswatch_build_info" in names


def test_head_answers_the_headers_of_get_without_a_body(server):
    port, _ = server
    get, body = request(port, "GET", "/metrics")
    head, nothing = request(port, "HEAD", "/metrics")
    assert head.status == 200 and nothing == b""
    assert head.getheader("Content-Length") == get.getheader("Content-Length") == str(len(body))


def test_healthz_follows_the_agent_health(server):
    port, health = server
    response, body = request(port, "GET", "/healthz")
    assert (response.status, body) == (200, b"ok: detail here\n")
    health["ok"] = False
    response, body = request(port, "GET", "/healthz")
    assert (response.status, body) == (503, b"unhealthy: detail here\n")


def test_unknown_paths_and_methods_are_refused(server):
    port, _ = server
    assert request(port, "GET", "/nope")[0].status == 404
    assert request(port, "POST", "/metrics")[0].status == 501


def test_a_response_leaves_in_one_write(server):
    """The client sees status line, headers and body in the first read: one send, not five."""
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    assert len(chunks) == 1
    assert chunks[0].startswith(b"HTTP/1.0 200 OK\r\n") and chunks[0].endswith(b"\r\n\r\nok: detail here\n")


def test_a_snapshot_that_cannot_be_rendered_answers_500_and_makes_healthz_unhealthy():
    """Rendering raised: /metrics answers 500 and /healthz 503 with the reason (a liveness probe restarts
    the agent), the failing snapshot is rendered once, not once a scrape; the next snapshot heals both."""
    snapshots = [NodeSnapshot()]
    renders = []

    def render_or_fail(snapshot):
        renders.append(snapshot)
        if len(snapshots) == 1:
            raise UnicodeEncodeError("utf-8", "x\udcfe", 1, 2, "surrogates not allowed")
        return render(snapshot, "9.9.9")

    port = free_port()
    httpd = serve(f"127.0.0.1:{port}", CachedExposition(lambda: snapshots[-1], render_or_fail), lambda: (True, "fine"))
    try:
        response, body = request(port, "GET", "/metrics")
        assert (response.status, body) == (500, b"internal error\n")
        response, body = request(port, "GET", "/healthz")
        assert response.status == 503
        assert body.startswith(b"unhealthy: rendering /metrics failed: UnicodeEncodeError(")
        assert request(port, "GET", "/metrics")[0].status == 500
        assert len(renders) == 1
        snapshots.append(NodeSnapshot())
        assert request(port, "GET", "/healthz")[0].status == 200
        assert request(port, "GET", "/metrics")[0].status == 200
    finally:
        httpd.shutdown()


def test_a_path_that_is_not_a_url_is_just_not_found(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET http://[/x HTTP/1.0\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.0 404 Not Found\r\n")
    assert request(port, "GET", "/healthz")[0].status == 200
