"""mpswatch.latency: quantiles as Prometheus's histogram_quantile gives them (checked against the
real promtool for a few bucket layouts, and against a plain reference implementation for any), the
mean, and the window an engine's histograms are kept over."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpswatch.engine_kinds import Histogram
from mpswatch.latency import LatencyWindow, figures, increase, quantile

INF = math.inf


def cumulative(bounds: list[float], per_bucket: list[float]) -> tuple[tuple[float, float], ...]:
    out, total = [], 0.0
    for bound, observed in zip(bounds, per_bucket, strict=True):
        total += observed
        out.append((bound, total))
    return tuple(out)


def histogram(bounds: list[float], per_bucket: list[float], total: float) -> Histogram:
    buckets = cumulative(bounds, per_bucket)
    return Histogram(buckets=buckets, sum=total, count=buckets[-1][1])


def reference_quantile(q: float, bounds: list[float], per_bucket: list[float]) -> float | None:
    """From the definition, for well-formed histograms (sorted distinct bounds, last +Inf): walk the
    buckets until the q-th observation's rank is reached, and place it linearly within its bucket."""
    observations = sum(per_bucket)
    if observations == 0 or len(bounds) < 2:
        return None
    rank = q * observations
    below = 0.0
    for i, (bound, observed) in enumerate(zip(bounds, per_bucket, strict=True)):
        if below + observed >= rank and i < len(bounds) - 1:
            lower = bounds[i - 1] if i else 0.0
            if i == 0 and bound <= 0:
                return bound
            return None if observed == 0 else lower + (bound - lower) * ((rank - below) / observed)
        below += observed
    return bounds[-2]  # the rank lies in the +Inf bucket


layouts = st.lists(st.floats(min_value=-5, max_value=1e4, allow_nan=False), min_size=1, max_size=25, unique=True).map(
    lambda bounds: [*sorted(bounds), INF])


@settings(max_examples=300, deadline=None)
@given(layouts.flatmap(lambda bounds: st.tuples(
    st.just(bounds), st.lists(st.integers(0, 1000).map(float), min_size=len(bounds), max_size=len(bounds)))),
    st.sampled_from([0.0, 0.01, 0.5, 0.9, 0.99, 1.0]))
def test_quantile_agrees_with_the_reference_on_well_formed_histograms(layout, q):
    bounds, per_bucket = layout
    expected = reference_quantile(q, bounds, per_bucket)
    got = quantile(q, cumulative(bounds, per_bucket))
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_quantile_edge_cases_as_promql():
    assert quantile(0.5, [(1.0, 5.0), (2.0, 9.0)]) is None  # no +Inf bucket: NaN
    assert quantile(0.5, [(INF, 5.0)]) is None  # one bucket: NaN
    assert quantile(0.5, [(1.0, 0.0), (INF, 0.0)]) is None  # no observation
    assert quantile(0.99, [(1.0, 1.0), (2.0, 2.0), (INF, 10.0)]) == 2.0  # in +Inf: the highest finite bound
    assert quantile(0.5, [(0.1, 4.0), (INF, 4.0)]) == pytest.approx(0.05)  # the lowest bucket starts at 0
    assert quantile(0.5, [(0.0, 4.0), (INF, 4.0)]) == 0.0
    assert quantile(-0.1, [(1.0, 1.0), (INF, 1.0)]) == -INF
    assert quantile(1.5, [(1.0, 1.0), (INF, 1.0)]) == INF
    assert quantile(0.0, [(1.0, 0.0), (INF, 1.0)]) is None  # 0/0 within the first bucket: NaN
    # non-monotonic counts (a scrape that raced an observation) are forced monotonic
    assert quantile(0.5, [(1.0, 6.0), (2.0, 4.0), (INF, 10.0)]) == quantile(0.5, [(1.0, 6.0), (2.0, 6.0), (INF, 10.0)])


def test_increase_refuses_a_restart_and_a_changed_layout():
    before = histogram([0.1, 1.0, INF], [2, 3, 1], 3.0)
    assert increase(before, histogram([0.1, 1.0, INF], [1, 1, 0], 0.5)) is None  # counters went back
    assert increase(before, histogram([0.2, 1.0, INF], [4, 3, 1], 5.0)) is None  # buckets changed
    assert figures(before, histogram([0.1, 1.0, INF], [1, 1, 0], 0.5)) is None
    same = figures(before, before)
    assert same is not None and same.quantiles == {} and same.mean is None  # nothing observed: unknown
    grown = figures(before, histogram([0.1, 1.0, INF], [4, 3, 1], 4.0))
    assert grown is not None and grown.mean == pytest.approx(0.5)  # Δsum 1.0 over Δcount 2
    assert grown.quantiles[0.5] == pytest.approx(0.05) and grown.quantiles[0.99] == pytest.approx(0.099)


# ---------------------------------------------------------------- Prometheus's own answers

