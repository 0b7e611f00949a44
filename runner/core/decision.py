"""The keep rule: keep a change only when it replicates, and say how sure we are (DESIGN §3.7).

A run's val_bpb is the code's true value plus the seed's noise (initialisation and data
order). A candidate runs on the same sequence of harness seeds as the best, so each of
its runs has a *partner*: the best's run on the same seed. Two estimates of its gain
follow, and docs/decisions.md says from which measurements each earns its place:

- **paired**: the mean of the differences d = partner − candidate, with the standard
  error of those differences' own spread (Student-t, pairs − 1 degrees of freedom).
  A change that keeps the runs coupled (a learning rate, a schedule constant: most of
  what agents propose) moves a seed's value far less than a new seed does, so this
  sees gains many times smaller than σ(seed). It assumes nothing about how coupled a
  candidate is: its error comes from the candidate's own differences, so it is exact
  for any candidate, and weak only for lack of pairs (no keep before 3).
- **unpaired**: the mean of the best's runs minus the candidate's, with standard error
  σ̂·√(1/n + 1/m), σ̂ the seed noise pooled over every code the night ran more than once
  (many degrees of freedom). A change that decouples the runs (a new shape, a new
  initialisation) gains nothing from pairing, and this test serves it.

After each run: **discard** when the estimated gain (paired where runs have partners)
is not above `min_delta`, so a clear loser costs one run; **keep** when either
test clears its bar at this look; else run the next seed, up to `max_runs`.

False keeps: the night's α per candidate is split between the two tests (`paired_share`)
and, within each, over the looks at which it may keep (Bonferroni), so by the union bound
an effect-free change, coupled or not, is kept with probability at most α, and a night
of E experiments expects at most E·α false keeps (0.5 for 100 at the default α).

That bound assumes the machine is the same all night. It is not always (other load, a GPU
warming up), so a keep must hold a second time against the best's train.py run again on
the candidate's seeds in its own window (`judge_in_window`), where a shared drift cancels.
Pure functions only: the judge owns the state.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import optimize, stats

from runner.core.ledger import Decision

KEEP, DISCARD = Decision.KEEP, Decision.DISCARD
MORE = "more"  # ambiguous: run the candidate on the next seed

PAIRED_MIN_RUNS = 3  # a paired test on fewer pairs (1 df) has no power worth its share of α
POWER = 0.8  # the power at which the smallest detectable gain is quoted


@dataclass(frozen=True)
class Rule:
    """The keep rule in force for a night (settings; printed and stored)."""

    alpha: float = 0.005  # chance that an effect-free change is kept: 100 experiments, ≤ 0.5 false keeps
    max_runs: int = 4  # runs of a candidate at most (seeds 0..max_runs-1)
    min_delta: float = 0.0  # smallest estimated gain (bpb) worth keeping, on top of the statistics
    paired_share: float = 0.8  # of α, spent on the paired test; the rest on the unpaired one

    def unpaired_looks(self) -> range:
        """The candidate run counts at which the unpaired test may keep."""
        return range(2, self.max_runs + 1)

    def paired_looks(self) -> range:
        """The pair counts at which the paired test may keep (none when max_runs < PAIRED_MIN_RUNS)."""
        return range(PAIRED_MIN_RUNS, self.max_runs + 1)

    @property
    def alpha_unpaired(self) -> float:
        """The unpaired test's α at each of its looks (all of α when the paired test has no look)."""
        share = 1.0 if not self.paired_looks() else 1 - self.paired_share
        return self.alpha * share / len(self.unpaired_looks())

    @property
    def alpha_paired(self) -> float:
        looks = self.paired_looks()
        return self.alpha * self.paired_share / len(looks) if looks else 0.0


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
    """The gain of a candidate over the best (bpb; positive means better) and its uncertainty.

    `gain`, `se`, `df` are the unpaired estimate; `paired_gain` and `paired_se` the mean and
    standard error of the differences on matched seeds (None with fewer than one or two pairs).
    """

    gain: float
    se: float
    df: int
    runs: int  # candidate runs
    best_runs: int
    pairs: int = 0  # candidate runs with a partner (the best's run on the same seed)
    paired_gain: float | None = None
    paired_se: float | None = None

    @property
    def fully_paired(self) -> bool:
        return self.pairs == self.runs

    @property
    def headline(self) -> float:
        """The gain the futility stop acts on: paired where runs have partners (far less noisy when
        the runs stay coupled), else unpaired."""
        return self.paired_gain if self.paired_gain is not None else self.gain

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The two-sided Student-t interval of the unpaired gain."""
        half = t_quantile(0.5 + level / 2, self.df) * self.se
        return self.gain - half, self.gain + half

    def paired_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        if self.paired_se is None or self.pairs < 2:
            return None
        half = t_quantile(0.5 + level / 2, self.pairs - 1) * self.paired_se
        return self.paired_gain - half, self.paired_gain + half

    def record(self) -> dict:
        low, high = self.interval()
        paired = self.paired_interval() or (None, None)
        return {**asdict(self), "low95": low, "high95": high, "paired_low95": paired[0], "paired_high95": paired[1]}


def estimate(candidate: Sequence[float], best: Sequence[float], noise: Noise,
             differences: Sequence[float] = ()) -> Estimate:
    """The candidate's gain over the best from their runs; `differences` are partner − candidate
    on the seeds both have (one per candidate run that has a partner)."""
    gain = statistics.fmean(best) - statistics.fmean(candidate)
    se = noise.sigma * math.sqrt(1 / len(candidate) + 1 / len(best))
    paired_gain = statistics.fmean(differences) if differences else None
    paired_se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
    return Estimate(gain=gain, se=se, df=noise.df, runs=len(candidate), best_runs=len(best),
                    pairs=len(differences), paired_gain=paired_gain, paired_se=paired_se)


def unpaired_bound(rule: Rule, est: Estimate) -> float | None:
    """The unpaired gain a candidate must exceed at this look (None: this test cannot keep here)."""
    if est.runs not in rule.unpaired_looks():
        return None
    return t_quantile(1 - rule.alpha_unpaired, est.df) * est.se


def paired_bound(rule: Rule, est: Estimate) -> float | None:
    """The paired gain a candidate must exceed at this look (None: this test cannot keep here)."""
    if not est.fully_paired or est.pairs not in rule.paired_looks():
        return None
    return t_quantile(1 - rule.alpha_paired, est.pairs - 1) * est.paired_se


def passes(rule: Rule, est: Estimate) -> bool:
    """Whether either test keeps the candidate at this look."""
    unpaired, paired = unpaired_bound(rule, est), paired_bound(rule, est)
    return ((unpaired is not None and est.gain > unpaired)
            or (paired is not None and est.paired_gain > paired))


def keep_bound(rule: Rule, est: Estimate) -> float | None:
    """The bar the headline gain had to clear at this look: the paired test's where it applied,
    else the unpaired one's (None before any test may keep)."""
    paired = paired_bound(rule, est)
    return paired if paired is not None else unpaired_bound(rule, est)


