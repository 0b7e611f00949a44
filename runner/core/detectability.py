"""What a night could see: the smallest gain the keep rule would keep with 80 % power, and its course.

A night that keeps nothing means something only beside this figure: "kept 0" with a
detectable gain of 0.001 bpb says no change was worth that much; with 0.05 it says the
night could not have told. Two figures, because the rule has two tests
(runner.core.decision): one for a change that keeps the runs coupled, quoted at the spread of
one paired difference typical of this night's candidates (the median over the candidates
with two or more pairs: a description, never used to decide), and one for a change that
decouples them, from the seed noise pooled over the night. Both are recovered from the
estimates the decisions stored, so the course is read from the ledger alone.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from runner.core import decision
from runner.core.ledger import Experiment


@dataclass(frozen=True)
class Detectable:
    decided: int  # decisions seen so far
    unpaired: float | None  # smallest gain kept with 80 % power, a change that decouples the runs (bpb)
    paired: float | None  # the same for a change that keeps them coupled (None before two-pair estimates)
    sigma_paired: float | None  # the spread of one paired difference it assumes (median over candidates)

    def text(self) -> str:
        coupled = ("not measured yet" if self.paired is None
                   else f"{self.paired:.6f} for a change that keeps the runs coupled "
                        f"(paired spread {self.sigma_paired:.6f})")
        decoupled = "-" if self.unpaired is None else f"{self.unpaired:.6f}"
        return f"{coupled}; {decoupled} for a change that decouples them"


def sigma_paired(estimate: dict) -> float | None:
    """The spread of one paired difference behind a stored estimate (None with fewer than 2 pairs)."""
    if estimate.get("paired_se") is None or estimate.get("pairs", 0) < 2:
        return None
    return estimate["paired_se"] * math.sqrt(estimate["pairs"])


def _noise(estimate: dict) -> decision.Noise:
    """The pooled seed noise at a decision, from its unpaired standard error."""
    sigma = estimate["se"] / math.sqrt(1 / estimate["runs"] + 1 / estimate["best_runs"])
    return decision.Noise(sigma=sigma, df=estimate["df"], runs=0)


def course(rule: decision.Rule, start: decision.Noise | None, baseline_runs: int | None,
           decided: list[Experiment]) -> list[Detectable]:
    """The detectable gains at the start of the experiments and after each decision (in decision order)."""
    points = []
    if start is not None and baseline_runs:
        points.append(Detectable(0, decision.detectable_gain(rule, start, baseline_runs), None, None))
    spreads: list[float] = []
    for count, row in enumerate(sorted(decided, key=lambda r: r.decided_at or ""), start=1):
        est = row.estimate
        if not est:
            continue
        spread = sigma_paired(est)
        if spread is not None:
            spreads.append(spread)
        typical = statistics.median(spreads) if spreads else None
        noise = _noise(est)
        points.append(Detectable(
            decided=count,
            unpaired=decision.detectable_gain(rule, noise, est["best_runs"]),
            paired=None if typical is None else decision.detectable_gain(rule, noise, est["best_runs"],
                                                                            sigma_paired=typical),
            sigma_paired=typical))
    return points