PROMETHEUS_CASES = {
    # name: (bucket bounds as `le` strings, cumulative counts before, after, sum before, after)
    "vllm_ttft": (["0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "+Inf"],
                  [0, 0, 1, 4, 10, 20, 30, 31, 31, 31, 31], [0, 1, 5, 20, 50, 80, 95, 99, 100, 100, 101], 1.1, 6.9),
    "vllm_itl": (["0.01", "0.025", "0.05", "0.075", "0.1", "0.15", "+Inf"],
                 [10, 20, 30, 30, 30, 30, 30], [15, 220, 1030, 1400, 1500, 1520, 1530], 0.9, 60.2),
    "in_inf_bucket": (["1", "2", "+Inf"], [0, 0, 0], [1, 2, 300], 0.0, 900.0),
    "lowest_bucket": (["0.5", "1", "+Inf"], [3, 3, 3], [103, 103, 103], 1.0, 21.0),
    "equal_bounds_merged": (["0.1", "0.10", "1", "+Inf"], [0, 0, 0, 0], [2, 3, 9, 10], 0.0, 2.5),
}


def _values(bounds: list[str], before: list[float], after: list[float]) -> list[tuple[float, list[tuple[float, float]]]]:
    return [(q, [(float(b), a - c) for b, c, a in zip(bounds, before, after, strict=True)]) for q in (0.5, 0.99)]


@pytest.mark.skipif(not shutil.which("promtool"), reason="needs promtool (Debian package prometheus)")
def test_quantiles_and_means_are_prometheus_own(tmp_path: Path):
    """Every case's p50, p99 and mean as mpswatch computes them, asserted by `promtool test rules`
    against PromQL over the same two scrapes (histogram_quantile of the buckets' difference)."""
    lines = ["rule_files: []", "evaluation_interval: 1m", "tests:"]
    for name, (bounds, before, after, sum_before, sum_after) in PROMETHEUS_CASES.items():
        old = Histogram(tuple((float(b), float(c)) for b, c in zip(bounds, before, strict=True)), sum_before, before[-1])
        new = Histogram(tuple((float(b), float(c)) for b, c in zip(bounds, after, strict=True)), sum_after, after[-1])
        found = figures(old, new)
        assert found is not None and found.mean is not None
        lines += ["  - interval: 1m", "    input_series:"]
        for bound, b, a in zip(bounds, before, after, strict=True):
            lines += [f"      - series: '{name}_bucket{{le=\"{bound}\"}}'", f"        values: '{b} {a}'"]
        lines += [f"      - series: '{name}_sum'", f"        values: '{sum_before} {sum_after}'",
                  f"      - series: '{name}_count'", f"        values: '{before[-1]} {after[-1]}'",
                  "    promql_expr_test:"]
        for q in (0.5, 0.99):
            lines += [f"      - expr: histogram_quantile({q}, {name}_bucket - {name}_bucket offset 1m)",
                      "        eval_time: 1m", "        exp_samples:", "          - labels: '{}'",
                      f"            value: {found.quantiles[q]!r}"]
        lines += [f"      - expr: ({name}_sum - {name}_sum offset 1m) / ({name}_count - {name}_count offset 1m)",
                  "        eval_time: 1m", "        exp_samples:", "          - labels: '{}'",
                  f"            value: {found.mean!r}"]
    tests = tmp_path / "latency.test.yml"
    tests.write_text("\n".join(lines) + "\n")
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the window


def ttft(per_bucket: list[float], total: float) -> dict[str, Histogram]:
    return {"time_to_first_token": histogram([0.1, 1.0, INF], per_bucket, total)}


def test_window_covers_the_samples_of_its_length_and_says_how_long():
    window = LatencyWindow(seconds=10)
    assert window.figures() == {} and window.span_seconds is None  # one sample: unknown
    window.add(0.0, ttft([0, 0, 0], 0.0))
    window.add(5.0, ttft([10, 0, 0], 0.5))
    window.add(10.0, ttft([10, 10, 0], 6.0))
    assert window.span_seconds == 10.0
    assert window.figures()["time_to_first_token"].mean == pytest.approx(0.3)
    window.add(12.0, ttft([10, 10, 0], 6.0))  # the sample at 0 leaves the window
    assert window.span_seconds == 7.0
    assert window.figures()["time_to_first_token"].mean == pytest.approx(0.55)  # (6.0-0.5)/10
    window.add(30.0, ttft([10, 10, 0], 6.0))  # not read for longer than the window: one sample left
    assert window.span_seconds is None and window.figures() == {}


def test_a_restart_within_the_window_starts_it_anew():
    """A restarted engine whose counters have already grown past the old ones would otherwise give
    an increase that mixes its two runs."""
    window = LatencyWindow(seconds=60)
    window.add(0.0, ttft([1, 1, 0], 1.0))
    assert window.add(2.0, ttft([0, 0, 0], 0.0))  # restarted
    window.add(4.0, ttft([5, 5, 0], 3.0))
    assert window.span_seconds == 2.0
    assert window.figures()["time_to_first_token"].mean == pytest.approx(0.3)


def test_a_latency_missing_at_either_end_is_unknown():
    window = LatencyWindow(seconds=60)
    window.add(0.0, {})
    window.add(2.0, ttft([1, 0, 0], 0.05))
    assert window.figures() == {}


def test_a_histogram_of_too_many_buckets_is_not_kept():
    """Another user's engine may serve a histogram of 100,000 buckets within the body cap: every
    sample of the window would keep them all."""
    window = LatencyWindow(seconds=60)
    bounds = [i / 1000 for i in range(1, 100_001)] + [INF]
    for at in (0.0, 2.0):
        window.add(at, {"inter_token": histogram(bounds, [1.0] * len(bounds), at),
                        **ttft([at, 0, 0], at / 10)})
    assert set(window.figures()) == {"time_to_first_token"}
