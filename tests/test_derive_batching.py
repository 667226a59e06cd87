"""Issue 19: the agent derives the joined facts once for a cycle's publishes, not after each of them."""

from __future__ import annotations

import time

from mpswatch.scheduler import SnapshotStore
from mpswatch.snapshot import CollectorReport, CollectorStatus, DerivedFacts, NodeSnapshot, frozen_map

COLLECTORS = ("mps_control", "mps_logs", "gpu", "engines", "pods")


class CountingDerive:
    def __init__(self, fail_first: bool = False) -> None:
        self.calls = 0
        self.fail_first = fail_first

    def __call__(self, snapshot: NodeSnapshot) -> DerivedFacts:
        self.calls += 1
        if self.fail_first and self.calls == 1:
            raise RuntimeError("a derive bug")
        return DerivedFacts(engine_of_pid=frozen_map({len(snapshot.statuses): "seen"}))


def report(name: str) -> CollectorReport:
    return CollectorReport(CollectorStatus(name, True, 0.001, time.time(), frozen_map({})), None)


def wait_for_facts(store: SnapshotStore, published: int) -> float:
    started = time.monotonic()
    while store.current().derived.engine_of_pid.get(published) != "seen":
        assert time.monotonic() - started < 5.0, "facts never derived"
        time.sleep(0.005)
    return time.monotonic() - started


def test_a_cycles_five_publishes_are_derived_once_and_soon():
    derive = CountingDerive()
    store = SnapshotStore(derive=derive, derive_after_seconds=0.1)
    for name in COLLECTORS:
        store.publish(report(name))
    assert store.current().statuses.keys() == set(COLLECTORS)  # the data at once
    wait_for_facts(store, len(COLLECTORS))
    assert derive.calls == 1


def test_a_derive_that_fails_leaves_the_data_and_the_next_batch_is_derived():
    derive = CountingDerive(fail_first=True)
    store = SnapshotStore(derive=derive, derive_after_seconds=0.05)
    store.publish(report("gpu"))
    time.sleep(0.3)
    assert derive.calls == 1 and store.current().statuses.keys() == {"gpu"}
    store.publish(report("engines"))
    wait_for_facts(store, 2)


def test_settle_derives_what_is_waiting_at_once():
    derive = CountingDerive()
    store = SnapshotStore(derive=derive, derive_after_seconds=3600)
    store.publish(report("gpu"))
    store.publish(report("engines"))
    store.settle()
    assert store.current().derived.engine_of_pid == {2: "seen"} and derive.calls == 1
    store.settle()
    assert derive.calls == 1
