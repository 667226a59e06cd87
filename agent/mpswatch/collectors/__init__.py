"""Collectors: each a thin I/O shell around pure parsers, run off the scrape path by the scheduler.

A collector module is a whole unit: its collector (`collect()` returns the typed data that fills the
snapshot field of the same name), the metric families it renders from that data, and its section of
`mpswatch status`, exported as `UNIT` and registered in mpswatch.units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from mpswatch.metrics import Families
from mpswatch.snapshot import DerivedFacts
from mpswatch.verdicts import StatusSection

DataT = TypeVar("DataT")
DataT_co = TypeVar("DataT_co", covariant=True)


class CollectorError(Exception):
    """A failed run; `reason` is a short, bounded label value (timeout, exec_failed, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Collector(Protocol[DataT_co]):
    name: str
    interval_seconds: float
    deadline_seconds: float

    def collect(self) -> DataT_co:
        """Returns this run's immutable data, or raises CollectorError."""
        ...


@dataclass(frozen=True)
class CollectorUnit(Generic[DataT]):
    """What the rest of the agent knows of a collector besides running it: how its data renders as
    metrics and as status entries. Both read only its own data and the derived facts."""

    name: str  # the collector's name and its NodeSnapshot field
    render: Callable[[DataT, DerivedFacts, Families], None]
    status: Callable[[DataT, DerivedFacts, float], StatusSection]
