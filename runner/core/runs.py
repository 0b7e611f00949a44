"""Which rows are runs of one train.py, on which seed, and which of them count (DESIGN §3.7).

Every reader of the record needs these rules the same way: the keep rule (runner.night.judge),
the figures of a night and `verify`. A run that trained far fewer steps than the same code
usually does was disturbed (other load, a throttled GPU): it is flagged in the ledger and
counts nowhere.
"""

from __future__ import annotations

import statistics

import structlog

from runner.core.ledger import BASELINE, CONFIRM, REFERENCE, Experiment, Ledger
from sandbox.status import Status

log = structlog.get_logger(__name__)

DISTURBED_SHORTFALL = 0.1  # fewer steps than this share below the same code's usual count: disturbed ...
DISTURBED_MIN_STEPS = 3  # ... and at least this many fewer (a short CPU run's steps jitter by one or two)

def code_key(row: Experiment) -> str:
    """Rows with the same key ran the same train.py: all baselines, an experiment and its confirmations,
    or the reference runs made beside one candidate (the best's train.py, measured in that window)."""
    if row.kind == BASELINE:
        return BASELINE
    if row.kind == REFERENCE:
        return f"{REFERENCE}:{row.target_id}"
    return row.target_id if row.kind == CONFIRM and row.target_id else row.id


def candidate_id(row: Experiment) -> str:
    """The experiment a run was made for: itself, the one it confirms, or the one it is a reference beside."""
    return row.target_id if row.kind in (CONFIRM, REFERENCE) and row.target_id else row.id


def runs_of(ledger: Ledger, key: str) -> list[Experiment]:
    """Every row of one code (a `code_key`), finished or not."""
    if key == BASELINE:
        return ledger.experiments(kinds=[BASELINE])
    return [ledger.get(key), *ledger.confirmations_of(key)]


def seed_index(seed: int | None) -> int:
    """Inverse of decision.seed_for."""
    return 0 if seed is None else seed


def flag_disturbed(ledger: Ledger, rows: list[Experiment]) -> list[Experiment]:
    """Flag the finished runs of one code that trained far fewer steps than the code usually does;
    returns the rows as they are now. Steps are the one comparable figure of throughput
    across seeds of one code (same shapes, same budget).

    "Usually" is the upper median of the finished runs' steps: of two runs the faster one, of
    more the middle one. Against the fastest run instead, one run that happened to be fast (a
    CPU budget's step count varies by a quarter on a busy machine) would make every later run
    of the code look disturbed, and its seeds would be run again until the rerun limit gave up."""
    done = [r for r in rows if r.status == Status.DONE and r.num_steps]
    if not done:
        return rows
    usual = statistics.median_high(r.num_steps for r in done)
    for row in done:
        short = usual - row.num_steps
        if row.disturbed is None and short > DISTURBED_SHORTFALL * usual and short >= DISTURBED_MIN_STEPS:
            reason = f"trained {row.num_steps} steps where the same code usually trains {usual}"
            ledger.update(row.id, disturbed=reason)
            log.warning("experiment.disturbed", exp=row.id, steps=row.num_steps, usual=usual)
    return [ledger.get(r.id) for r in rows]
