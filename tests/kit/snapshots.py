"""Snapshots built as the agent builds them: each collector's data published into a SnapshotStore,
so the derived facts are the derive step's, not a test's guess."""

from __future__ import annotations

from mpswatch.scheduler import SnapshotStore
from mpswatch.snapshot import CollectorReport, CollectorStatus, NodeSnapshot, frozen_map


def ok_status(name: str) -> CollectorStatus:
    return CollectorStatus(name, True, 0.01, 1.0, frozen_map())


def snapshot_of(**data: object) -> NodeSnapshot:
    """snapshot_of(gpu=GpuData(...), engines=EnginesData(...)): each published as a successful run."""
    store = SnapshotStore()
    for name, value in data.items():
        store.publish(CollectorReport(ok_status(name), value))
    return store.current()
