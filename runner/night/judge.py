"""Deciding candidates against the best, run by run, from what the ledger holds (DESIGN §3.7).

The rule is in `runner.core.decision`; this applies it to the ledger: a candidate's runs
are its experiment row and its confirmation rows (the same train.py under the next
seeds), the best's runs are every run of the best's code (the baselines, or the kept
experiment and its confirmations), and the noise is pooled from every code run more
than once. Everything is recomputed from the ledger at each look, so a resumed night
decides exactly as an uninterrupted one.

A candidate the rule would keep is kept only after the best's train.py has run again
on the candidate's seeds (reference rows) and the keep holds against those runs too:
the machine may have changed since the best was measured (decision.judge_in_window).

A run that trained far fewer steps than the same code usually does was disturbed (other
load, a throttled GPU): it is flagged, left out of every estimate, and its seed is run
again. Several workers finish runs at once, so deciding is serialised: a candidate is
compared with the best of the moment it is looked at.
"""

from __future__ import annotations

import statistics
import threading
from typing import Callable

import structlog

from runner.core import decision
from runner.core.ledger import BASELINE, CONFIRM, EXPERIMENT, REFERENCE, Experiment
from runner.core.runs import candidate_id, code_key, flag_disturbed, runs_of, seed_index
from runner.night.proposals import Best
from runner.night.records import Records
from sandbox.status import Status

log = structlog.get_logger(__name__)

DISTURBED_RERUNS = 2  # extra runs a candidate may spend on replacing disturbed ones


def by_seed(rows: list[Experiment]) -> dict[int, float]:
    """The mean value of the counted runs on each seed index: a candidate run's partner."""
    values: dict[int, list[float]] = {}
    for row in rows:
        if row.counts:
            values.setdefault(seed_index(row.seed), []).append(row.val_bpb)
    return {seed: statistics.fmean(v) for seed, v in values.items()}


def estimate(counted: list[Experiment], best_rows: list[Experiment], partners: dict[int, float],
             noise: decision.Noise) -> decision.Estimate:
    """A candidate's estimate from its counted runs against the best's counted runs, paired on the seeds
    that have a partner."""
    differences = [partners[seed_index(r.seed)] - r.val_bpb for r in counted if seed_index(r.seed) in partners]
    return decision.estimate([r.val_bpb for r in counted], [r.val_bpb for r in best_rows if r.counts], noise,
                             differences)


def next_seed(rows: list[Experiment]) -> int | None:
    """The first seed of the sequence that none of these rows has counted or is running."""
    taken = {seed_index(r.seed) for r in rows if r.counts or r.status.is_unfinished()}
    return decision.seed_for(next(i for i in range(len(rows) + 1) if i not in taken))


