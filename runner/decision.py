"""The noise-aware keep/discard rule (DESIGN §3.7).

A change is kept only when it beats the best by more than the measured noise:
`val_bpb < best - max(min_delta, k * sigma)`, where sigma is the sample standard
deviation of the night's baseline runs. A short training run is noisy (step
counts depend on timing, initialisation on the seed), so without this margin a
night would keep lucky draws. Pure functions only: the loop owns the state.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

KEEP = "keep"
DISCARD = "discard"


@dataclass(frozen=True)
class Rule:
    """The thresholds in force for a night (settings; printed and stored)."""

    k: float = 2.0
    min_delta: float = 0.001
    confirm: bool = False  # confirm a candidate keep with a second run under another seed


@dataclass(frozen=True)
class Noise:
    """What the baseline runs measured."""

    mean: float
    sigma: float
    runs: int


def measure_noise(values: Sequence[float]) -> Noise:
    """Mean and sample standard deviation of the baseline's val_bpb (sigma 0 for one run)."""
    if not values:
        raise ValueError("the noise needs at least one baseline run")
    sigma = statistics.stdev(values) if len(values) > 1 else 0.0
    return Noise(mean=statistics.fmean(values), sigma=sigma, runs=len(values))


def threshold(rule: Rule, sigma: float) -> float:
    """How much a change must beat the best by to count."""
    return max(rule.min_delta, rule.k * sigma)


def beats(value: float, best: float, margin: float) -> bool:
    return value < best - margin


def decide(value: float, best: float, margin: float) -> str:
    """keep or discard one measured value against the best."""
    return KEEP if beats(value, best, margin) else DISCARD


def decide_confirmed(first: float, second: float, best: float, margin: float) -> tuple[str, float]:
    """Decision after a confirmation run, and the value the change is credited with.

    Both runs must beat the threshold; the change is credited with their mean,
    which becomes the new best on keep (a better estimate than either run).
    """
    mean = (first + second) / 2
    keep = beats(first, best, margin) and beats(second, best, margin)
    return (KEEP if keep else DISCARD), mean