def futile(rule: Rule, est: Estimate) -> bool:
    """Whether the candidate is out of play: its gain so far is not above `min_delta`."""
    return est.headline <= rule.min_delta


def judge(rule: Rule, est: Estimate) -> str:
    """KEEP, DISCARD or MORE (run the candidate on its next seed) for the runs so far."""
    if futile(rule, est):
        return DISCARD
    if passes(rule, est):
        return KEEP
    return DISCARD if est.runs >= rule.max_runs else MORE


def judge_in_window(rule: Rule, est: Estimate) -> str:
    """KEEP or DISCARD for a candidate `judge` would keep, against the best's runs of its window: the same
    test, with no further runs to ask for."""
    return KEEP if judge(rule, est) == KEEP else DISCARD


# -- what a night can see ---------------------------------------------------------------------

def _gain_at_power(critical: float, df: int, se: float, power: float) -> float:
    """The true gain whose one-sided t statistic (gain/se, df) clears `critical` with probability `power`."""
    if se == 0:
        return 0.0
    def shortfall(g: float) -> float:
        return float(stats.nct.sf(critical, df, g / se)) - power
    high = se * (critical + 10.0)
    while shortfall(high) < 0:  # few degrees of freedom: heavy tails, the gain must be many times the bar
        if high > se * 1e9:
            return math.inf
        high *= 4
    return float(optimize.brentq(shortfall, 0.0, high, xtol=se * 1e-6))


def detectable_gain(rule: Rule, noise: Noise, best_runs: int, *, sigma_paired: float | None = None,
                    power: float = POWER) -> float:
    """The smallest true gain kept with probability `power` at the last look (max_runs runs).

    Unpaired (the default) against `best_runs` runs of the best with the night's pooled noise;
    with `sigma_paired` (the spread of one difference on matched seeds), by the paired test.
    Quoted at the last look alone: the earlier looks add a little power and the futility stop
    takes a little, so docs/decisions.md checks these figures against the simulated rule.
    """
    n = rule.max_runs
    if sigma_paired is not None:
        if not rule.paired_looks():
            return math.inf
        critical = t_quantile(1 - rule.alpha_paired, n - 1)
        return _gain_at_power(critical, n - 1, sigma_paired / math.sqrt(n), power)
    critical = t_quantile(1 - rule.alpha_unpaired, noise.df)
    return _gain_at_power(critical, noise.df, noise.sigma * math.sqrt(1 / n + 1 / best_runs), power)
