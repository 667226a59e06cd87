"""Serves /metrics, /status and /healthz: the exposition and the status report of the latest snapshot,
each rendered once per snapshot; and /runbooks, the alerts' runbooks.

A scrape only reads the current immutable snapshot: no I/O, no locks held by collectors.

The server is one asyncio event loop on a thread of its own: a connection costs a socket and a few
KiB, never a thread, so a burst of scrapers waits in a deep listen backlog and a thousand slow
connections hold neither threads nor much memory. Each connection has one deadline for its TLS
handshake, its request and the answer; answers (and bcrypt checks) are computed on a small pool of
threads, so that rendering a new snapshot never stalls the loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import resource
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric

from mpswatch.snapshot import NodeSnapshot
from mpswatch.webconfig import PLAIN_HTTP_TO_TLS_ANSWER, BasicAuth, TlsServer, WebConfig, is_tls_record

LISTEN_BACKLOG = 1024  # socketserver's 5 dropped a sixth of 500 concurrent scrapers (issue 17)
CONNECTION_DEADLINE_SECONDS = 10.0  # TLS handshake, reading the request and writing the answer, together
MAX_CONNECTIONS = 1024
DESCRIPTORS_KEPT_FOR_COLLECTORS = 256  # the connection cap leaves these below RLIMIT_NOFILE
MAX_REQUEST_HEAD_BYTES = 8192
WRITE_CHUNK_BYTES = 65536  # what one connection may hold unsent in the agent, beside the kernel's buffer
ANSWER_THREADS = 2
DROPS_LOG_INTERVAL_SECONDS = 60.0
ACCEPT_RETRY_SECONDS = 0.5  # after accept() failed, e.g. out of descriptors


class _Rendered:
    """A registry-shaped holder of already rendered families, for generate_latest()."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


class RenderFailed(Exception):
    """The current snapshot could not be rendered (already logged once for that snapshot)."""


class CachedBody:
    """A body made from the current snapshot, made once per snapshot: snapshots are immutable, so
    every request between two collector runs gets the same bytes for free, and concurrent requests
    wait for one rendering instead of each doing it. A snapshot that fails to render fails once: its
    requests answer 500 until the next snapshot, and failure() says why."""

    def __init__(self, current: Callable[[], NodeSnapshot], make: Callable[[NodeSnapshot], bytes]) -> None:
        self._current = current
        self._make = make
        self._lock = threading.Lock()
        self._snapshot: NodeSnapshot | None = None
        self._body: bytes | None = b""
        self._failure = ""
        self._log = structlog.get_logger().bind(component="http")

    def body(self) -> bytes:
        with self._lock:
            try:
                snapshot = self._current()
                if snapshot is not self._snapshot:
                    self._snapshot, self._body = snapshot, None
                    self._body = self._make(snapshot)
            except Exception as err:
                self._failure = repr(err)
                self._log.error("render_failed", error=self._failure)
                raise RenderFailed(self._failure) from err
            if self._body is None:
                raise RenderFailed(self._failure)
            return self._body

    def failure(self) -> str | None:
        """Why the current snapshot cannot be rendered, None when it can: /healthz asks, so that a
        liveness probe restarts an agent whose /metrics cannot answer."""
        try:
            self.body()
        except RenderFailed as err:
            return str(err)
        return None


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
          b"<a href='/healthz'>/healthz</a> <a href='/runbooks'>/runbooks</a></p></body></html>\n")
RUNBOOKS_CONTENT_TYPE = "text/markdown; charset=utf-8"


@functools.cache
def runbooks() -> bytes:
    """The alerts' runbooks (alerts/runbooks.md, shipped in the package), served at /runbooks: the
    rules' default runbook_url is the alerting node's own agent, so the link works wherever the
    agent is reachable, with no copy to publish."""
    return resources.files("mpswatch").joinpath("runbooks.md").read_bytes()
_INTERNAL_ERROR = ("500 Internal Server Error", "text/plain", b"internal error\n")


