"""Serves /metrics, /status and /healthz: the exposition and the status report of the latest snapshot,
each rendered once per snapshot.

A scrape only reads the current immutable snapshot: no I/O, no locks held by collectors.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric

from mpswatch.snapshot import NodeSnapshot
from mpswatch.webconfig import BasicAuth, TlsWrapper, WebConfig


class _Rendered:
    """A registry-shaped holder of already rendered families, for generate_latest()."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


class CachedBody:
    """A body made from the current snapshot, made once per snapshot: snapshots are immutable, so
    every request between two collector runs gets the same bytes for free, and concurrent requests
    wait for one rendering instead of each doing it."""

    def __init__(self, current: Callable[[], NodeSnapshot], make: Callable[[NodeSnapshot], bytes]) -> None:
        self._current = current
        self._make = make
        self._lock = threading.Lock()
        self._snapshot: NodeSnapshot | None = None
        self._body = b""

    def body(self) -> bytes:
        snapshot = self._current()
        with self._lock:
            if snapshot is not self._snapshot:
                self._body = self._make(snapshot)
                self._snapshot = snapshot
            return self._body


def cached_exposition(current: Callable[[], NodeSnapshot], render: Callable[[NodeSnapshot], list[Metric]]) -> CachedBody:
    """The text exposition of the current snapshot."""
    return CachedBody(current, lambda snapshot: generate_latest(_Rendered(render(snapshot))))


def cached_status(current: Callable[[], NodeSnapshot], report: Callable[[NodeSnapshot], dict[str, Any]]) -> CachedBody:
    """`mpswatch status --json` of the current snapshot: what the running agent remembers (rates over
    two samples, the clients of servers that faulted or died) and a one-shot look cannot know."""
    return CachedBody(current, lambda snapshot: json.dumps(report(snapshot), indent=2).encode() + b"\n")


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


_INDEX = (b"<html><body><h1>mpswatch</h1><p><a href='/metrics'>/metrics</a> <a href='/status'>/status</a> "
          b"<a href='/healthz'>/healthz</a></p></body></html>\n")


def respond(path: str, exposition: CachedBody, status: CachedBody | None,
            healthy: Callable[[], tuple[bool, str]]) -> tuple[str, str, bytes]:
    """Status, content type and body for a GET of `path` (query string already cut off)."""
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, exposition.body()
    if path == "/status" and status is not None:
        return "200 OK", "application/json", status.body()
    if path == "/healthz":
        ok, detail = healthy()
        code = "200 OK" if ok else "503 Service Unavailable"
        return code, "text/plain", f"{'ok' if ok else 'unhealthy'}: {detail}\n".encode()
    if path == "/":
        return "200 OK", "text/html", _INDEX
    return "404 Not Found", "text/plain", b"not found\n"


class _Handler(BaseHTTPRequestHandler):
    """One request per connection, answered with a single write: status line, headers and body go
    out in one send (wsgiref makes five, each a loopback wake-up: a third of a scrape's CPU)."""

    timeout = 10  # each read of the request waits at most this long
    server_version = "mpswatch"
    sys_version = ""
    exposition: CachedBody
    status: CachedBody | None
    healthy: Callable[[], tuple[bool, str]]
    log: Any
    auth = BasicAuth({})  # no users: everyone
    extra_headers: str = ""  # the web configuration's headers, as header lines

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        self.close_connection = True
        if not self.auth.allows(self.headers.get("Authorization")):  # every path, as in the exporter toolkit
            self._write(with_body, "401 Unauthorized", "text/plain", b"Unauthorized\n",
                        'WWW-Authenticate: Basic realm="mpswatch"\r\n')
            return
        try:
            status, content_type, body = respond(self.path.partition("?")[0], self.exposition, self.status, self.healthy)
        except Exception as err:  # a rendering bug costs this answer, never the server
            self.log.error("http_answer_failed", path=self.path[:200], error=repr(err))
            status, content_type, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        self._write(with_body, status, content_type, body)

    def _write(self, with_body: bool, status: str, content_type: str, body: bytes, more_headers: str = "") -> None:
        head = (f"HTTP/1.0 {status}\r\nServer: {self.server_version}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{self.extra_headers}{more_headers}Connection: close\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + body if with_body else head)
        except (ConnectionError, TimeoutError):
            pass  # the scraper gave up (its own timeout, a reset): no one is left to answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    log: Any
    tls: TlsWrapper | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, the handshake happens here, on the connection's own thread."""
        if self.tls is None:
            return super().finish_request(request, client_address)
        connection = self.tls.wrap(request)
        if connection is not None:
            try:
                super().finish_request(connection, client_address)
            finally:
                self.shutdown_request(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's failure is logged as one line, not printed as a traceback on stderr."""
        self.log.warning("http_connection_failed", client=str(client_address[0]), error=repr(sys.exc_info()[1]))


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(listen: str, exposition: CachedBody, healthy: Callable[[], tuple[bool, str]],
          status: CachedBody | None = None, web: WebConfig | None = None) -> _Server:
    """Starts the HTTP server on a daemon thread; returns the server (call shutdown() to stop).
    `web`: TLS, basic auth and headers from a web configuration file, on every path."""
    host, port = parse_listen(listen)
    log = structlog.get_logger().bind(component="http")
    handler = type("Handler", (_Handler,), {
        "exposition": exposition, "status": status, "healthy": staticmethod(healthy), "log": log,
        "auth": BasicAuth(web.users if web else {}),
        "extra_headers": "".join(f"{name}: {value}\r\n" for name, value in (web.headers if web else ())),
    })
    httpd = (_Server6 if ":" in host else _Server)((host, port), handler)
    httpd.log = log
    if web is not None and web.tls is not None:
        httpd.tls = TlsWrapper(web.tls, handshake_timeout=_Handler.timeout)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    return httpd
