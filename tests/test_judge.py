"""Which runs of one code count: the disturbed rule applied to the ledger (runner.core.runs.flag_disturbed)."""

import pytest

from runner.core.ledger import BASELINE
from runner.core.runs import flag_disturbed
from sandbox.status import Status


def finish(ledger, steps):
    """A baseline run that ended with `steps` training steps."""
    row = ledger.add(kind=BASELINE, status=Status.BUILT)
    for status in (Status.TRAINING, Status.EVALUATING):
        ledger.transition(row.id, status)
    ledger.transition(row.id, Status.DONE, val_bpb=1.0, num_steps=steps)


def flags(ledger):
    return [r.disturbed for r in flag_disturbed(ledger, ledger.experiments(kinds=[BASELINE]))]


def test_a_run_far_short_of_the_other_is_disturbed(ledger):
    finish(ledger, 100)
    finish(ledger, 85)
    assert flags(ledger) == [None, "trained 85 steps where the same code usually trains 100"]


@pytest.mark.parametrize("steps", [(100, 91), (10, 8)], ids=["9 % short", "2 steps short"])
def test_a_short_fall_within_the_tolerance_is_not(ledger, steps):
    """Under 10 % short, or under 3 steps (a short CPU run's steps jitter by one or two)."""
    for count in steps:
        finish(ledger, count)
    assert flags(ledger) == [None, None]


def test_one_fast_run_does_not_make_every_later_run_look_disturbed(ledger):
    """A busy 2-core machine: the first run trained 13 steps, every later one 10. Measured against the
    fastest run, each rerun would be flagged again and the night would never get its counted runs."""
    finish(ledger, 13)
    finish(ledger, 10)
    assert flags(ledger)[1] is not None  # of two runs, the faster one is the usual pace
    finish(ledger, 10)
    finish(ledger, 10)
    rows = flag_disturbed(ledger, ledger.experiments(kinds=[BASELINE]))
    assert [r.counts for r in rows] == [True, False, True, True]


def test_a_flag_stays_once_given(ledger):
    """A decision made on a run's flag must read the same when the ledger is looked at again (resume)."""
    finish(ledger, 20)
    finish(ledger, 10)
    assert flags(ledger)[1] is not None
    for _ in range(3):
        finish(ledger, 10)  # the usual pace is now 10 steps
    assert flags(ledger) == [None, "trained 10 steps where the same code usually trains 20", None, None, None]


def test_runs_that_did_not_finish_are_neither_flagged_nor_counted_in_the_pace(ledger):
    finish(ledger, 100)
    running = ledger.add(kind=BASELINE, status=Status.BUILT)
    ledger.transition(running.id, Status.TRAINING)
    crashed = ledger.add(kind=BASELINE, status=Status.BUILT)
    ledger.transition(crashed.id, Status.TRAINING)
    ledger.transition(crashed.id, Status.CRASH, num_steps=3)  # counted in the pace, it would make 85 usual
    finish(ledger, 85)
    assert flags(ledger) == [None, None, None, "trained 85 steps where the same code usually trains 100"]
