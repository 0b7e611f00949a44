"""`autoresearch verify`: the night's total gain measured again, on seeds the night never used.

Every kept change was selected because its estimate cleared the bar, so the gains the
night recorded tend to overstate what it found (the winner's curse), and they add up
estimates made against different bests. Verify reruns the night's best (its last kept
change) and the baseline on N fresh harness seeds, the same seeds for both, one pair
after the other so that a machine slowing down hits both alike; every run is a `rerun`
row of the ledger. The gain is mean(baseline) − mean(best) with a Student-t interval
from the within-code spread of these fresh runs alone: nothing selected them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from runner.core import decision
from runner.core.decision import KEEP
from runner.core.errors import UserError
from runner.core.figures import baseline_mean
from runner.core.ledger import BASELINE, EXPERIMENT, Experiment, Ledger
from runner.core.runs import flag_disturbed
from runner.morning import rerun as reruns
from sandbox.spec import Backend

FIRST_SEED = 1000  # far above the seeds a night uses (0 .. max_runs, plus reruns of disturbed ones)
LEVEL = 0.95


class VerifyFailed(UserError):
    """Too few of the fresh runs finished to estimate anything (one sentence for the user)."""


@dataclass(frozen=True)
class FreshRun:
    rerun_id: str
    target_id: str  # the row rerun: the baseline or the best
    seed: int
    val_bpb: float | None
    left_out: str | None  # why it does not count (its failure, or how it was disturbed); None: it counts

    @classmethod
    def of(cls, row: Experiment) -> FreshRun:
        why = None if row.counts else (row.disturbed or row.status)
        return cls(row.id, row.target_id, row.seed, row.val_bpb, why)


@dataclass(frozen=True)
class Verification:
    best_id: str
    best_description: str
    baseline_id: str
    runs: tuple[FreshRun, ...]  # in the order they ran: baseline, best, baseline, best, ...
    claimed: float | None  # the night's own figure: baseline mean minus the best's decided value
    gain: float
    low95: float
    high95: float
    se: float
    df: int

    def values(self, target_id: str) -> list[float]:
        return _counted(self.runs, target_id)

    @property
    def excludes_zero(self) -> bool:
        return self.low95 > 0 or self.high95 < 0

    def line(self) -> str:
        """The sentence a person reads."""
        verdict = ("the interval excludes 0: the night's best is better than the baseline" if self.low95 > 0 else
                   "the interval excludes 0: the night's best is worse than the baseline" if self.high95 < 0 else
                   "the interval includes 0: these runs cannot tell the night's best from the baseline")
        return (f"the night improved val_bpb by {self.gain:.6f} (95 % interval [{self.low95:.6f}, "
                f"{self.high95:.6f}]); {verdict}.")

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero, "line": self.line()}


def _counted(runs: tuple[FreshRun, ...], target_id: str) -> list[float]:
    return [r.val_bpb for r in runs if r.target_id == target_id and r.left_out is None]


def last_kept(ledger: Ledger) -> Experiment | None:
    kept = [r for r in ledger.experiments(kinds=[EXPERIMENT]) if r.decision == KEEP]
    return kept[-1] if kept else None


def fresh_seeds(ledger: Ledger, n: int) -> list[int]:
    """n seeds no row of the ledger ran under (an earlier verify's included), from FIRST_SEED up."""
    used = [r.seed for r in ledger.experiments() if r.seed is not None]
    first = max([FIRST_SEED, *(s + 1 for s in used)])
    return list(range(first, first + n))


RerunFn = Callable[..., reruns.Verdict]


def verify(ledger: Ledger, run_dir: Path, *, runs: int = 3, backend: Backend | None = None,
           rerun: RerunFn = reruns.rerun, on_start: Callable[[str], None] = lambda line: None) -> Verification | None:
    """Rerun the best and the baseline on `runs` fresh seeds each; None when nothing was kept.

    `rerun` runs one row under a seed and records it (runner.morning.rerun.rerun; tests pass a fake).
    """
    best = last_kept(ledger)
    if best is None:
        return None
    baseline = next(r for r in ledger.experiments(kinds=[BASELINE]) if r.counts)
    backend = backend or reruns.open_backend(best.backend or "auto")
    for row in (baseline, best):  # refuse before anything runs
        reruns.check(ledger, run_dir, row.id, backend)
    seeds = fresh_seeds(ledger, runs)
    done: dict[str, list[str]] = {baseline.id: [], best.id: []}
    total = 2 * len(seeds)
    for seed in seeds:
        for row in (baseline, best):
            prefix = f"[{sum(map(len, done.values())) + 1}/{total}] "
            verdict = rerun(ledger, run_dir, row.id, exact=False, seed=seed, backend=backend,
                            on_start=lambda line, prefix=prefix: on_start(prefix + line))
            done[row.id].append(verdict.rerun_id)
    return _measure(ledger, best, baseline, done)


def _measure(ledger: Ledger, best: Experiment, baseline: Experiment, done: dict[str, list[str]]) -> Verification:
    """The gain and its interval from the fresh runs that count (disturbed ones flagged and left out)."""
    flagged = {row.id: row for ids in done.values() for row in flag_disturbed(ledger, [ledger.get(i) for i in ids])}
    runs = tuple(FreshRun.of(flagged[i]) for pair in zip(*done.values()) for i in pair)
    values = {key: _counted(runs, key) for key in done}
    try:
        noise = decision.pooled_noise(list(values.values()))
        if not all(values.values()):
            raise ValueError("one code has no run that counts")
    except ValueError:
        left = sum(r.left_out is not None for r in runs)
        raise VerifyFailed(f"{left} of the {len(runs)} fresh runs failed or were disturbed, too many to "
                           "estimate the gain; see `autoresearch list` and run verify again.") from None
    est = decision.estimate(values[best.id], values[baseline.id], noise)
    low, high = est.interval(LEVEL)
    base = baseline_mean(ledger)
    return Verification(
        best_id=best.id, best_description=best.description, baseline_id=baseline.id, runs=runs,
        claimed=base - best.decision_value if base is not None and best.decision_value is not None else None,
        gain=est.gain, low95=low, high95=high, se=est.se, df=est.df,
    )