def health(alive: Callable[[], tuple[bool, str]], exposition: CachedBody) -> tuple[bool, str]:
    """What /healthz answers (and systemd's watchdog follows): the collection loops alive, and the
    latest snapshot's /metrics rendered."""
    ok, detail = alive()
    failure = exposition.failure()
    if failure is not None:
        return False, f"rendering /metrics failed: {failure}"
    return ok, detail


def respond(path: str, exposition: CachedBody, status: CachedBody | None,
            healthy: Callable[[], tuple[bool, str]]) -> tuple[str, str, bytes]:
    """Status, content type and body for a GET of `path` (query string already cut off)."""
    try:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, exposition.body()
        if path == "/status" and status is not None:
            return "200 OK", "application/json", status.body()
    except RenderFailed:
        return _INTERNAL_ERROR
    if path == "/healthz":
        ok, detail = health(healthy, exposition)
        code = "200 OK" if ok else "503 Service Unavailable"
        return code, "text/plain", f"{'ok' if ok else 'unhealthy'}: {detail}\n".encode()
    if path == "/":
        return "200 OK", "text/html", _INDEX
    if path == "/runbooks":
        return "200 OK", RUNBOOKS_CONTENT_TYPE, runbooks()
    return "404 Not Found", "text/plain", b"not found\n"


def _answer(status: str, content_type: str, body: bytes, with_body: bool = True, headers: str = "") -> bytes:
    """The whole answer as one buffer: status line, headers and body leave in a single send (five
    sends, as wsgiref makes, are five loopback wake-ups: a third of a scrape's CPU)."""
    head = (f"HTTP/1.0 {status}\r\nServer: mpswatch\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n").encode("latin-1")
    return head + body if with_body else head


class _BadRequest(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Silent(Exception):
    """The client closed the connection before sending anything."""


class _Request:
    def __init__(self, method: str, path: str, authorization: str | None) -> None:
        self.method = method
        self.path = path
        self.authorization = authorization


async def _read_request(reader: asyncio.StreamReader) -> _Request:
    """Method, path and Authorization header of one request; its other headers are read (to their
    end, so the answer is not written over unread input) and ignored."""
    size = 0
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:
            if not lines and not err.partial:
                raise _Silent from err  # connected and closed, as a TCP probe does: nothing to count
            raise _BadRequest("400 Bad Request", "incomplete_request") from err
        except asyncio.LimitOverrunError as err:
            raise _BadRequest("431 Request Header Fields Too Large", "request_too_large") from err
        size += len(line)
        if size > MAX_REQUEST_HEAD_BYTES:
            raise _BadRequest("431 Request Header Fields Too Large", "request_too_large")
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line)
    parts = lines[0].decode("latin-1").split() if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest("400 Bad Request", "bad_request_line")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        raise _BadRequest("501 Not Implemented", "method_not_implemented")
    authorization = None
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "authorization":
            authorization = value.strip()
    return _Request(method, target.partition("?")[0], authorization)


