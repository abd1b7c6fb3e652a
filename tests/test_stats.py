"""Statistics of a comparison on inputs whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sweep.stats import compare_samples, first_reach, holm, mean_band, mean_ci


def test_mean_ci_matches_hand_computed_t_interval():
    # x = 1..5: mean 3, s = sqrt(2.5), t_{0.975,4} = 2.7764451 -> half width 2.7764451 * 1.5811388 / sqrt(5)
    ci = mean_ci([1, 2, 3, 4, 5])
    assert ci.mean == pytest.approx(3.0)
    assert ci.half_width == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert ci.half_width == pytest.approx(1.963243, rel=1e-5)
    assert (ci.low, ci.high) == pytest.approx((3 - 1.963243, 3 + 1.963243), rel=1e-5)


def test_mean_ci_of_one_value_has_no_width():
    ci = mean_ci([0.7])
    assert ci.mean == 0.7 and math.isnan(ci.half_width) and ci.n == 1


def test_holm_on_a_known_vector():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06, monotone), 0.04 (x1 = 0.04 -> 0.06)
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.01, math.nan, 0.02])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.02)


@pytest.mark.parametrize("test", ["welch", "mannwhitney"])
def test_a_known_difference_is_significant_and_identical_samples_are_not(test):
    rng = np.random.default_rng(0)
    good = rng.normal(1.0, 0.2, size=8)   # test error % of a better model over 8 seeds
    bad = rng.normal(5.0, 0.2, size=8)
    assert compare_samples(bad, good, test) < 0.01
    assert compare_samples(good, good, test) > 0.5
    assert compare_samples([2.0] * 5, [2.0] * 5, test) == 1.0
    same_dist = rng.normal(3.0, 0.5, size=(2, 8))
    assert compare_samples(same_dist[0], same_dist[1], test) > 0.05


def test_welch_matches_scipy_reference_value():
    # Welch on [1,2,3,4,5] vs [3,4,5,6,7]: t = -2, df = 8 -> p = 0.0805
    assert compare_samples([1, 2, 3, 4, 5], [3, 4, 5, 6, 7]) == pytest.approx(0.08051623, rel=1e-5)


def test_first_reach_and_mean_band():
    hist = [{"step": 100, "val_accuracy": 0.5}, {"step": 200, "val_accuracy": 0.96}, {"step": 300,
                                                                                      "val_accuracy": 0.995}]
    assert first_reach(hist, 0.95)["step"] == 200
    assert first_reach(hist, 0.99)["step"] == 300
    assert first_reach(hist, 0.999) is None
    steps, mean, half = mean_band([[(1, 0.2), (2, 0.4)], [(1, 0.4), (2, 0.6), (3, 0.9)]])
    assert steps.tolist() == [1, 2]  # step 3 has a single seed: left out of the band
    assert mean.tolist() == pytest.approx([0.3, 0.5])
    assert half[0] == pytest.approx(12.7062047 * math.sqrt(0.02) / math.sqrt(2), rel=1e-6)
