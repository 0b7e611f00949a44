"""The keep rule: hand-computed cases, and its false-keep rate and power by seeded simulation."""

import random

import pytest

from runner.decision import (
    DISCARD, KEEP, MORE, Estimate, Rule, estimate, judge, judge_in_window, keep_bound, pooled_noise, seed_for, t_quantile,
)


def test_noise_pools_the_within_code_variance_of_every_repeated_code():
    # code a: deviations 0, +0.002, -0.002 -> 8e-6 over 2; code b: +-0.001 -> 2e-6 over 1; one-run code ignored
    noise = pooled_noise([[1.000, 1.002, 0.998], [0.5, 0.502], [7.0]])
    assert noise.df == 3
    assert noise.sigma == pytest.approx(((8e-6 + 2e-6) / 3) ** 0.5)
    assert noise.runs == 5
    with pytest.raises(ValueError):
        pooled_noise([[1.0], [2.0]])


def test_estimate_pools_all_runs_of_the_best_and_the_error_shrinks_with_both():
    noise = pooled_noise([[0.0, 0.02]])  # sigma = 0.02 / sqrt(2)
    est = estimate([1.0, 0.98], [1.02, 1.01, 1.03, 1.02], noise)
    assert est.gain == pytest.approx(1.02 - 0.99)
    assert est.se == pytest.approx(noise.sigma * (1 / 2 + 1 / 4) ** 0.5)
    assert (est.runs, est.best_runs, est.df) == (2, 4, 1)
    low, high = est.interval()
    assert low < est.gain < high and high - est.gain == pytest.approx(est.gain - low)
    assert high - low == pytest.approx(2 * t_quantile(0.975, 1) * est.se)


def test_a_loser_costs_one_run_and_a_keep_needs_two():
    rule = Rule()
    assert judge(rule, Estimate(gain=-0.01, se=0.001, df=10, runs=1, best_runs=3)) == DISCARD
    assert judge(rule, Estimate(gain=0.0, se=0.001, df=10, runs=1, best_runs=3)) == DISCARD  # not better
    assert judge(rule, Estimate(gain=1.0, se=0.001, df=10, runs=1, best_runs=3)) == MORE  # huge, but one run
    assert judge(rule, Estimate(gain=1.0, se=0.001, df=10, runs=2, best_runs=3)) == KEEP


def test_the_ambiguous_band_asks_for_more_runs_up_to_the_cap():
    rule = Rule(max_runs=4)
    est = Estimate(gain=0.002, se=0.001, df=10, runs=2, best_runs=3)
    assert keep_bound(rule, est) > est.gain > 0
    assert judge(rule, est) == MORE
    assert judge(rule, Estimate(gain=0.002, se=0.001, df=10, runs=4, best_runs=3)) == DISCARD


def test_keep_bound_is_the_t_quantile_at_the_per_look_level():
    rule = Rule(alpha=0.006, max_runs=4)  # three looks can keep: 0.002 each
    est = Estimate(gain=0.0, se=0.01, df=5, runs=2, best_runs=3)
    assert keep_bound(rule, est) == pytest.approx(0.050302, abs=1e-5) and rule.alpha_per_look == pytest.approx(0.002)


def test_min_delta_discards_gains_too_small_to_care_about():
    est = Estimate(gain=0.5, se=0.001, df=10, runs=3, best_runs=3)
    assert judge(Rule(min_delta=0.4), est) == KEEP
    assert judge(Rule(min_delta=0.6), est) == DISCARD


def test_seed_sequence_starts_with_the_harness_default():
    assert [seed_for(i) for i in range(4)] == [None, 1, 2, 3]


def simulate(rule: Rule, effect: float, trials: int, seed: int, baseline_runs: int = 4, drift: float = 0.0,
             in_window: bool = True) -> tuple[float, float]:
    """Keep rate and mean runs per candidate when a candidate is `effect` sigmas better than the best.

    The worst case of a night: the noise is known only from the baseline's runs and the
    candidate's own repeats (the fewest degrees of freedom); the best is the baseline.
    `drift`: the machine changed after the baseline was measured, so that every later run
    scores that many sigmas lower. A keep of the rule is then checked against the best run
    again beside the candidate (`in_window`, as the judge does), which shares the drift.
    """
    rng = random.Random(seed)
    keeps = runs = 0
    for _ in range(trials):
        best = [rng.gauss(0.0, 1.0) for _ in range(baseline_runs)]
        candidate: list[float] = []
        verdict = MORE
        while verdict == MORE:
            candidate.append(rng.gauss(-effect - drift, 1.0))
            verdict = judge(rule, estimate(candidate, best, pooled_noise([best, candidate])))
        runs += len(candidate)
        if verdict == KEEP and in_window:
            window = [rng.gauss(-drift, 1.0) for _ in candidate]
            runs += len(window)
            verdict = judge_in_window(rule, estimate(candidate, window, pooled_noise([best, candidate, window])))
        keeps += verdict == KEEP
    return keeps / trials, runs / trials


def test_effect_free_changes_are_kept_at_most_at_rate_alpha():
    rule = Rule()
    rate, runs = simulate(rule, effect=0.0, trials=40_000, seed=1)
    # binomial standard error of the rate at alpha: sqrt(0.005 * 0.995 / 40000) = 0.00035
    assert rate <= rule.alpha
    assert 100 * rate <= 0.5  # false keeps expected in a 100-experiment night
    assert runs < 2.5  # half the effect-free changes stop after one run


def test_clear_losers_cost_one_run():
    rate, runs = simulate(Rule(), effect=-3.0, trials=5_000, seed=2)
    assert rate == 0.0 and runs < 1.01


def test_power_grows_with_the_effect():
    rule = Rule()
    power = {effect: simulate(rule, effect, trials=4_000, seed=3)[0] for effect in (1.0, 3.0, 5.0)}
    assert power[1.0] < power[3.0] < power[5.0]
    # a 3-sigma gain is kept a third of the time even with the fewest df (half without the check in its window)
    assert power[3.0] > 0.3
    assert power[5.0] > 0.8


def test_more_pooled_noise_measurements_raise_power_without_raising_false_keeps():
    rule = Rule()
    few, _ = simulate(rule, effect=2.0, trials=4_000, seed=4, baseline_runs=3)
    many, _ = simulate(rule, effect=2.0, trials=4_000, seed=4, baseline_runs=12)
    assert many > few
    assert simulate(rule, effect=0.0, trials=20_000, seed=5, baseline_runs=12)[0] <= rule.alpha



def test_a_machine_that_drifts_after_the_baseline_keeps_no_more_effect_free_changes():
    """Without the check in the candidate's window a drift of one sigma keeps eight times alpha."""
    rule = Rule()
    # rates of about 0.038 and 0.0017 (20 000 trials); binomial standard errors 0.0027 and 0.0004 here
    assert simulate(rule, effect=0.0, trials=5_000, seed=6, drift=1.0, in_window=False)[0] > 5 * rule.alpha
    assert simulate(rule, effect=0.0, trials=10_000, seed=6, drift=1.0)[0] <= rule.alpha


def test_the_check_in_the_window_costs_some_power_and_runs_only_for_keeps():
    rule = Rule()
    for effect, least in ((5.0, 0.75), (8.0, 0.95)):
        with_check, _ = simulate(rule, effect, trials=4_000, seed=7)
        without, _ = simulate(rule, effect, trials=4_000, seed=7, in_window=False)
        assert least < with_check <= without
    losers = simulate(rule, effect=-3.0, trials=2_000, seed=8)
    assert losers == (0.0, pytest.approx(1.0, abs=0.01))  # a clear loser still costs one run and nothing else
