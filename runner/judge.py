"""Deciding finished experiments against the best, which only a keep advances (DESIGN §3.7).

The rule itself is in `runner.decision`; this holds the state it is applied to
(the best, the threshold of the night) and writes each decision to the ledger.
Several workers finish experiments at once, so deciding is serialised: each
experiment is compared with the best at the moment it is decided.
"""

from __future__ import annotations

import threading

import structlog

from runner import decision
from runner.ledger import BUILT, CONFIRM, DONE, EXPERIMENT, FAILURES, Experiment
from runner.proposals import Best
from runner.records import Records

log = structlog.get_logger(__name__)

CONFIRM_SEED = 1  # harness seed of confirmation runs (experiments run under the harness's default seed)


class Judge:
    def __init__(self, records: Records, rule: decision.Rule, threshold: float, best: Best) -> None:
        self.records = records
        self.ledger = records.ledger
        self.rule = rule
        self.threshold = threshold
        self._best = best
        self._lock = threading.Lock()

    @property
    def best(self) -> Best:
        with self._lock:
            return self._best

    def after(self, exp_id: str, *, may_confirm: bool = True) -> Experiment | None:
        """Decide a row that just ended; returns a confirmation run to do next, if one is needed."""
        row = self.ledger.get(exp_id)
        if row.kind == EXPERIMENT and row.status == DONE:
            return self._decide(row, may_confirm)
        if row.kind == CONFIRM and row.status != "cancelled":
            self._decide_confirmed(row)
        return None

    def settle_undecided(self) -> list[Experiment]:
        """Resume: decide rows that finished just before a kill; returns confirmations to run."""
        runs = []
        for row in self.ledger.undecided():
            confirm = self.ledger.confirmation_of(row.id)
            if confirm is None or confirm.status == "cancelled":
                runs.extend(filter(None, [self._decide(row, may_confirm=True)]))
            elif confirm.status in (DONE, *FAILURES):
                self._decide_confirmed(confirm)
            # else: the confirmation is itself owed, and decides the row when it ends
        return runs

    def _decide(self, row: Experiment, may_confirm: bool) -> Experiment | None:
        with self._lock:
            best = self._best
            keep = decision.beats(row.val_bpb, best.value, self.threshold)
            if not keep or not self.rule.confirm:
                self._settle(row, decision.KEEP if keep else decision.DISCARD, row.val_bpb, best)
                return None
        if not may_confirm:
            return None  # left undecided: the next resume confirms it
        log.info("experiment.candidate", exp=row.id, val_bpb=row.val_bpb, best=best.value, threshold=self.threshold)
        return self.records.add(kind=CONFIRM, status=BUILT, train_py=self.records.train_py(row), target_id=row.id,
                                parent_id=row.parent_id, image=row.image, seed=CONFIRM_SEED, diff=row.diff,
                                description=f"confirm {row.id} (seed {CONFIRM_SEED})")

    def _decide_confirmed(self, confirm: Experiment) -> None:
        target = self.ledger.get(confirm.target_id)
        with self._lock:
            best = self._best
            if confirm.status == DONE:
                verdict, value = decision.decide_confirmed(target.val_bpb, confirm.val_bpb, best.value, self.threshold)
            else:  # the confirmation failed: nothing confirms the change
                verdict, value = decision.DISCARD, target.val_bpb
            self._settle(target, verdict, value, best)

    def _settle(self, row: Experiment, verdict: str, value: float, best: Best) -> None:
        """Record the decision; a keep makes this row the best (the caller holds the lock)."""
        self.ledger.decide(row.id, verdict, value=value, best_before=best.value, threshold=self.threshold)
        if verdict == decision.KEEP:
            self._best = Best(row.id, value, self.records.train_py(row))
        log.info("experiment.decided", exp=row.id, decision=verdict, value=value, best_before=best.value,
                 threshold=self.threshold)