class Judge:
    def __init__(self, records: Records, rule: decision.Rule, best: Best,
                 on_keep: Callable[[Experiment], None] = lambda row: None) -> None:
        self.records = records
        self.ledger = records.ledger
        self.rule = rule
        self._best = best
        self._on_keep = on_keep  # told of every keep, with the decided row (it must not block)
        self._lock = threading.Lock()

    @property
    def best(self) -> Best:
        with self._lock:
            return self._best

    def noise(self) -> decision.Noise:
        """σ pooled over every code with repeats (undisturbed finished runs of the night's kinds)."""
        groups: dict[str, list[float]] = {}
        for row in self.ledger.experiments(kinds=[BASELINE, EXPERIMENT, CONFIRM, REFERENCE], statuses=[Status.DONE]):
            if row.counts:
                groups.setdefault(code_key(row), []).append(row.val_bpb)
        return decision.pooled_noise(list(groups.values()))

    def after(self, exp_id: str, *, may_confirm: bool = True) -> Experiment | None:
        """Look at the candidate of a row that just ended; returns its next run, if it needs one."""
        row = self.ledger.get(exp_id)
        if row.kind not in (EXPERIMENT, CONFIRM, REFERENCE):
            return None
        return self._look(self.ledger.get(candidate_id(row)), may_confirm)

    def settle_undecided(self) -> list[Experiment]:
        """Resume: look at every candidate left undecided by a kill; returns the runs they need next."""
        runs = [self._look(row, may_confirm=True) for row in self.ledger.undecided()]
        return [r for r in runs if r is not None]

    def _look(self, candidate: Experiment, may_confirm: bool) -> Experiment | None:
        if candidate.decision is not None or candidate.status != Status.DONE:
            return None  # decided already, or the experiment itself failed (not a candidate)
        rows = flag_disturbed(self.ledger, runs_of(self.ledger, candidate.id))
        if any(r.status.is_unfinished() for r in rows):
            return None  # a run is owed; it decides when it ends
        failed = [r for r in rows if r.status.is_fault()]
        counted = [r for r in rows if r.counts]
        values = [r.val_bpb for r in counted]
        with self._lock:
            best = self._best
            best_rows = flag_disturbed(self.ledger, runs_of(self.ledger, code_key(self.ledger.get(best.exp_id))))
            references = self._references(candidate, best)
            if any(r.status.is_unfinished() for r in references):
                return None  # a reference run is owed; it decides when it ends
            reference_seed: list[int | None] = []  # the seed a reference run is needed on, if one is
            noise, window = self.noise(), by_seed(references)
            # each run's partner: the best's run on its seed, or where the best has none, its reference run
            partners = window | by_seed(best_rows)
            unpartnered = [r.seed for r in counted if seed_index(r.seed) not in partners]
            if not values:  # its only runs were disturbed: run a seed again
                verdict, est = decision.MORE, None
            else:
                est = estimate(counted, best_rows, partners, noise)
                verdict = decision.DISCARD if failed else decision.judge(self.rule, est)
            if verdict == decision.MORE and len(rows) >= self.rule.max_runs + DISTURBED_RERUNS:
                verdict = decision.DISCARD  # too many of its runs were disturbed to tell
            in_play = est is not None and not failed and not decision.futile(self.rule, est)
            if unpartnered and in_play and verdict != decision.KEEP:  # judged again once paired on every seed
                if len(references) >= self.rule.max_runs + DISTURBED_RERUNS:
                    verdict = decision.DISCARD  # too many reference runs were disturbed to tell
                else:
                    reference_seed = unpartnered[:1]
            if verdict == decision.KEEP:
                missing = [r.seed for r in counted if seed_index(r.seed) not in window]
                if not missing:  # the second test: against the best measured in the candidate's window
                    est = estimate(counted, references, window, noise)
                    verdict = decision.judge_in_window(self.rule, est)
                elif len(references) >= self.rule.max_runs + DISTURBED_RERUNS:
                    verdict = decision.DISCARD  # too many reference runs were disturbed to tell
                else:
                    reference_seed = missing[:1]
            if verdict != decision.MORE and not reference_seed:
                self._settle(candidate, verdict, est, statistics.fmean(values) if values else None)
                return None
        if not may_confirm:
            return None  # left undecided: the next resume asks for the run
        if reference_seed:
            (seed,) = reference_seed
            log.info("experiment.reference", exp=candidate.id, best=best.exp_id, estimate=est.record() if est else None,
                     seed=decision.seed_label(seed))
            return self.records.add(kind=REFERENCE, status=Status.BUILT, train_py=best.train_py,
                                    target_id=candidate.id, parent_id=best.exp_id,
                                    image=self.ledger.get(best.exp_id).image, seed=seed,
                                    description=f"the best ({best.exp_id}) beside {candidate.id} "
                                                f"(seed {decision.seed_label(seed)})")
        seed = next_seed(rows)
        log.info("experiment.ambiguous", exp=candidate.id, estimate=est.record() if est else None, next_seed=seed)
        return self.records.add(kind=CONFIRM, status=Status.BUILT, train_py=self.records.train_py(candidate),
                                target_id=candidate.id, parent_id=candidate.parent_id, image=candidate.image,
                                seed=seed, diff=candidate.diff,
                                description=f"confirm {candidate.id} (seed {decision.seed_label(seed)})")

    def _references(self, candidate: Experiment, best: Best) -> list[Experiment]:
        """The reference runs of the current best beside `candidate` (those of an earlier best do not count)."""
        rows = [r for r in self.ledger.references_of(candidate.id) if r.parent_id == best.exp_id]
        return flag_disturbed(self.ledger, rows)

    def _settle(self, row: Experiment, verdict: str, est: decision.Estimate | None, value: float | None) -> None:
        """Record the decision and its estimate; a keep makes this row the best (the caller holds the lock).

        `value` is the mean of the candidate's counted runs (None when none counted); the best is
        compared by the mean of its counted runs (those of the candidate's window when the keep was
        checked there), which becomes best_before."""
        best_before = value + est.gain if est else self._best.value
        self.ledger.decide(row.id, verdict, value=value, best_before=best_before,
                           threshold=decision.keep_bound(self.rule, est) if est else None,
                           estimate=est.record() if est else {})
        if verdict == decision.KEEP:
            self._best = Best(row.id, value, self.records.train_py(row))
            self._on_keep(self.ledger.get(row.id))
        log.info("experiment.decided", exp=row.id, decision=verdict, value=value, best_before=best_before,
                 estimate=est.record() if est else None)
