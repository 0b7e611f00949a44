"""The one status type: what each predicate says, and the lifecycle it allows."""

from sandbox.status import EXIT_STATUSES, Status

import contract


def test_every_status_reads_as_a_phrase_and_prints_as_its_name():
    for status in Status:
        assert status.phrase and "_" not in status.phrase
        assert f"{status}" == str(status) == status.value  # what a ledger stores and a sentence shows


def test_failures_faults_and_owed_work():
    failures = set(Status.where(Status.is_failure))
    assert Status.CANCELLED in failures and Status.OVER_BUDGET in failures
    assert set(Status.where(Status.is_fault)) == failures - {Status.CANCELLED}
    assert set(Status.where(Status.is_unfinished)) == {Status.PROPOSED, Status.BUILT, Status.TRAINING,
                                                        Status.EVALUATING}
    assert set(Status.where(Status.is_conclusive)) == {Status.DONE} | failures - {Status.CANCELLED}
    for status in Status:  # every experiment status is owed or finished, never both; a run's OK is neither
        assert status is Status.OK or status.is_unfinished() != status.is_finished()
    assert not Status.OK.is_finished() and not Status.OK.is_unfinished() and not Status.OK.is_failure()


def test_the_lifecycle_only_moves_forward_or_starts_a_run_over():
    assert Status.PROPOSED.can_move_to(Status.BUILT) and Status.PROPOSED.can_move_to(Status.REJECTED)
    assert Status.TRAINING.can_move_to(Status.TRAINING)  # a resumed run starts over
    assert Status.EVALUATING.can_move_to(Status.DONE)
    assert not Status.TRAINING.can_move_to(Status.DONE)  # never scored without its evaluation
    assert not Status.PROPOSED.can_move_to(Status.TRAINING)  # never run without an image
    for finished in Status.where(Status.is_finished):
        assert not any(finished.can_move_to(other) for other in Status)  # terminal


def test_the_harness_exit_codes_name_failures():
    assert set(EXIT_STATUSES) == {contract.EXIT_EXPORT_FAILED, contract.EXIT_PROBE_FAILED, contract.EXIT_GPU_OOM}
    assert all(status.is_fault() for status in EXIT_STATUSES.values())
    assert contract.EXIT_CRASH not in EXIT_STATUSES  # a plain crash stays a crash
