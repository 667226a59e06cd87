"""The agent's HTTP server, in process: what each path answers and how it answers."""

import http.client
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from mpswatch.exporter import ANSWER_THREADS, MAX_REQUEST_HEAD_BYTES, cached_exposition, serve
from mpswatch.exposition import render
from mpswatch.snapshot import NodeSnapshot
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.agentproc import free_port


@pytest.fixture
def server():
    health = {"ok": True}
    exposition = cached_exposition(NodeSnapshot, lambda snapshot: render(snapshot, "9.9.9"))
    port = free_port()
    httpd = serve(f"127.0.0.1:{port}", exposition, lambda: (health["ok"], "detail here"))
    yield port, health
    httpd.shutdown()
    httpd.server_close()


def request(port, method, path, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
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
    assert "mps_exporter_build_info" in names


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
    httpd = serve(f"127.0.0.1:{port}", cached_exposition(lambda: snapshots[-1], render_or_fail), lambda: (True, "fine"))
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


def test_two_hundred_concurrent_scrapes_all_get_the_exposition(server):
    """A burst waits in the listen backlog instead of being refused (socketserver's backlog was 5)."""
    port, _ = server
    expected = request(port, "GET", "/metrics")[1]
    start = threading.Barrier(200)

    def scrape(_):
        start.wait()
        response, body = request(port, "GET", "/metrics", timeout=60)
        return response.status, body == expected

    with ThreadPoolExecutor(200) as pool:
        answers = list(pool.map(scrape, range(200)))
    assert answers == [(200, True)] * 200


def slow_sender(sockets, stop, pause=0.3):
    """Sends each socket one more byte of a request too long to ever end, every `pause` seconds."""
    request = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 10_000
    for byte in range(len(request)):
        for sock in sockets:
            try:
                sock.send(request[byte:byte + 1])
            except OSError:
                pass
        if stop.wait(pause):
            return


def closed_by_server(sock):
    """True when the server closed the connection without answering; waits up to the socket's timeout."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_slow_connections_are_closed_at_their_deadline_and_never_hold_up_a_scrape():
    port = free_port()
    httpd = serve(f"127.0.0.1:{port}", cached_exposition(NodeSnapshot, lambda s: render(s, "9.9.9")),
                  lambda: (True, "fine"), deadline_seconds=1.5)
    slow = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(20)]
    stop = threading.Event()
    sender = threading.Thread(target=slow_sender, args=(slow, stop))
    sender.start()
    try:
        assert request(port, "GET", "/metrics")[0].status == 200
        assert [closed_by_server(sock) for sock in slow] == [True] * 20
        assert httpd.drops()["deadline"] == 20
    finally:
        stop.set()
        sender.join()
        for sock in slow:
            sock.close()
        httpd.shutdown()


def test_at_the_connection_cap_a_scrape_evicts_the_oldest_slow_connection():
    port = free_port()
    httpd = serve(f"127.0.0.1:{port}", cached_exposition(NodeSnapshot, lambda s: render(s, "9.9.9")),
                  lambda: (True, "fine"), max_connections=10)
    slow = []
    try:
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n")  # and never the blank line that ends it
            slow.append(sock)
        assert request(port, "GET", "/healthz")[0].status == 200
        assert closed_by_server(slow[0])
        assert httpd.drops() == {"evicted": 1}
    finally:
        for sock in slow:
            sock.close()
        httpd.shutdown()


def test_held_connections_hold_no_threads(server):
    port, _ = server
    assert request(port, "GET", "/metrics")[0].status == 200
    threads_before = threading.active_count()
    held = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n")
            held.append(sock)
        assert request(port, "GET", "/metrics")[0].status == 200  # accepted after all 200 held ones
        assert threading.active_count() <= threads_before + ANSWER_THREADS
    finally:
        for sock in held:
            sock.close()


def test_a_request_head_past_the_limit_is_refused(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n" + b"X-Big: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 1) + b"\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.0 431 ")
    assert request(port, "GET", "/healthz")[0].status == 200
