"""What starting left behind is given back once every collector has published (mpswatch.startmemory)."""

from __future__ import annotations

import threading

from mpswatch import startmemory
from mpswatch.snapshot import NodeSnapshot


def test_release_collects_and_trims():
    result = startmemory.release()
    assert result["malloc_trim"] is True  # glibc, as on every node the agent ships for
    assert result["rss_kib_before"] and result["rss_kib_after"]


def test_released_only_once_every_collector_has_published(monkeypatch):
    released = threading.Event()
    monkeypatch.setattr(startmemory, "release", lambda: released.set() or {})
    monkeypatch.setattr(startmemory, "POLL_SECONDS", 0.01)
    snapshot = NodeSnapshot()
    stop = threading.Event()
    startmemory.release_after_first_cycles(lambda: snapshot, ["gpu", "engines"], stop)
    assert not released.wait(0.2)
    snapshot = NodeSnapshot(statuses={"gpu": object(), "engines": object()})
    assert released.wait(5)


def test_a_stop_before_the_first_cycles_releases_nothing(monkeypatch):
    released = threading.Event()
    monkeypatch.setattr(startmemory, "release", lambda: released.set() or {})
    monkeypatch.setattr(startmemory, "POLL_SECONDS", 0.01)
    stop = threading.Event()
    stop.set()
    startmemory.release_after_first_cycles(NodeSnapshot, ["gpu"], stop)
    assert not released.wait(0.2)
