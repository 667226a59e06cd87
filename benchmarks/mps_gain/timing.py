"""Latency figures from raw times, and the interference proof's timetable; shared by the engine,
the harnesses and the reports without importing torch.

Exact figures: from every raw value (not from histogram buckets), percentiles by linear
interpolation between the two nearest ranks (numpy's default), so p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PHASE_KINDS = ("quiet", "burst", "idle")


def percentile(ordered: list[float], q: float) -> float:
    """The q-th quantile (0 <= q <= 1) of a sorted, non-empty list."""
    if not ordered:
        raise ValueError("no values")
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def figures(prefix: str, values: list[float]) -> dict[str, float | int | None]:
    """`{prefix}_p50_s`, `_p99_s`, `_mean_s` and `_n` of raw latencies in seconds; None when empty."""
    if not values:
        return {f"{prefix}_p50_s": None, f"{prefix}_p99_s": None, f"{prefix}_mean_s": None, f"{prefix}_n": 0}
    ordered = sorted(values)
    return {f"{prefix}_p50_s": percentile(ordered, 0.5), f"{prefix}_p99_s": percentile(ordered, 0.99),
            f"{prefix}_mean_s": sum(ordered) / len(ordered), f"{prefix}_n": len(ordered)}


@dataclass(frozen=True)
class Phase:
    """One phase of the interference timetable; start and end are seconds from its origin."""

    name: str  # quiet, burst1, idle1, burst2, ...
    kind: str  # quiet | burst | idle
    start: float
    end: float


def timetable(quiet_s: float, burst_s: float, idle_s: float, cycles: int) -> list[Phase]:
    """A quiet period (both engines steady, the agent's baseline), then `cycles` of burst and idle."""
    if quiet_s <= 0 or burst_s <= 0 or idle_s <= 0 or cycles < 1:
        raise ValueError("a timetable needs positive phases and at least one cycle")
    phases = [Phase("quiet", "quiet", 0.0, quiet_s)]
    at = quiet_s
    for cycle in range(1, cycles + 1):
        phases.append(Phase(f"burst{cycle}", "burst", at, at + burst_s))
        phases.append(Phase(f"idle{cycle}", "idle", at + burst_s, at + burst_s + idle_s))
        at += burst_s + idle_s
    return phases


def parse_timetable(text: str) -> list[Phase]:
    """`QUIET,BURST,IDLE,CYCLES` in seconds (cycles a whole number), e.g. `30,25,25,2`."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"not QUIET,BURST,IDLE,CYCLES: {text!r}")
    return timetable(float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3]))


def phase_at(phases: list[Phase], offset: float) -> Phase | None:
    """The phase `offset` seconds after the origin falls in; None before or after the timetable."""
    for phase in phases:
        if phase.start <= offset < phase.end:
            return phase
    return None
