"""The arithmetic of benchmarks/h200_effect.py, on made-up progress streams and block rates."""

import statistics

import pytest

from benchmarks.h200_effect import mean_interval, rate, steps_at, summarise, t975

KINDS = ["off", "on"] * 10 + ["off"]


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


def test_a_slowdown_hidden_in_a_drift_is_found_where_an_unpaired_comparison_would_miss_it():
    noise = [0.2, -0.1, 0.15, -0.2, 0.05, 0.1, -0.15, 0.2, -0.05, 0.1, -0.2, 0.15, 0.0, -0.1, 0.2, -0.15, 0.05, 0.1,
             -0.2, 0.15, -0.05]
    # the machine speeds up 6 % a block, much more than the 5 % slowdown, with block noise on top
    rates = [(100 * 1.06**i + n) * (0.95 if kind == "on" else 1.0) for i, (n, kind) in enumerate(zip(noise, KINDS))]
    summary = summarise(KINDS, rates)
    assert summary["effect_mean_ratio"] == pytest.approx(-0.05, abs=0.005)
    assert not summary["within_noise"] and summary["effect_ci95_ratio"][1] < 0
    on = [r for r, k in zip(rates, KINDS) if k == "on"]
    off = [r for r, k in zip(rates, KINDS) if k == "off"]
    spread = t975(len(on) + len(off) - 2) * (statistics.variance(on) / len(on) + statistics.variance(off) / len(off)) ** 0.5
    difference = statistics.fmean(on) - statistics.fmean(off)
    assert difference - spread < 0 < difference + spread  # unpaired, the drift swamps the effect


def test_no_effect_among_noisy_blocks_is_within_noise():
    wobble = [3, -2, 1, -4, 2, 0, -1, 4, -3, 2, 1, -2, 0, 3, -1, -3, 2, 1, -2, 4, 0]
    summary = summarise(KINDS, [100 + w for w in wobble])
    assert summary["within_noise"]
    assert summary["placebo_blocks"] == 9 and summary["on_blocks"] == 10


def test_the_interval_allows_for_neighbouring_effects_sharing_an_off_block():
    effects = [0.01, -0.02, 0.03, 0.0, -0.01, 0.02, -0.03, 0.01, 0.0, 0.02]
    low, high = mean_interval(effects)
    independent = t975(9) * statistics.stdev(effects) / len(effects) ** 0.5
    assert (high - low) / 2 == pytest.approx(independent * (1 + 9 / 30) ** 0.5)


def test_t_quantiles_match_the_tables():
    assert t975(9) == pytest.approx(2.262, abs=1e-3)
    assert t975(40) == pytest.approx(2.021, abs=1e-3)
    assert t975(120) == pytest.approx(1.980, abs=1e-3)


@pytest.mark.parametrize("kinds", [["on", "off"] * 4, ["off", "on", "off", "on", "off"], ["off", "on", "on", "off", "on", "off", "on", "off"]])
def test_blocks_that_do_not_alternate_from_off_to_off_are_refused(kinds):
    with pytest.raises(ValueError):
        summarise(kinds, [100.0] * len(kinds))
