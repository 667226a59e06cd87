"""Collector loops: deadlines, one call in flight, stale data dropped, recovery."""

from __future__ import annotations

import threading
import time

from mpswatch.collectors import CollectorError
from mpswatch.scheduler import CollectorLoop, Scheduler, SnapshotStore
from mpswatch.snapshot import DerivedFacts


def store() -> SnapshotStore:
    """A store for stand-in data, which the derive step would not know how to join."""
    return SnapshotStore(derive=lambda snapshot: DerivedFacts())


class Blocking:
    name = "gpu"
    interval_seconds = 0.05
    deadline_seconds = 0.2

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0
        self.block = True

    def collect(self):
        self.calls += 1
        if self.block:
            self.release.wait()
        return {"value": self.calls}


def test_a_call_past_its_deadline_fails_the_collector_and_drops_its_data():
    collector = Blocking()
    store = SnapshotStore(derive=lambda snapshot: DerivedFacts())
    loop = CollectorLoop(collector, store)
    collector.block = False
    assert loop.cycle().data == {"value": 1}
    collector.block = True
    started = time.monotonic()
    report = loop.cycle()
    assert time.monotonic() - started < 1.0
    assert not report.status.success and report.status.error_reason == "timeout"
    assert report.data is None and store.current().gpu is None
    assert report.status.last_success_time is not None


def test_no_second_call_starts_while_one_is_stuck_and_it_recovers_when_it_returns():
    collector = Blocking()
    loop = CollectorLoop(collector, store())
    loop.cycle()
    report = loop.cycle()
    assert collector.calls == 1 and "still in progress" in report.status.error_detail
    assert report.status.errors_total == {"timeout": 2, "internal_error": 0, "stale": 0}
    collector.block = False
    collector.release.set()
    time.sleep(0.05)
    report = loop.cycle()
    assert report.status.success and report.data == {"value": 2}


def test_collector_errors_and_crashes_are_counted_by_reason():
    class Failing:
        name, interval_seconds, deadline_seconds = "mps_logs", 0.1, 1.0
        crash = False

        def collect(self):
            if self.crash:
                raise RuntimeError("bug")
            raise CollectorError("exec_failed", "no binary")

    collector = Failing()
    loop = CollectorLoop(collector, store())
    assert loop.cycle().status.error_reason == "exec_failed"
    collector.crash = True
    report = loop.cycle()
    assert report.status.error_reason == "internal_error"
    assert report.status.errors_total == {"exec_failed": 1, "internal_error": 1, "timeout": 0, "stale": 0}


def test_the_loop_stays_alive_while_its_collector_is_stuck():
    collector = Blocking()
    scheduler = Scheduler([collector], store())
    scheduler.start()
    try:
        time.sleep(0.8)
        alive, detail = scheduler.alive()
        assert alive, detail
        assert scheduler.store.current().statuses["gpu"].error_reason == "timeout"
    finally:
        collector.release.set()
        scheduler.stop()


def test_a_collector_without_a_snapshot_field_is_refused_when_its_loop_is_made():
    class Unregistered(Blocking):
        name = "nowhere"

    try:
        CollectorLoop(Unregistered(), store())
    except ValueError as err:
        assert "nowhere" in str(err)
    else:
        raise AssertionError("a collector with no NodeSnapshot field was accepted")


def test_a_loop_that_stops_publishing_turns_its_success_to_stale_and_the_agent_unhealthy():
    """The loop's own thread stuck outside its collector (as one blocked writing a log line was):
    its last success must not stand, its data must go, and /healthz must say so."""
    collector = Blocking()
    collector.block = False
    scheduler = Scheduler([collector], store())
    scheduler.start()
    frozen = threading.Event()
    try:
        deadline = time.monotonic() + 5
        while not (scheduler.store.current().statuses.get("gpu") and scheduler.store.current().statuses["gpu"].success):
            assert time.monotonic() < deadline, "the collector never succeeded"
            time.sleep(0.02)
        scheduler.loops[0].cycle = frozen.wait  # every later cycle blocks; nothing is published
        deadline = time.monotonic() + 8  # stale after 2 x (0.05 + 0.2) + 1 s, the watcher looks every 0.5 s
        while scheduler.store.current().statuses["gpu"].success:
            assert time.monotonic() < deadline, "a loop that stopped publishing still claims success"
            time.sleep(0.05)
        status = scheduler.store.current().statuses["gpu"]
        assert status.error_reason == "stale" and status.errors_total["stale"] == 1
        assert scheduler.store.current().gpu is None  # stale data is not served as fresh
        alive, detail = scheduler.alive()
        assert not alive and "gpu" in detail
        time.sleep(1.0)
        assert scheduler.store.current().statuses["gpu"].errors_total["stale"] == 1  # once per silence
    finally:
        frozen.set()
        scheduler.stop()
