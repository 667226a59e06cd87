"""HTTP GETs of engines' metrics: a deadline on the whole answer, a cap on the body, and at most one
request in flight per URL, each on a daemon thread (a stuck request must never hold up exit)."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from mpswatch.engine_kinds import BadMetrics

T = TypeVar("T")
Fetch = Callable[[str, float, int], bytes]


def fetch_metrics(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET with a deadline on the whole answer, not on each read: a server that trickles a byte
    at a time must not hold the request open for ever."""
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    try:
        path = parts.path or "/"
        connection.request("GET", path + (f"?{parts.query}" if parts.query else ""), headers={"Accept": "text/plain"})
        sock = connection.sock  # getresponse() lets go of it when the server closes after the body
        response = connection.getresponse()
        if response.status != 200:
            raise BadMetrics(f"HTTP {response.status} {response.reason}")
        body = bytearray()
        while not response.isclosed():  # closed once a body of known length is all read
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s")
            try:
                sock.settimeout(left)
            except OSError:
                pass  # the socket went with the finished answer; read1 says what is left
            chunk = response.read1(65536)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise BadMetrics(f"body larger than {max_bytes} bytes")
        return bytes(body)
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    finally:
        connection.close()


@dataclass
class Pending(Generic[T]):
    """One request in flight and, once `done` is set, its parsed answer or why there is none."""

    done: threading.Event = field(default_factory=threading.Event)
    value: T | None = None
    error: str | None = None
    fetched_at: float = 0.0  # time.monotonic() when the body had arrived


class BackgroundFetcher(Generic[T]):
    """Starts each GET on its own daemon thread and parses the body there; a URL whose last request
    is still in flight is not asked again until it ends."""

    def __init__(self, parse: Callable[[str], T], timeout_seconds: float, max_body_bytes: int,
                 fetch: Fetch = fetch_metrics) -> None:
        self._parse = parse
        self._timeout = timeout_seconds
        self._max_body = max_body_bytes
        self._fetch = fetch
        self._pending: dict[str, Pending[T]] = {}

    def start(self, url: str) -> Pending[T]:
        pending = self._pending.get(url)
        if pending is not None and not pending.done.is_set():
            return pending
        pending = self._pending[url] = Pending()
        threading.Thread(target=self.run, args=(url, pending), name="engine-scrape", daemon=True).start()
        return pending

    def run(self, url: str, pending: Pending[T]) -> None:
        try:
            body = self._fetch(url, self._timeout, self._max_body)
            pending.fetched_at = time.monotonic()
            pending.value = self._parse(body.decode("utf-8", "replace"))
        except Exception as err:  # down, refused, HTTP error, too big, too slow, garbage
            pending.error = str(err)[:200] or type(err).__name__
        finally:
            pending.done.set()

    def forget(self, urls_kept: set[str]) -> None:
        """Drops what is kept for URLs no engine uses any more."""
        for url in set(self._pending) - urls_kept:
            del self._pending[url]
