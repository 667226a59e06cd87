"""Runs each collector on its own loop with a deadline and publishes immutable snapshots, each with
the facts derived from the latest data of every collector.

A collector call that overruns its deadline cannot always be killed (NVML calls are
in-process), so it is left to finish on its worker thread while the collector is reported
failed with reason `timeout`; no second call is started until the stuck one returns.

A loop that stops publishing altogether (its thread dead or stuck outside the collector) must not
leave its last success standing: past `stale_after_seconds` without a publish, a watcher thread
publishes the collector failed with reason `stale`, its data dropped, and /healthz turns unhealthy.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from mpswatch.collectors import Collector, CollectorError
from mpswatch.derive import Deriver
from mpswatch.snapshot import CollectorReport, CollectorStatus, DerivedFacts, NodeSnapshot, frozen_map

SNAPSHOT_FIELDS = frozenset(f.name for f in dataclasses.fields(NodeSnapshot)) - {"statuses", "derived", "log_lines_dropped"}
WATCH_PERIOD_SECONDS = 0.5


class SnapshotStore:
    """Copy-on-write holder: readers take the current snapshot reference without locking. Each
    publish puts one collector's report in its field and derives the joined facts again: at once, or,
    with `derive_after_seconds`, once for every publish of that window (a cycle's collectors publish
    within a few tens of milliseconds of each other), on a thread of its own; until then the snapshot
    carries the facts derived before, older than its data by at most the window and a derive."""

    def __init__(
        self,
        derive: Callable[[NodeSnapshot], DerivedFacts] | None = None,
        log_lines_dropped: Callable[[], Mapping[str, int]] | None = None,
        derive_after_seconds: float = 0.0,
    ) -> None:
        self._lock = threading.Lock()
        self._derive = derive or Deriver()
        self._log_lines_dropped = log_lines_dropped or frozen_map
        self._snapshot = NodeSnapshot()
        self._derive_after = derive_after_seconds
        self._underived = False  # under _lock: a publish since the last derive
        self._published = threading.Event()
        if derive_after_seconds > 0:
            threading.Thread(target=self._derive_batches, name="derive", daemon=True).start()

    def current(self) -> NodeSnapshot:
        return self._snapshot

    def publish(self, report: CollectorReport) -> None:
        name = report.status.name
        with self._lock:
            statuses = {**self._snapshot.statuses, name: report.status}
            changed: dict[str, Any] = {
                "statuses": frozen_map(statuses),
                name: report.data,
                "log_lines_dropped": frozen_map(self._log_lines_dropped()),
            }
            snapshot = dataclasses.replace(self._snapshot, **changed)
            if self._derive_after > 0:
                self._snapshot, self._underived = snapshot, True
                self._published.set()
            else:
                self._snapshot = dataclasses.replace(snapshot, derived=self._derive(snapshot))

    def settle(self) -> None:
        """Derives now what was published since the last derive, if anything was."""
        with self._lock:
            if self._underived:
                self._underived = False
                self._snapshot = dataclasses.replace(self._snapshot, derived=self._derive(self._snapshot))

    def _derive_batches(self) -> None:
        """The first publish of a batch starts the window; every publish within it is derived at once."""
        log = structlog.get_logger()
        while True:
            self._published.wait()
            time.sleep(self._derive_after)
            self._published.clear()
            try:
                self.settle()
            except Exception as err:  # a derive bug: the data stays published, the facts are those derived before
                log.error("derive_failed", error=repr(err), exc_info=err)


class CollectorLoop:
    def __init__(self, collector: Collector[Any], store: SnapshotStore, clock: Callable[[], float] = time.time) -> None:
        if collector.name not in SNAPSHOT_FIELDS:
            raise ValueError(f"collector {collector.name!r} has no NodeSnapshot field to publish into")
        self.collector = collector
        self._store = store
        self._clock = clock
        self._jobs: queue.Queue[int] = queue.Queue(maxsize=1)
        self._results: queue.Queue[tuple[int, object | BaseException, float]] = queue.Queue()
        self._generation = 0
        self._busy_since: float | None = None
        # known reasons start at 0, so that the first failure is an increase Prometheus can see
        self._errors: dict[str, int] = {"timeout": 0, "internal_error": 0, "stale": 0}
        self._last_success: float | None = None
        self._last_failure: str | None = None  # logged once per change, not once per cycle
        # a healthy loop publishes at least every interval + deadline; twice that, and a second more
        # for a busy machine, without a publish means the loop itself is stuck or gone
        self.stale_after_seconds = 2 * (collector.interval_seconds + collector.deadline_seconds) + 1.0
        self.published_at = time.monotonic()
        self._stale_reported = False
        self._publish_lock = threading.RLock()  # the loop's and the watcher's reports, one at a time
        self._worker = threading.Thread(target=self._work, name=f"collect-{collector.name}", daemon=True)
        self._worker.start()
        self._log = structlog.get_logger().bind(collector=collector.name)

    def _work(self) -> None:
        while True:
            generation = self._jobs.get()
            started = time.monotonic()
            try:
                outcome: object | BaseException = self.collector.collect()
            except BaseException as err:  # reported as a failed run, never kills the worker
                outcome = err
            self._results.put((generation, outcome, time.monotonic() - started))

    def cycle(self) -> CollectorReport:
        """One run with the collector's deadline; publishes and returns its report."""
        self._drain_late_results()
        if self._busy_since is not None:
            stuck_for = time.monotonic() - self._busy_since
            report = self._failure("timeout", f"previous run still in progress after {stuck_for:.1f} s", None)
        else:
            self._generation += 1
            self._busy_since = time.monotonic()
            self._jobs.put(self._generation)
            report = self._await(self._generation)
        with self._publish_lock:
            self._store.publish(report)
            self.published_at = time.monotonic()
            self._stale_reported = False
        return report

    def publish_if_stale(self) -> bool:
        """Publishes the collector failed (`stale`, its data dropped) once per silence longer than
        stale_after_seconds; True when it did."""
        with self._publish_lock:
            silent_for = time.monotonic() - self.published_at
            if self._stale_reported or silent_for <= self.stale_after_seconds:
                return False
            self._store.publish(self._failure("stale", f"no run finished for {silent_for:.1f} s", None))
            self._stale_reported = True
            return True

    def _drain_late_results(self) -> None:
        """A run reported as timed out may have returned since; its result is stale, but the
        worker is free again."""
        while True:
            try:
                generation, _, _ = self._results.get_nowait()
            except queue.Empty:
                return
            if generation == self._generation:
                self._busy_since = None

    def _await(self, generation: int) -> CollectorReport:
        deadline = self._busy_since + self.collector.deadline_seconds  # type: ignore[operator]
        while True:
            try:
                done, outcome, duration = self._results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return self._failure(
                    "timeout", f"no result within the {self.collector.deadline_seconds:g} s deadline", None
                )
            self._busy_since = None
            if done != generation:
                continue  # a late result of a run already reported as timed out
            if isinstance(outcome, CollectorError):
                return self._failure(outcome.reason, outcome.detail, duration)
            if isinstance(outcome, BaseException):
                self._log.error("collector_crashed", error=repr(outcome), exc_info=outcome)
                return self._failure("internal_error", repr(outcome), duration)
            if self._last_failure is not None:
                self._log.info("collector_recovered")
            self._last_failure = None
            self._last_success = self._clock()
            return self._report(outcome, duration)

    def _failure(self, reason: str, detail: str, duration: float | None) -> CollectorReport:
        with self._publish_lock:
            if reason != self._last_failure:
                self._log.warning("collector_failed", reason=reason, detail=detail)
            self._errors[reason] = self._errors.get(reason, 0) + 1
            self._last_failure = reason
            return self._report(None, duration, reason, detail)  # no stale data is ever served as fresh

    def _report(
        self, data: object | None, duration: float | None, reason: str | None = None, detail: str | None = None
    ) -> CollectorReport:
        with self._publish_lock:
            status = CollectorStatus(
                name=self.collector.name,
                success=reason is None,
                duration_seconds=duration,
                last_success_time=self._last_success,
                errors_total=frozen_map(self._errors),
                error_reason=reason,
                error_detail=detail,
                stale_after_seconds=self.stale_after_seconds,
            )
        return CollectorReport(status=status, data=data)

    def run_forever(self, stop: threading.Event) -> None:
        next_run = time.monotonic()
        while not stop.is_set():
            try:
                self.cycle()
            except Exception as err:  # a publish that failed (a derive bug): the next cycle tries again
                self._log.error("collector_publish_failed", error=repr(err), exc_info=err)
            next_run += self.collector.interval_seconds
            now = time.monotonic()
            if next_run < now:  # overran: skip the missed ticks instead of bursting
                next_run = now
            stop.wait(next_run - now)


