"""The agent's own process: CPU time, memory, file descriptors and start time, as node_exporter and
dcgm-exporter export them (`process_*`). Read by prometheus_client's ProcessCollector logic, but in
this collector's cycle, so that a scrape renders them from the snapshot and does no I/O."""

from __future__ import annotations

from prometheus_client.process_collector import ProcessCollector as _ProcSelfReader

from mpswatch.collectors import CollectorError, CollectorUnit
from mpswatch.metrics import Families
from mpswatch.snapshot import DerivedFacts, ProcessData, frozen_map
from mpswatch.verdicts import StatusSection

# The figures change slowly and cost a few small /proc reads: no setting of their own.
PROCESS_INTERVAL_SECONDS = 5.0

# ProcessCollector's family names, which are ours too: rendered as read, in this order.
PROCESS_METRICS = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
)


class ProcessCollector:
    name = "process"
    interval_seconds = PROCESS_INTERVAL_SECONDS
    deadline_seconds = 2.0

    def __init__(self, proc_root: str = "/proc") -> None:
        # the agent's own /proc, not the configured proc_root (which can be the host's, mounted)
        self._reader = _ProcSelfReader(proc=proc_root, registry=None)

    def collect(self) -> ProcessData:
        try:
            families = list(self._reader.collect())
        except (OSError, ValueError) as err:  # e.g. a `limits` line it cannot parse
            raise CollectorError("unreadable", f"cannot read the agent's own /proc entries: {err}") from None
        values: dict[str, float] = {}
        for family in families:
            for sample in family.samples:
                if sample.name in PROCESS_METRICS:
                    values[sample.name] = sample.value
        if not values:
            raise CollectorError("unreadable", "the agent's own /proc entries gave none of the process figures")
        return ProcessData(frozen_map(values))


def render(data: ProcessData, facts: DerivedFacts, out: Families) -> None:
    for name in PROCESS_METRICS:
        if name in data.values:
            out.add(name, [], data.values[name])


def status(data: ProcessData, facts: DerivedFacts, now: float) -> StatusSection:
    """Nothing: the agent's own process is not MPS's state (`process_*` are for dashboards)."""
    return StatusSection({})


UNIT = CollectorUnit("process", render, status)