class MetricsServer:
    """The running HTTP server; shutdown() stops it. Connections past the cap evict the oldest one
    that has not yet sent its whole request (a slow connection cannot keep a scrape out), or, when
    every one is being answered, are closed at once (a plain-HTTP one with a 503)."""

    def __init__(self, sock: socket.socket, exposition: CachedBody, status: CachedBody | None,
                 healthy: Callable[[], tuple[bool, str]], web: WebConfig | None, deadline_seconds: float,
                 max_connections: int) -> None:
        self._sock = sock
        self._exposition = exposition
        self._status = status
        self._healthy = healthy
        self._auth = BasicAuth(web.users if web else {})
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in (web.headers if web else ()))
        self._tls = TlsServer(web.tls) if web is not None and web.tls is not None else None
        self._deadline = deadline_seconds
        self._max_connections = max_connections
        self._log = structlog.get_logger().bind(component="http")
        self._pool = ThreadPoolExecutor(ANSWER_THREADS, thread_name_prefix="http-answer")
        self._loop = asyncio.new_event_loop()
        self._open: set[asyncio.Task[None]] = set()
        self._waiting: OrderedDict[asyncio.Task[None], None] = OrderedDict()  # before their request: oldest first
        self._drops: Counter[str] = Counter()
        self._drops_logged_at = 0.0
        self._last_body: bytes | None = None
        self._last_answer = b""
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self._thread.start()
        self._acceptor = asyncio.run_coroutine_threadsafe(self._accept(), self._loop)

    async def _accept(self) -> None:
        while True:
            try:
                connection, _ = await self._loop.sock_accept(self._sock)
            except OSError as err:  # out of descriptors, mostly: the backlog holds the rest meanwhile
                self._dropped("accept_failed")
                self._log.warning("http_accept_failed", error=repr(err))
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            if len(self._open) >= self._max_connections and not self._evict_oldest_waiting():
                self._dropped("over_capacity")
                if self._tls is None:
                    try:
                        connection.send(_answer("503 Service Unavailable", "text/plain", b"too many connections\n"))
                    except OSError:
                        pass
                connection.close()
                continue
            task = self._loop.create_task(self._connection(connection))
            task.add_done_callback(functools.partial(_close, connection))  # also when evicted before it started
            self._open.add(task)
            self._waiting[task] = None

    async def _connection(self, connection: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        writer: asyncio.StreamWriter | None = None
        closed_cleanly = False
        try:
            async with asyncio.timeout(self._deadline):
                opened = await self._open_streams(connection)
                if opened is None:
                    return
                reader, writer = opened
                data = await self._answer_for(reader, task)
                self._waiting.pop(task, None)
                writer.transport.set_write_buffer_limits(high=0)  # drain() waits until the kernel took it all
                view = memoryview(data)
                for start in range(0, len(view), WRITE_CHUNK_BYTES):  # one send for most answers
                    writer.write(view[start:start + WRITE_CHUNK_BYTES])
                    await writer.drain()
                writer.close()
                await writer.wait_closed()
                closed_cleanly = True
        except _Silent:
            pass
        except TimeoutError:
            self._dropped("deadline")
        except asyncio.CancelledError:
            pass  # evicted (counted there) or the server is stopping
        except OSError:
            pass  # the scraper gave up (its own timeout, a reset): no one is left to answer
        finally:
            self._open.discard(task)
            self._waiting.pop(task, None)
            if writer is None:
                connection.close()
            elif not closed_cleanly:
                writer.transport.abort()

    async def _open_streams(self, connection: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The connection as streams, after its TLS handshake where TLS is on; None when it is already
        dealt with (a plain-HTTP request to the TLS port, a failed handshake, a refused certificate)."""
        if self._tls is not None:
            first = await self._peek(connection)
            if not first:
                raise _Silent
            if not is_tls_record(first):
                self._dropped("plain_http_to_tls")
                await self._loop.sock_sendall(connection, PLAIN_HTTP_TO_TLS_ANSWER)
                await self._loop.sock_recv(connection, 65536)  # read: closing with it unread resets the answer away
                return None
        reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await self._loop.connect_accepted_socket(
                lambda: protocol, connection, ssl=self._tls.context if self._tls else None,
                ssl_handshake_timeout=self._deadline + 1 if self._tls else None)  # the connection's deadline comes first
        except (OSError, EOFError) as err:  # ssl.SSLError is an OSError
            if self._tls is None:
                raise
            self._dropped("tls_handshake_failed")
            self._log.warning("http_connection_failed", error=repr(err))
            return None
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        if self._tls is not None:
            refusal = self._tls.refusal(transport.get_extra_info("peercert"))
            if refusal is not None:
                self._dropped("tls_client_not_allowed")
                self._log.warning("http_connection_failed", error=refusal)
                transport.abort()
                return None
        return reader, writer

    async def _peek(self, connection: socket.socket) -> bytes:
        """The connection's first byte, left unread."""
        while True:
            try:
                return connection.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                pass
            readable: asyncio.Future[None] = self._loop.create_future()
            self._loop.add_reader(connection.fileno(), _set_once, readable)
            try:
                await readable
            finally:
                self._loop.remove_reader(connection.fileno())

    async def _answer_for(self, reader: asyncio.StreamReader, task: asyncio.Task[None]) -> bytes:
        try:
            request = await _read_request(reader)
        except _BadRequest as bad:
            self._dropped(bad.reason)
            return _answer(bad.status, "text/plain", f"{bad.reason}\n".encode())
        self._waiting.pop(task, None)
        status, content_type, body, headers = await self._loop.run_in_executor(
            self._pool, self._respond, request.path, request.authorization)
        return self._answer_bytes(status, content_type, body, request.method == "GET", headers)

    def _respond(self, path: str, authorization: str | None) -> tuple[str, str, bytes, str]:
        """On an answer thread: the basic auth check (bcrypt) and the answer."""
        if not self._auth.allows(authorization):  # every path, as in the exporter toolkit
            return ("401 Unauthorized", "text/plain", b"Unauthorized\n",
                    self._headers + 'WWW-Authenticate: Basic realm="mpswatch"\r\n')
        try:
            return (*respond(path, self._exposition, self._status, self._healthy), self._headers)
        except Exception as err:  # a bug in an answer costs this answer, never the server
            self._log.error("http_answer_failed", path=path[:200], error=repr(err))
            return (*_INTERNAL_ERROR, self._headers)

    def _answer_bytes(self, status: str, content_type: str, body: bytes, with_body: bool, headers: str) -> bytes:
        """The answer, the same bytes object for every scrape of one body: a burst of scrapes shares
        one buffer instead of each holding a copy of the body."""
        if with_body and body is self._last_body:
            return self._last_answer
        data = _answer(status, content_type, body, with_body, headers)
        if with_body and status == "200 OK":
            self._last_body, self._last_answer = body, data
        return data

    def _evict_oldest_waiting(self) -> bool:
        if not self._waiting:
            return False
        oldest, _ = self._waiting.popitem(last=False)
        self._open.discard(oldest)
        oldest.cancel()
        self._dropped("evicted")
        return True

    def _dropped(self, reason: str) -> None:
        """Counts a connection closed without a normal answer; logs the counts at most once a minute
        (a slowloris attack must not become a flood of log lines)."""
        self._drops[reason] += 1
        now = time.monotonic()
        if now - self._drops_logged_at >= DROPS_LOG_INTERVAL_SECONDS:
            self._drops_logged_at = now
            self._log.warning("http_connections_dropped", **{f"{r}_total": n for r, n in sorted(self._drops.items())})

    def drops(self) -> dict[str, int]:
        """Connections dropped so far, by reason (deadline, evicted, over_capacity, bad requests, TLS)."""
        return dict(self._drops)

    async def _stop(self) -> None:
        self._acceptor.cancel()
        for task in list(self._open):
            task.cancel()
        await asyncio.gather(*self._open, return_exceptions=True)

    def shutdown(self) -> None:
        """Stops listening, closes every connection and the loop's thread; calling it again does nothing."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._pool.shutdown(wait=False)
        self._sock.close()

    server_close = shutdown


def _close(connection: socket.socket, _: object) -> None:
    connection.close()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def connection_cap() -> int:
    """MAX_CONNECTIONS, or fewer where the descriptor limit would not leave the collectors theirs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - DESCRIPTORS_KEPT_FOR_COLLECTORS))


def serve(listen: str, exposition: CachedBody, healthy: Callable[[], tuple[bool, str]],
          status: CachedBody | None = None, web: WebConfig | None = None, *,
          deadline_seconds: float = CONNECTION_DEADLINE_SECONDS, max_connections: int | None = None) -> MetricsServer:
    """Starts the HTTP server on a thread of its own; returns it (call shutdown() to stop). `web`:
    TLS, basic auth and headers from a web configuration file, on every path. Raises OSError when
    `listen` cannot be bound."""
    host, port = parse_listen(listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return MetricsServer(sock, exposition, status, healthy, web, deadline_seconds,
                         connection_cap() if max_connections is None else max_connections)
