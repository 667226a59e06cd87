"""An engine's latency over a window, from two of its cumulative histograms: p50 and p99 as PromQL's
`histogram_quantile` gives them over the histograms' increase, and the mean (Δsum/Δcount).

Pure: no clock, no I/O. `LatencyWindow` keeps one engine's recent histograms (what its collector
owns); `quantile` is Prometheus's own algorithm (promql/quantile.go, bucketQuantile), so that the
agent's figures are those a dashboard computes from the engine's own series.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mpswatch.engine_kinds import Histogram

QUANTILES = (0.5, 0.99)
DEFAULT_WINDOW_SECONDS = 60.0
MAX_SAMPLES_KEPT = 4096  # a window of samples is bounded by the scrape interval; this bounds it whatever they are
MAX_BUCKETS = 256  # vLLM's largest layout has 23; a hostile engine's thousands would be kept by every sample


@dataclass(frozen=True)
class LatencyFigures:
    """One latency over a window, in seconds; None where unknown (no observation in the window)."""

    quantiles: Mapping[float, float]  # by QUANTILES; absent: unknown
    mean: float | None


def increase(before: Histogram, after: Histogram) -> Histogram | None:
    """What was observed between two scrapes of one histogram; None when it cannot be told: the
    bucket bounds changed (an engine upgraded) or a counter went back (the engine restarted)."""
    if [bound for bound, _ in before.buckets] != [bound for bound, _ in after.buckets]:
        return None
    if after.count < before.count or after.sum < before.sum:
        return None
    if any(now < then for (_, then), (_, now) in zip(before.buckets, after.buckets, strict=True)):
        return None
    return Histogram(
        buckets=tuple((bound, now - then) for (bound, then), (_, now) in zip(before.buckets, after.buckets, strict=True)),
        sum=after.sum - before.sum,
        count=after.count - before.count,
    )


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over cumulative (upper bound, count) buckets; None where it gives
    NaN (no +Inf bucket, fewer than two buckets, no observation). Like Prometheus: bounds sorted,
    equal bounds merged, counts forced monotonic; a rank in the +Inf bucket gives the highest finite
    bound; the first bucket starts at 0 (or is its own bound when that is 0 or below)."""
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: list[list[float]] = []
    for bound, count in sorted(buckets, key=lambda bucket: bucket[0]):
        if merged and merged[-1][0] == bound:
            merged[-1][1] += count
        else:
            merged.append([bound, count])
    if not merged or not math.isinf(merged[-1][0]) or merged[-1][0] < 0:
        return None
    highest = -math.inf
    for bucket in merged:  # ensureMonotonic
        if bucket[1] > highest:
            highest = bucket[1]
        elif bucket[1] < highest:
            bucket[1] = highest
    if len(merged) < 2:
        return None
    observations = merged[-1][1]
    if observations == 0:
        return None
    rank = q * observations
    b = bisect.bisect_left([count for _, count in merged[:-1]], rank)  # sort.Search: first count >= rank
    if b == len(merged) - 1:
        return merged[-2][0]
    if b == 0 and merged[0][0] <= 0:
        return merged[0][0]
    start, end, count = 0.0, merged[b][0], merged[b][1]
    if b > 0:
        start = merged[b - 1][0]
        count -= merged[b - 1][1]
        rank -= merged[b - 1][1]
    if count == 0:  # q = 0 with an empty first bucket: 0/0, NaN in Prometheus
        return None
    return start + (end - start) * (rank / count)


def figures(before: Histogram, after: Histogram) -> LatencyFigures | None:
    """p50, p99 and mean of what was observed between two scrapes; None when nothing can be told
    (a restart, a changed layout); quantiles and mean absent when nothing was observed."""
    observed = increase(before, after)
    if observed is None:
        return None
    quantiles = {}
    for q in QUANTILES:
        value = quantile(q, observed.buckets)
        if value is not None and math.isfinite(value):
            quantiles[q] = value
    mean = observed.sum / observed.count if observed.count > 0 else None
    return LatencyFigures(quantiles=quantiles, mean=mean)


class LatencyWindow:
    """One engine's histograms scraped in the last `seconds`: figures are computed from the oldest
    kept sample to the newest, so they cover a little less than the window (`span_seconds` says how
    much), and nothing when the engine is scraped less often than that. A histogram that went back
    or changed its buckets (a restart, an upgrade) starts the window anew at that sample, so no
    figure mixes two runs of the engine. Kept compact (counts in an array, bounds shared between
    samples): 30 scrapes of vLLM's four histograms are some 64 KiB, not 320 (docs/benchmarks.md)."""

    def __init__(self, seconds: float = DEFAULT_WINDOW_SECONDS) -> None:
        self.seconds = seconds
        self._samples: deque[tuple[float, dict[str, _Kept]]] = deque(maxlen=MAX_SAMPLES_KEPT)

    def add(self, at: float, latencies: Mapping[str, Histogram]) -> bool:
        """`at`: monotonic time of the scrape. Older or equal times than the newest are ignored, and
        so is a histogram of more than MAX_BUCKETS buckets (unknown: no engine has that many, and
        the window would keep them all). True when this sample started the window anew."""
        if self._samples and at <= self._samples[-1][0]:
            return False
        previous = self._samples[-1][1] if self._samples else {}
        kept = {name: _Kept.of(histogram, previous.get(name)) for name, histogram in latencies.items()
                if len(histogram.buckets) <= MAX_BUCKETS}
        restarted = any(name in previous and not previous[name].grows_to(histogram) for name, histogram in kept.items())
        if restarted:
            self._samples.clear()
        self._samples.append((at, kept))
        while self._samples[0][0] < at - self.seconds:
            self._samples.popleft()
        return restarted

    @property
    def span_seconds(self) -> float | None:
        """The time the figures cover; None until two samples are kept."""
        if len(self._samples) < 2:
            return None
        return self._samples[-1][0] - self._samples[0][0]

    def figures(self) -> dict[str, LatencyFigures]:
        """By latency name, for those both ends of the window have."""
        if len(self._samples) < 2:
            return {}
        (_, oldest), (_, newest) = self._samples[0], self._samples[-1]
        out = {}
        for name, after in newest.items():
            before = oldest.get(name)
            found = None if before is None else figures(before.histogram(), after.histogram())
            if found is not None:
                out[name] = found
        return out


@dataclass(frozen=True, slots=True)
class _Kept:
    """A histogram as the window keeps it."""

    bounds: tuple[float, ...]
    counts: array[float]
    sum: float
    count: float

    @classmethod
    def of(cls, histogram: Histogram, previous: _Kept | None) -> _Kept:
        bounds = tuple(bound for bound, _ in histogram.buckets)
        if previous is not None and previous.bounds == bounds:
            bounds = previous.bounds  # one tuple for every sample of an unchanged layout
        return cls(bounds, array("d", (count for _, count in histogram.buckets)), histogram.sum, histogram.count)

    def histogram(self) -> Histogram:
        return Histogram(tuple(zip(self.bounds, self.counts, strict=True)), self.sum, self.count)

    def grows_to(self, later: _Kept) -> bool:
        """Whether `later` can be this histogram some observations on: same bounds, nothing went back."""
        return (self.bounds == later.bounds and later.count >= self.count and later.sum >= self.sum
                and all(now >= then for then, now in zip(self.counts, later.counts, strict=True)))
