"""The keep rule: keep a change only when it replicates, and say how sure we are (DESIGN §3.7).

A run's val_bpb is the code's true value plus the seed's noise (initialisation and
data order); the night measures that noise σ from every code it ran more than once
(the baselines, the candidates' repeats), pooled. A candidate is compared with the
best on the same sequence of harness seeds, one run at a time:

- its estimated gain is the mean of *all* runs of the best minus the mean of its own
  runs, with standard error σ̂·√(1/n + 1/m) (no correlation between the two assumed:
  matched seeds can only make the true error smaller);
- it is discarded as soon as its estimated gain is not above `min_delta` (so a clear
  loser costs one run) or after `max_runs`;
- it is kept when, after at least two runs, the one-sided Student-t lower bound of
  its gain at level α/(max_runs − 1) is above zero.

Each of the max_runs − 1 looks that can keep spends at most α/(max_runs − 1) of false
keep probability, so an effect-free change is kept with probability at most α
(Bonferroni); a night of N experiments expects at most N·α false keeps (0.5 for
100 at the default α).

That bound assumes the machine is the same all night. It is not always: other load
comes and goes, a GPU warms up, and then every candidate measured later looks better
(or worse) than a best measured at dusk. So a keep must hold twice: against every run
of the best, and then against as many runs of the best made in the candidate's own
window, on the candidate's seeds (`judge_in_window`). Requiring both can only lower
the chance of a false keep; a drift the two windows share cancels in the second.
docs/decisions.md shows the arithmetic and the simulated power. Pure functions only:
the judge owns the state.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats

KEEP = "keep"
DISCARD = "discard"
MORE = "more"  # ambiguous: run the candidate on the next seed


@dataclass(frozen=True)
class Rule:
    """The keep rule in force for a night (settings; printed and stored)."""

    alpha: float = 0.005  # chance that an effect-free change is kept: 100 experiments, ≤ 0.5 false keeps
    max_runs: int = 4  # runs of a candidate at most (seeds 0..max_runs-1); a keep needs at least 2
    min_delta: float = 0.0  # smallest estimated gain (bpb) worth keeping, on top of the statistics

    @property
    def alpha_per_look(self) -> float:
        return self.alpha / (self.max_runs - 1)


@dataclass(frozen=True)
class Noise:
    """The seed noise of one run, pooled over every code run more than once."""

    sigma: float
    df: int  # degrees of freedom: runs minus codes, over the codes with repeats
    runs: int


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, df: int) -> float:
    """Student-t quantile (cached: the judge and the simulations ask for few distinct ones)."""
    return float(stats.t.ppf(q, df))


def seed_for(index: int) -> int | None:
    """The harness seed of a code's index-th run: the harness default first, then 1, 2, ...

    Baselines, candidates and the best all follow this sequence, so the runs compared
    share their seeds as far as both have them.
    """
    return None if index == 0 else index


def seed_label(seed: int | None) -> str:
    return "default" if seed is None else str(seed)


def pooled_noise(groups: Sequence[Sequence[float]]) -> Noise:
    """σ̂ from the within-code spread of the values of each code (pooled variance)."""
    repeated = [g for g in groups if len(g) > 1]
    df = sum(len(g) - 1 for g in repeated)
    if df == 0:
        raise ValueError("the noise needs some code measured at least twice")
    variance = sum(statistics.variance(g) * (len(g) - 1) for g in repeated) / df
    return Noise(sigma=math.sqrt(variance), df=df, runs=sum(len(g) for g in repeated))


@dataclass(frozen=True)
class Estimate:
    """The gain of a candidate over the best (bpb; positive means better) and its uncertainty."""

    gain: float
    se: float
    df: int
    runs: int  # candidate runs
    best_runs: int

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The two-sided Student-t interval of the gain."""
        half = t_quantile(0.5 + level / 2, self.df) * self.se
        return self.gain - half, self.gain + half

    def record(self) -> dict:
        low, high = self.interval()
        return {**asdict(self), "low95": low, "high95": high}


def estimate(candidate: Sequence[float], best: Sequence[float], noise: Noise) -> Estimate:
    gain = statistics.fmean(best) - statistics.fmean(candidate)
    se = noise.sigma * math.sqrt(1 / len(candidate) + 1 / len(best))
    return Estimate(gain=gain, se=se, df=noise.df, runs=len(candidate), best_runs=len(best))


def keep_bound(rule: Rule, est: Estimate) -> float:
    """The smallest gain a candidate must show to be kept at this look."""
    return t_quantile(1 - rule.alpha_per_look, est.df) * est.se


def smallest_keepable_gain(rule: Rule, noise: Noise, best_runs: int) -> float:
    """What a candidate must gain, over two runs, to be kept against a best of `best_runs` runs."""
    se = noise.sigma * math.sqrt(1 / 2 + 1 / best_runs)
    return keep_bound(rule, Estimate(gain=0.0, se=se, df=noise.df, runs=2, best_runs=best_runs))


def judge(rule: Rule, est: Estimate) -> str:
    """KEEP, DISCARD or MORE (run the candidate on its next seed) for the runs so far."""
    if est.gain <= rule.min_delta:
        return DISCARD
    if est.runs >= 2 and est.gain > keep_bound(rule, est):
        return KEEP
    return DISCARD if est.runs >= rule.max_runs else MORE


def judge_in_window(rule: Rule, est: Estimate) -> str:
    """KEEP or DISCARD for a candidate `judge` would keep, against the best's runs of its window: the same
    test, with no further runs to ask for."""
    return KEEP if judge(rule, est) == KEEP else DISCARD
