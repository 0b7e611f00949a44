"""The keep/discard rule, on hand-computed cases (DESIGN §3.7)."""

import pytest

from runner.decision import DISCARD, KEEP, Rule, beats, decide, decide_confirmed, measure_noise, threshold


def test_noise_is_the_sample_standard_deviation_of_the_baseline():
    # deviations 0, +0.002, -0.002: sum of squares 8e-6, over n-1 = 2 -> variance 4e-6, sigma 0.002
    noise = measure_noise([1.000, 1.002, 0.998])
    assert noise.mean == pytest.approx(1.0)
    assert noise.sigma == pytest.approx(0.002)
    assert noise.runs == 3


def test_one_baseline_run_has_no_measurable_noise():
    assert measure_noise([1.5]).sigma == 0.0
    with pytest.raises(ValueError):
        measure_noise([])


def test_threshold_is_k_sigma_or_the_minimum_delta_whichever_is_larger():
    assert threshold(Rule(k=2, min_delta=0.001), 0.002) == pytest.approx(0.004)
    assert threshold(Rule(k=2, min_delta=0.01), 0.002) == pytest.approx(0.01)
    assert threshold(Rule(k=3, min_delta=0.0), 0.5) == pytest.approx(1.5)
    assert threshold(Rule(), 0.0) == 0.001  # one baseline run: only min_delta protects


def test_keep_needs_to_beat_best_minus_threshold_strictly():
    # binary-exact numbers: best 1.0, margin 0.25 -> the bar is 0.75
    assert decide(0.74, 1.0, 0.25) == KEEP
    assert decide(0.75, 1.0, 0.25) == DISCARD  # equal to the bar is not better
    assert decide(0.9, 1.0, 0.25) == DISCARD  # better than best, but within the noise
    assert decide(1.1, 1.0, 0.25) == DISCARD
    assert beats(0.5, 1.0, 0.25) and not beats(0.875, 1.0, 0.25)


def test_confirmation_must_beat_too_and_the_change_is_credited_with_the_mean():
    assert decide_confirmed(0.5, 0.625, 1.0, 0.25) == (KEEP, 0.5625)
    # the mean (0.6875) would pass, but the confirmation run alone (0.875) does not
    assert decide_confirmed(0.5, 0.875, 1.0, 0.25) == (DISCARD, 0.6875)
    assert decide_confirmed(0.5, 1.5, 1.0, 0.25) == (DISCARD, 1.0)