class Scheduler:
    def __init__(self, collectors: Iterable[Collector[Any]], store: SnapshotStore) -> None:
        self.store = store
        self.loops = [CollectorLoop(c, store) for c in collectors]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for loop in self.loops:
            thread = threading.Thread(
                target=loop.run_forever, args=(self._stop,), name=f"loop-{loop.collector.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._watch, name="watch-staleness", daemon=True).start()

    def _watch(self) -> None:
        """Turns a loop's silence into a visible failure (success 0, reason `stale`)."""
        log = structlog.get_logger()
        while not self._stop.wait(WATCH_PERIOD_SECONDS):
            for loop in self.loops:
                try:
                    loop.publish_if_stale()
                except Exception as err:  # the same derive bug that silenced the loop
                    log.error("collector_stale_publish_failed", collector=loop.collector.name, error=repr(err))

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> NodeSnapshot:
        """Every collector once, in parallel, each bounded by its deadline; the snapshot's derived
        facts join what they all found."""
        threads = [threading.Thread(target=loop.cycle, daemon=True) for loop in self.loops]
        for thread in threads:
            thread.start()
        for thread, loop in zip(threads, self.loops):
            thread.join(loop.collector.deadline_seconds + 1.0)
        self.store.settle()
        return self.store.current()

    def alive(self) -> tuple[bool, str]:
        """The loops themselves, not what they found: a hung GPU must not make the agent look dead."""
        now = time.monotonic()
        for thread, loop in zip(self._threads, self.loops):
            if not thread.is_alive():
                return False, f"collection loop {loop.collector.name} has exited"
            if now - loop.published_at > loop.stale_after_seconds:
                return False, f"collection loop {loop.collector.name} has published nothing for {now - loop.published_at:.0f} s"
        return True, "collection loops alive"
