"""The vocabulary of `mpswatch status`: verdicts, the section each collector contributes, and the
wording shared by those sections. Composed into one report by mpswatch.analysis."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mpswatch.snapshot import LogEvent, PodIdentity

OK, DEGRADED, DOWN = "OK", "DEGRADED", "DOWN"
_RANK = {OK: 0, DEGRADED: 1, DOWN: 2}
RECENT_EVENTS_SHOWN = 10


@dataclass(frozen=True)
class StatusSection:
    """One collector's part of the report: lists of entries under the report's keys (`daemons`,
    `gpus`, ...), one problem (see `problem`) per thing that is not OK (the node's verdict is the
    worst of them), notes, the summary line if it writes it, and the figures it shows as `?` because
    they need two samples (rates, GPM: a one-shot `status` has one)."""

    entries: Mapping[str, list[dict[str, Any]]]
    problems: tuple[dict[str, Any], ...] = ()
    notes: tuple[str, ...] = ()
    summary: str | None = None
    needs_two_samples: tuple[str, ...] = ()


# the kinds of problem, in the order a report lists those of one verdict: the node's MPS before the
# agent's own failures, a thing before what follows from it (a server's fault before its blast radius)
PROBLEM_KINDS = ("mps", "daemon", "server", "fault", "gpu", "engine", "engine_gpu", "client", "collector")


def problem(verdict: str, kind: str, subject: str, reason: str) -> dict[str, Any]:
    """One line of the report's problems: `<verdict> <subject>: <reason>`."""
    return {"verdict": verdict, "kind": kind, "subject": subject, "reason": reason}


def rank(verdict: str) -> int:
    return _RANK[verdict]


def worst(verdicts: Iterable[str]) -> str:
    return max(verdicts, key=_RANK.__getitem__, default=OK)


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def percent(value: float | None) -> str:
    return "?" if value is None else f"{value * 100:.0f}%"


def count(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def iso_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def event_entry(log_dir: str, event: LogEvent, now: float) -> dict[str, Any]:
    return {
        "log_dir": log_dir,
        "event": event.event,
        "source": event.source,
        "time": iso_time(event.time),
        "age_seconds": round(now - event.time, 1),
        "server_pid": event.server_pid,
        "client_pid": event.client_pid,
        "detail": event.detail,
        "message": event.message,
    }



def pod_name(identity: PodIdentity | None) -> str | None:
    """`namespace/pod`, as status entries show it beside a PID or an engine; None when the process
    runs in no pod or its pod's name is unknown."""
    return identity.name if identity is not None else None


def in_pod(pod: str | None) -> str:
    """What follows a PID or an engine's name in a line of the report when its pod is known."""
    return f" (pod {pod})" if pod else ""
