"""The arithmetic of benchmarks/h200_effect.py, on made-up progress streams and block rates."""

import pytest

from benchmarks.h200_effect import rate, steps_at, summarise


def test_steps_are_interpolated_between_reports():
    progress = [(10.0, 0), (11.0, 10), (12.0, 30)]
    assert steps_at(progress, 10.5) == pytest.approx(5)
    assert steps_at(progress, 11.5) == pytest.approx(20)


def test_a_time_outside_the_reports_is_refused_rather_than_extrapolated():
    with pytest.raises(ValueError):
        steps_at([(10.0, 0), (11.0, 10)], 11.5)


def test_rate_adds_up_the_clients():
    fast = [(float(t), 20 * t) for t in range(0, 11)]
    slow = [(float(t), 5 * t) for t in range(0, 11)]
    assert rate([fast, slow], 2.0, 8.0) == pytest.approx(25)


def test_a_slowdown_hidden_in_a_drift_is_found():
    kinds = ["off", "on"] * 10 + ["off"]
    drift = [100 + 2 * i for i in range(len(kinds))]  # 40 % over the run, much more than the effect
    rates = [r * (0.95 if kind == "on" else 1.0) for r, kind in zip(drift, kinds)]
    summary = summarise(kinds, rates)
    assert summary["effect_mean_ratio"] == pytest.approx(-0.05, abs=0.002)
    assert not summary["within_noise"]
    assert summary["effect_ci95_ratio"][1] < 0


def test_no_effect_among_noisy_blocks_is_within_noise():
    kinds = ["off", "on"] * 10 + ["off"]
    wobble = [3, -2, 1, -4, 2, 0, -1, 4, -3, 2, 1, -2, 0, 3, -1, -3, 2, 1, -2, 4, 0]
    summary = summarise(kinds, [100 + w for w in wobble])
    assert summary["within_noise"]
    assert summary["placebo_blocks"] == 9 and summary["on_blocks"] == 10
