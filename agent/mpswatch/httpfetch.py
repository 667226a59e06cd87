"""HTTP GETs of engines' metrics, safe against hostile engines: one deadline on the whole exchange
(connect, headers, body), caps on the headers and the body, no redirects, no compression, basic
auth from the URL's userinfo (never shown: redact_url), and a few worker threads shared by every
engine, at most one request in flight per URL (a stuck request must never hold up exit)."""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from mpswatch.engine_kinds import BadMetrics

T = TypeVar("T")
Fetch = Callable[[str, float, int], bytes]

MAX_HEADER_BYTES = 64 << 10  # the status line and every header together; vLLM sends a few hundred bytes
MAX_CONCURRENT_FETCHES = 8


def redact_url(url: str) -> str:
    """The URL without its userinfo (`user:password@`): what is shown, exported and logged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _credentials(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return None
    return unquote(parts.username or ""), unquote(parts.password or "")


def scrub(text: str, url: str) -> str:
    """`text` without the URL's user name and password, raw or percent-decoded (error messages)."""
    parts = urlsplit(url)
    for secret in (parts.username, parts.password):
        if secret:
            text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text


class _DeadlineReader(io.RawIOBase):
    """The socket as a file whose every read ends at the exchange's deadline and within a byte budget
    (the headers' cap until they are read; lifted for the body, which is capped as it is decoded)."""

    def __init__(self, sock: socket.socket, deadline: float, budget: int | None) -> None:
        self._sock = sock
        self._io = sock.makefile("rb", buffering=0)  # the socket stays open until this is closed
        self.deadline = deadline
        self.budget = budget
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        view = memoryview(buffer).cast("B")
        if self.budget is not None:
            if self.total >= self.budget:
                raise BadMetrics(f"headers larger than {MAX_HEADER_BYTES} bytes")
            view = view[: self.budget - self.total]
        self._sock.settimeout(left)
        count = self._io.readinto(view) or 0
        self.total += count
        return count

    def close(self) -> None:
        self._io.close()
        super().close()


class _SocketView:
    """What http.client.HTTPResponse takes as its socket: it only asks it for a file."""

    def __init__(self, reader: _DeadlineReader) -> None:
        self._reader = reader

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self._reader, 16384)


def fetch_metrics(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET with a deadline on the whole exchange, not on each read: a server that trickles a byte at
    a time, in its headers or its body, must not hold the request open for ever; nor may its answer
    hold more than MAX_HEADER_BYTES of headers and `max_bytes` of body."""
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    headers = {"Accept": "text/plain", "Accept-Encoding": "identity"}
    credentials = _credentials(url)
    if credentials is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode("ascii")
    reader = None
    try:
        connection.connect()
        reader = _DeadlineReader(connection.sock, deadline, MAX_HEADER_BYTES)
        connection.response_class = lambda _sock, **kw: http.client.HTTPResponse(_SocketView(reader), **kw)  # type: ignore[assignment,arg-type]
        connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=headers)
        response = connection.getresponse()
        reader.budget = None
        if response.status != 200:
            followed = ": redirects are not followed" if 300 <= response.status < 400 else ""
            raise BadMetrics(f"HTTP {response.status} {response.reason}{followed}"[:200])
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise BadMetrics(f"Content-Encoding {encoding[:40]} not asked for")
        if response.length is not None and response.length > max_bytes:
            raise BadMetrics(f"body larger than {max_bytes} bytes ({response.length} announced)")
        chunks, size = [], 0
        while response.length != 0 and (chunk := response.read1(65536)):  # None: chunked or until closed
            size += len(chunk)
            if size > max_bytes:
                raise BadMetrics(f"body larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    except http.client.HTTPException as err:  # LineTooLong, too many headers, bad status line, bad chunks
        raise BadMetrics(f"not an HTTP answer: {type(err).__name__} {err}"[:200]) from None
    finally:
        connection.close()
        if reader is not None:  # it holds the socket open (an answer given up on before its end)
            reader.close()


@dataclass
class Pending(Generic[T]):
    """One request in flight and, once `done` is set, its parsed answer or why there is none."""

    done: threading.Event = field(default_factory=threading.Event)
    value: T | None = None
    error: str | None = None
    fetched_at: float = 0.0  # time.monotonic() when the body had arrived
    deadline: float = 0.0  # time.monotonic() by which it ends, counted from when it was asked for
    parse: Callable[[str], T] | None = None  # how its body is read, where not the fetcher's own


class BackgroundFetcher(Generic[T]):
    """Runs each GET, and parses its body, on one of at most `max_workers` daemon threads shared by
    every URL; a URL whose last request is still queued or in flight is not asked again until it
    ends. The deadline counts from when the request is asked for, queued or not, so every request
    of a cycle is over when the cycle's wait is; and URLs whose last request failed wait behind the
    others: hostile engines cannot keep the workers from one that answers."""

    def __init__(self, parse: Callable[[str], T], timeout_seconds: float, max_body_bytes: int,
                 fetch: Fetch = fetch_metrics, max_workers: int = MAX_CONCURRENT_FETCHES) -> None:
        self._parse = parse
        self._timeout = timeout_seconds
        self._max_body = max_body_bytes
        self._fetch = fetch
        self._max_workers = max_workers
        self._pending: dict[str, Pending[T]] = {}
        self._failed: set[str] = set()  # URLs whose last request failed
        self._queue: queue.PriorityQueue[tuple[bool, int, str, Pending[T]]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._workers = 0
        self._idle = 0
        self._lock = threading.Lock()

    def start(self, url: str, parse: Callable[[str], T] | None = None) -> Pending[T]:
        pending = self._pending.get(url)
        if pending is not None and not pending.done.is_set():
            return pending
        pending = self._pending[url] = Pending(deadline=time.monotonic() + self._timeout, parse=parse)
        with self._lock:
            self._queue.put((url in self._failed, next(self._order), url, pending))
            if self._queue.qsize() > self._idle and self._workers < self._max_workers:
                self._workers += 1
                self._idle += 1
                threading.Thread(target=self._work, name="engine-scrape", daemon=True).start()
        return pending

    def _work(self) -> None:
        while True:
            _, _, url, pending = self._queue.get()
            with self._lock:
                self._idle -= 1
            try:
                self.run(url, pending)
            finally:
                with self._lock:
                    self._idle += 1

    def run(self, url: str, pending: Pending[T]) -> None:
        try:
            left = pending.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("waited for a free worker")
            body = self._fetch(url, left, self._max_body)
            pending.fetched_at = time.monotonic()
            pending.value = (pending.parse or self._parse)(body.decode("utf-8", "replace"))
            with self._lock:
                self._failed.discard(url)
        except Exception as err:  # down, refused, HTTP error, too big, too slow, garbage
            timed_out = isinstance(err, TimeoutError)
            pending.error = f"no answer within {self._timeout:g} s" if timed_out else \
                scrub(str(err), url)[:200] or type(err).__name__
            with self._lock:
                self._failed.add(url)
        finally:
            pending.done.set()

    def forget(self, urls_kept: set[str]) -> None:
        """Drops what is kept for URLs no engine uses any more."""
        for url in set(self._pending) - urls_kept:
            del self._pending[url]
        with self._lock:
            self._failed &= urls_kept
