"""The agent's own `process_*` figures: read in the process collector's cycle from a /proc (here a
fixture tree), rendered from its data; a /proc it cannot read is a failed run, not a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpswatch.collectors import CollectorError
from mpswatch.collectors.process import PROCESS_METRICS, ProcessCollector, render
from mpswatch.metrics import Families
from mpswatch.snapshot import DerivedFacts

# /proc/self/stat: after "(comm)", state is field 0, utime and stime 11 and 12, starttime, vsize and rss 19 to 21
STAT = "4242 (mpswatch) S " + " ".join(
    {13: "250", 14: "50", 21: "1000", 22: "8192000", 23: "2000"}.get(i, "0") for i in range(3, 50)
)
LIMITS = (
    "Limit                     Soft Limit           Hard Limit           Units\n"
    "Max open files            1024                 4096                 files\n"
)


def fake_proc(root: Path, limits: str = LIMITS) -> str:
    (root / "self" / "fd").mkdir(parents=True)
    (root / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    (root / "self" / "stat").write_text(STAT + "\n")
    (root / "self" / "limits").write_text(limits)
    for fd in range(3):
        (root / "self" / "fd" / str(fd)).touch()
    return str(root)


def rendered(data) -> dict[str, float]:
    out = Families()
    render(data, DerivedFacts(), out)
    return {s.name: s.value for family in out for s in family.samples}


def test_the_agents_own_process_figures_are_read_in_the_cycle_and_rendered(tmp_path):
    values = rendered(ProcessCollector(fake_proc(tmp_path)).collect())
    assert set(values) == set(PROCESS_METRICS)
    ticks = values["process_start_time_seconds"] - 1700000000
    assert ticks > 0 and values["process_cpu_seconds_total"] == pytest.approx(ticks * 300 / 1000)
    assert values["process_open_fds"] == 3 and values["process_max_fds"] == 1024
    assert values["process_virtual_memory_bytes"] == 8192000


def test_a_limit_it_cannot_parse_is_a_failed_run(tmp_path):
    root = fake_proc(tmp_path, LIMITS.replace("1024 ", "unlimited "))
    with pytest.raises(CollectorError) as failed:
        ProcessCollector(root).collect()
    assert failed.value.reason == "unreadable"


def test_no_proc_is_a_failed_run(tmp_path):
    with pytest.raises(CollectorError):
        ProcessCollector(str(tmp_path / "absent")).collect()
