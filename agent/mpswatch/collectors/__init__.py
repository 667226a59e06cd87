"""Collectors: each a thin I/O shell around pure parsers, run off the scrape path by the scheduler."""

from __future__ import annotations

from typing import Protocol


class CollectorError(Exception):
    """A failed run; `reason` is a short, bounded label value (timeout, exec_failed, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Collector(Protocol):
    name: str
    interval_seconds: float
    deadline_seconds: float

    def collect(self) -> object:
        """Returns this run's immutable data, or raises CollectorError."""
        ...
