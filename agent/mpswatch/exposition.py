"""A snapshot as Prometheus families: the agent's own, each collector unit's, then the derived ones."""

from __future__ import annotations

from prometheus_client.core import Metric

from mpswatch import derive
from mpswatch.metrics import Families
from mpswatch.snapshot import NodeSnapshot
from mpswatch.units import UNITS


def render(snapshot: NodeSnapshot, version: str) -> list[Metric]:
    out = Families()
    out.add("mps_exporter_build_info", [version], 1)
    for name, status in sorted(snapshot.statuses.items()):
        out.add("mps_exporter_collector_success", [name], 1 if status.success else 0)
        if status.duration_seconds is not None:
            out.add("mps_exporter_collector_duration_seconds", [name], status.duration_seconds)
        if status.last_success_time is not None:
            out.add("mps_exporter_collector_last_success_timestamp_seconds", [name], status.last_success_time)
        for reason, count in sorted(status.errors_total.items()):
            out.add("mps_exporter_collector_errors_total", [name, reason], count)
        if status.stale_after_seconds is not None:
            out.add("mps_exporter_collector_stale_after_seconds", [name], status.stale_after_seconds)
    for reason, count in sorted(snapshot.log_lines_dropped.items()):
        out.add("mps_exporter_log_lines_dropped_total", [reason], count)
    for unit in UNITS:
        data = getattr(snapshot, unit.name)
        if data is not None:
            unit.render(data, snapshot.derived, out)
    derive.render(snapshot.derived, out)
    return list(out)
