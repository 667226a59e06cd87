"""Reading an engine's /metrics text, the same way for every kind: only the lines of the metrics the
kind reads go to prometheus_client's parser, and every value read is checked (REJECT_REASONS)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mpswatch.engine_kinds import BadMetrics, Histogram

Labels = Mapping[str, str]


def _same(name: str) -> str:
    return name


@dataclass
class BodySamples:
    """The samples of the metrics a kind reads, each under its canonical name. A name with a refused
    sample (REJECT_REASONS) is unknown as a whole: a sum or an average without it would be wrong."""

    accepted: dict[str, list[tuple[Labels, float]]] = field(default_factory=dict)
    labels_seen: dict[str, list[Labels]] = field(default_factory=dict)  # every sample's labels, refused ones too
    refused: set[str] = field(default_factory=set)
    rejected: dict[str, int] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.accepted or name in self.refused

    def total(self, name: str) -> float | None:
        """Summed over label sets; None when absent or refused."""
        if name in self.refused or name not in self.accepted:
            return None
        return float(sum(value for _, value in self.accepted[name]))

    def mean(self, name: str) -> float | None:
        """Averaged over label sets (a ratio); None when absent or refused."""
        total = self.total(name)
        return None if total is None else total / len(self.accepted[name])

    def series(self, name: str) -> dict[tuple[Any, ...], float]:
        """Each label set of a counter on its own (a restart of one engine counts from zero)."""
        if name in self.refused:
            return {}
        return {(name, *sorted(labels.items())): value for labels, value in self.accepted.get(name, [])}

    def label(self, label: str) -> str | None:
        """The first value a label has on any sample read (refused ones included)."""
        for seen in self.labels_seen.values():
            for labels in seen:
                if labels.get(label):
                    return labels[label]
        return None

    def per_observation(self, family: str) -> float | None:
        """A histogram's mean since the engine started; None before its first observation."""
        count, total = self.total(family + "_count"), self.total(family + "_sum")
        return total / count if count and total is not None and count > 0 else None

    def histogram(self, family: str) -> Histogram | None:
        """Buckets summed by bound over label sets. None when absent, refused, without +Inf, or when its
        label sets do not share one layout of bounds (their counts could not be added up)."""
        bucket, total, count = family + "_bucket", self.total(family + "_sum"), self.total(family + "_count")
        if bucket in self.refused or bucket not in self.accepted or total is None:
            return None
        layouts: dict[tuple[Any, ...], set[float]] = {}
        sums: dict[float, float] = {}
        for labels, value in self.accepted[bucket]:
            try:
                bound = float(labels.get("le", ""))
            except ValueError:
                return None
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            layouts.setdefault(rest, set()).add(bound)
            sums[bound] = sums.get(bound, 0.0) + value
        if len({frozenset(bounds) for bounds in layouts.values()}) != 1 or math.inf not in sums:
            return None
        buckets = tuple(sorted(sums.items()))
        return Histogram(buckets, total, buckets[-1][1] if count is None else count)


def lines_read(text: str, names: frozenset[str], canonical: Callable[[str], str] = _same) -> str:
    """The lines (samples, HELP and TYPE) of the metrics in `names`; empty when there are none.
    A real engine body is mostly histogram buckets and http_, python_ and process_ families, which
    prometheus_client's pure-Python parser takes milliseconds to read (docs/benchmarks.md)."""
    kept = []
    for line in text.splitlines():
        words = line.split(None, 3)
        if not words:
            continue
        if words[0] == "#":
            name = words[2] if len(words) > 2 and words[1] in ("HELP", "TYPE") else ""
        else:
            name = words[0].split("{", 1)[0]
        if canonical(name) in names:
            kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


def unfit(value: float) -> str | None:
    """Why a value read cannot be a count, a total, a ratio or a duration; None when it can."""
    if not math.isfinite(value):
        return "not_finite"
    return "negative" if value < 0 else None


def read_samples(text: str, names: frozenset[str], prefix: str, *, canonical: Callable[[str], str] = _same,
                 wanted: Callable[[Labels], bool] | None = None) -> BodySamples:
    """The samples of `names` (canonical sample names, and the family names their TYPE lines give).
    `canonical` maps a name as the body spells it to the kind's own; `wanted` drops label sets the kind
    does not count. Raises BadMetrics for text that is not Prometheus text or has no metric that
    starts with `prefix`. Samples named `*_created` (a counter's start time) are not read."""
    out = BodySamples()
    seen: set[tuple[Any, ...]] = set()
    found = False
    try:
        # a body with none of the lines read is parsed whole, to say what is wrong with it
        for family in text_string_to_metric_families(lines_read(text, names, canonical) or text):
            if not canonical(family.name).startswith(prefix):
                continue
            found = True
            for sample in family.samples:
                name = canonical(sample.name)
                if name not in names or (wanted is not None and not wanted(sample.labels)):
                    continue
                out.labels_seen.setdefault(name, []).append(sample.labels)
                if name.endswith("_created"):
                    continue
                key = (name, *sorted(sample.labels.items()))
                reason = "duplicate_series" if key in seen else unfit(sample.value)
                seen.add(key)
                if reason is not None:
                    out.rejected[reason] = out.rejected.get(reason, 0) + 1
                    out.refused.add(name)
                    continue
                out.accepted.setdefault(name, []).append((sample.labels, sample.value))
    except Exception as err:  # the parser raises several kinds on malformed text
        raise BadMetrics(f"not Prometheus text: {err}"[:200]) from None
    if not found:
        raise BadMetrics(f"no {prefix} metric in the body")
    return out


def histogram_names(*families: str) -> frozenset[str]:
    """Every sample name of these histograms, and the family names their TYPE lines give."""
    return frozenset(name for family in families for name in
                     (family, f"{family}_bucket", f"{family}_sum", f"{family}_count"))


def counter_names(*families: str) -> frozenset[str]:
    """A counter's sample name (`_total`) and the family name its TYPE line gives (without `_total`)."""
    return frozenset(name for family in families for name in (family, family.removesuffix("_total")))


def latencies(read: BodySamples, families: Mapping[str, tuple[str, ...]]) -> dict[str, Histogram]:
    """By LATENCIES name, the first of its histograms (in the order given) that the body has and that
    could be read; a latency the body does not measure is left out (unknown)."""
    out = {}
    for latency, names in families.items():
        present = next((name for name in names if read.has(name + "_bucket") or read.has(name + "_count")), None)
        histogram = None if present is None else read.histogram(present)
        if histogram is not None:
            out[latency] = histogram
    return out


def check_text(text: str) -> None:
    """Raises BadMetrics when the text is not Prometheus text."""
    try:
        for _ in text_string_to_metric_families(text):
            pass
    except Exception as err:  # the parser raises several kinds on malformed text
        raise BadMetrics(f"not Prometheus text: {err}"[:200]) from None
