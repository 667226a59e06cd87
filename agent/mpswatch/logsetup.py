"""structlog set-up: JSON lines for journald and containers, readable lines on a terminal.

Logging never takes collection down: a log line that cannot be written (a full disk, a closed
pipe, no stderr at all) is dropped and counted (`mps_exporter_log_lines_dropped_total`), never raised
into the thread that logged. The agent (`background=True`) hands its lines to a writer thread
through a bounded queue, so a stream that blocks (a pipe nobody reads, a stalled journald) holds
up only that thread: the lines past the queue's capacity are dropped and counted.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# why a line was lost: it could not be written, or the writer was that far behind
DROP_REASONS = ("write_failed", "backlog_full")
BACKLOG_LINES = 1000
EXIT_FLUSH_SECONDS = 2.0


class LineSink:
    """Where rendered lines go: straight to the stream's file descriptor (no buffer left holding
    a line that failed), or through a writer thread when `background`. Counts what it drops."""

    def __init__(self, stream: TextIO | None, background: bool) -> None:
        self._stream = stream
        self._fd = _fileno(stream)
        self._write_lock = threading.Lock()  # one line at a time, whole, when written by the caller
        self._count_lock = threading.Lock()
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._queue: queue.Queue[bytes | threading.Event] | None = None
        if background:
            self._queue = queue.Queue(maxsize=BACKLOG_LINES)
            threading.Thread(target=self._drain, name="log-writer", daemon=True).start()

    def put(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        if self._queue is None:
            with self._write_lock:
                self._write(data)
            return
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            self._count("backlog_full")

    def dropped(self) -> dict[str, int]:
        with self._count_lock:
            return dict(self._dropped)

    def flush(self, timeout_seconds: float) -> None:
        """Waits, at most `timeout_seconds`, until the lines queued so far are written (or dropped)."""
        if self._queue is None:
            return
        deadline = time.monotonic() + timeout_seconds
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_seconds)
        except queue.Full:
            return
        done.wait(max(0.0, deadline - time.monotonic()))

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._write(item)

    def _write(self, data: bytes) -> None:
        try:
            if self._fd is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            elif self._stream is not None:
                self._stream.write(data.decode("utf-8"))
                self._stream.flush()
            else:
                raise OSError("no stream to log to")
        except (OSError, ValueError):  # ValueError: a closed file object
            self._count("write_failed")

    def _count(self, reason: str) -> None:
        with self._count_lock:
            self._dropped[reason] += 1


def _fileno(stream: TextIO | None) -> int | None:
    """The descriptor of a real file or pipe; None for an in-memory stream (tests)."""
    if stream is None:
        return None
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None
    try:
        stream.flush()  # what was written through the stream before goes out first
    except (OSError, ValueError):
        pass
    return fd


class _SinkLogger:
    """A structlog logger (PrintLogger's methods) that hands each rendered line to a LineSink."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.put(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_sink: LineSink | None = None


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
                      background: bool = False) -> None:
    """`stream` defaults to stderr (None when the agent was started with it closed)."""
    global _sink
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and _isatty(stream))
    renderer = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer()
    if _sink is not None:
        _sink.flush(EXIT_FLUSH_SECONDS)
    sink = _sink = LineSink(stream, background)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: _SinkLogger(sink),
        cache_logger_on_first_use=False,
    )
    if background:
        atexit.register(sink.flush, EXIT_FLUSH_SECONDS)


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


def lines_dropped() -> Mapping[str, int]:
    """Log lines lost so far by reason (every reason, from 0); empty before logging is configured."""
    return _sink.dropped() if _sink is not None else {}


def flush_logs(timeout_seconds: float = EXIT_FLUSH_SECONDS) -> None:
    """Before the process image is replaced (a reload): what is queued is written first."""
    if _sink is not None:
        _sink.flush(timeout_seconds)
