"""Who slows whom on a shared GPU ("noisy neighbour"): an engine whose inter-token latency rises
against its own baseline while another engine on the same GPU bursts.

The rule, with its defaults (docs/engines.md, "Interference", says what it cannot tell apart):

- Every figure is over the last RECENT_SECONDS of an engine's own answers: its inter-token latency
  mean (Δsum/Δcount of its histogram), its prompt-token rate (Δ of its counter), its running requests.
- An engine **bursts** when its prompt-token rate is at least BURST_FACTOR times its usual rate and at
  least MIN_BURST_PROMPT_RATE, or its running requests rise by RUNNING_RISE and to BURST_FACTOR times
  their usual number. "Usual" is the USUAL_QUANTILE of the engine's figures over BASELINE_SECONDS: an
  engine busy most of the time is busy, not bursting.
- An engine's **baseline** is the median of its recent inter-token latency taken while neither it nor
  any engine on its GPU burst, for a whole recent window, over BASELINE_SECONDS (MIN_QUIET_SAMPLES
  at least); its **slowdown** is its recent inter-token latency over that baseline.
- **Interference**: the engine is slowed (slowdown ≥ SLOWED_RATIO), does not burst itself, and a
  neighbour on its GPU bursts; the neighbour named is the one with the highest prompt-token rate
  over its usual.

Pure in its inputs: times are the engines collector's monotonic scrape times; no clock, no I/O.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mpswatch.snapshot import EngineState

RECENT_SECONDS = 10.0
BASELINE_SECONDS = 600.0
BURST_FACTOR = 3.0
MIN_BURST_PROMPT_RATE = 256.0  # tokens/s: below this, a rise is no burst (a few short prompts)
RUNNING_RISE = 4.0
USUAL_QUANTILE = 0.25
MIN_USUAL_SAMPLES = 5
MIN_QUIET_SAMPLES = 5
SLOWED_RATIO = 1.25
INTER_TOKEN = "inter_token"


@dataclass(frozen=True)
class Interference:
    """What the rule makes of one engine on a GPU now; None: unknown (too few samples, no histogram)."""

    gpu_uuid: str
    inter_token_seconds: float | None  # mean over the recent window
    baseline_seconds: float | None
    slowdown_ratio: float | None
    bursting: bool | None
    prompt_tokens_per_second: float | None  # over the recent window
    neighbour: str | None = None  # the bursting neighbour, while this engine is slowed
    neighbour_prompt_tokens_per_second: float | None = None

    @property
    def detail(self) -> str:
        """A line for `mpswatch status`."""
        if self.neighbour is not None and self.slowdown_ratio is not None and self.baseline_seconds is not None:
            rate = self.neighbour_prompt_tokens_per_second
            burst = "" if rate is None else f" ({rate:.0f} prompt tokens/s)"
            return (f"inter-token latency {self.slowdown_ratio:.1f}x its baseline of {self.baseline_seconds * 1000:.1f} ms"
                    f" while neighbour {self.neighbour} bursts{burst}")
        if self.slowdown_ratio is not None and self.baseline_seconds is not None:
            return f"inter-token latency {self.slowdown_ratio:.2f}x its baseline of {self.baseline_seconds * 1000:.1f} ms"
        if self.inter_token_seconds is None:
            return "interference unknown: no inter-token latency in the last window"
        return "interference unknown: no quiet baseline yet"


@dataclass(frozen=True, slots=True)
class _Reading:
    at: float
    prompt_tokens_total: float | None
    itl_sum: float | None
    itl_count: float | None
    running: float | None


@dataclass(frozen=True, slots=True)
class _Recent:
    prompt_rate: float | None
    itl_mean: float | None
    running: float | None


@dataclass
class _Track:
    gpu_uuid: str
    readings: deque[_Reading] = field(default_factory=deque)  # the recent window's answers
    usual: deque[tuple[float, float | None, float | None]] = field(default_factory=deque)  # (at, rate, running)
    quiet_itl: deque[tuple[float, float]] = field(default_factory=deque)  # (at, recent ITL mean)
    last_burst_at: float | None = None

    def add(self, reading: _Reading) -> bool:
        """False when the answer is not newer than the last one (the engine was not scraped again)."""
        if self.readings and reading.at <= self.readings[-1].at:
            return False
        last = self.readings[-1] if self.readings else None
        if last is not None and _went_back(last, reading):
            self.readings.clear()  # a restart: no rate spans two runs of the engine
        self.readings.append(reading)
        while self.readings[0].at < reading.at - RECENT_SECONDS:
            self.readings.popleft()
        return True

    def recent(self) -> _Recent:
        newest = self.readings[-1]
        oldest = self.readings[0]
        span = newest.at - oldest.at
        rate = itl = None
        if span > 0 and newest.prompt_tokens_total is not None and oldest.prompt_tokens_total is not None:
            rate = (newest.prompt_tokens_total - oldest.prompt_tokens_total) / span
        if (newest.itl_count is not None and oldest.itl_count is not None and newest.itl_sum is not None
                and oldest.itl_sum is not None and newest.itl_count > oldest.itl_count):
            itl = (newest.itl_sum - oldest.itl_sum) / (newest.itl_count - oldest.itl_count)
        return _Recent(rate, itl, newest.running)

    def bursting(self, now: _Recent) -> bool | None:
        """Against the usual figures kept before this one; None before MIN_USUAL_SAMPLES are kept."""
        rates = [rate for _, rate, _ in self.usual if rate is not None]
        running = [r for _, _, r in self.usual if r is not None]
        by_rate = by_running = None
        if now.prompt_rate is not None and len(rates) >= MIN_USUAL_SAMPLES:
            usual_rate = _quantile(rates, USUAL_QUANTILE)
            by_rate = now.prompt_rate >= max(MIN_BURST_PROMPT_RATE, BURST_FACTOR * usual_rate)
        if now.running is not None and len(running) >= MIN_USUAL_SAMPLES:
            usual_running = _quantile(running, USUAL_QUANTILE)
            by_running = now.running >= max(usual_running + RUNNING_RISE, BURST_FACTOR * usual_running)
        if by_rate or by_running:
            return True
        return None if by_rate is None and by_running is None else False

    def remember(self, at: float, now: _Recent, quiet: bool) -> None:
        self.usual.append((at, now.prompt_rate, now.running))
        if quiet and now.itl_mean is not None:
            self.quiet_itl.append((at, now.itl_mean))
        for kept in (self.usual, self.quiet_itl):
            while kept and kept[0][0] < at - BASELINE_SECONDS:
                kept.popleft()

    def baseline(self) -> float | None:
        if len(self.quiet_itl) < MIN_QUIET_SAMPLES:
            return None
        return statistics.median(itl for _, itl in self.quiet_itl)

    def usual_rate(self) -> float | None:
        rates = [rate for _, rate, _ in self.usual if rate is not None]
        return _quantile(rates, USUAL_QUANTILE) if rates else None


def _went_back(before: _Reading, after: _Reading) -> bool:
    pairs = ((before.prompt_tokens_total, after.prompt_tokens_total), (before.itl_count, after.itl_count),
             (before.itl_sum, after.itl_sum))
    return any(then is not None and now is not None and now < then for then, now in pairs)


def _quantile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _reading(engine: EngineState, at: float) -> _Reading:
    itl = engine.latency_totals.get(INTER_TOKEN)
    return _Reading(at, engine.prompt_tokens_total, itl[0] if itl else None, itl[1] if itl else None,
                    engine.requests_running)


class InterferenceMemory:
    """Each engine's recent answers and its usual and quiet figures; engines that left are forgotten."""

    def __init__(self) -> None:
        self._tracks: dict[str, _Track] = {}
        self._last: dict[str, Interference] = {}

    def update(self, engines: Iterable[EngineState]) -> Mapping[str, Interference]:
        """By engine name, for the engines that are up on a known GPU. The rule runs for a GPU when
        one of its engines has a new answer; the others keep what they had."""
        present = [e for e in engines if e.up and e.gpu_uuid is not None and e.scraped_at is not None]
        names = {e.name for e in present}
        for gone in set(self._tracks) - names:
            del self._tracks[gone]
            self._last.pop(gone, None)
        fresh: dict[str, _Recent] = {}
        at_of: dict[str, float] = {}
        for e in present:
            assert e.gpu_uuid is not None and e.scraped_at is not None  # for mypy: filtered above
            track = self._tracks.get(e.name)
            if track is None or track.gpu_uuid != e.gpu_uuid:
                track = self._tracks[e.name] = _Track(e.gpu_uuid)
            if track.add(_reading(e, e.scraped_at)):
                fresh[e.name] = track.recent()
                at_of[e.name] = e.scraped_at
        bursting = {name: self._tracks[name].bursting(recent) for name, recent in fresh.items()}
        for name, burst in bursting.items():
            if burst:
                self._tracks[name].last_burst_at = at_of[name]
        now = {name: (last.bursting, last.prompt_tokens_per_second) for name, last in self._last.items()}
        now.update({name: (bursting[name], recent.prompt_rate) for name, recent in fresh.items()})
        by_gpu: dict[str, list[str]] = {}
        for e in present:
            by_gpu.setdefault(self._tracks[e.name].gpu_uuid, []).append(e.name)
        for name, recent in fresh.items():
            track = self._tracks[name]
            at = at_of[name]
            neighbours = [n for n in by_gpu[track.gpu_uuid] if n != name]
            gpu_quiet = all(self._quiet_since(n, at - RECENT_SECONDS) for n in [name, *neighbours])
            baseline = track.baseline()
            slowdown = None if baseline is None or recent.itl_mean is None or baseline <= 0 else recent.itl_mean / baseline
            named = None
            if slowdown is not None and slowdown >= SLOWED_RATIO and not bursting[name]:
                named = self._busiest_bursting([n for n in neighbours if now.get(n, (None, None))[0]], now)
            self._last[name] = Interference(track.gpu_uuid, recent.itl_mean, baseline, slowdown, bursting[name],
                                            recent.prompt_rate, named, None if named is None else now[named][1])
            track.remember(at, recent, quiet=gpu_quiet and bursting[name] is False)
        return {name: self._last[name] for name in names if name in self._last}

    def _quiet_since(self, name: str, since: float) -> bool:
        last = self._tracks[name].last_burst_at
        return last is None or last < since

    def _busiest_bursting(self, candidates: list[str], now: Mapping[str, tuple[bool | None, float | None]]) -> str | None:
        """The bursting neighbour furthest above its usual prompt-token rate (then by name, for a stable pick)."""
        def over_usual(name: str) -> tuple[float, str]:
            usual = self._tracks[name].usual_rate()
            return ((now[name][1] or 0.0) / max(usual or 0.0, 1.0), name)

        return max(candidates, key=over_usual) if candidates else None
