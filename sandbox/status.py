"""Where an experiment stands and how a run ended: one type, and the questions every part asks of it.

DESIGN §3.3. The sandbox, the ledger, the judge, the views and the agents all ask the same
few questions (has it finished? did it fail? was the failure its own doing? may it move
there?); they ask them through these predicates, never through lists of names of their own.
"""

from __future__ import annotations

import enum

import contract


class Status(enum.StrEnum):
    # the lifecycle of an experiment
    PROPOSED = "proposed"
    REJECTED = "rejected"  # its diff was invalid
    BUILT = "built"
    TRAINING = "training"
    EVALUATING = "evaluating"
    DONE = "done"  # both phases ran and phase 2's result was parsed
    # how one run (a phase) ended, and the experiment with it when it failed
    OK = "ok"  # the process exited 0: a run's status only, never an experiment's
    CRASH = "crash"  # non-zero exit (or the infrastructure failed it)
    TIMEOUT = "timeout"  # the host deadline was hit
    OOM = "oom"  # host memory limit
    GPU_OOM = "gpu_oom"  # the NVML watchdog killed it above the GPU memory cap
    EXPORT_FAILED = "export_failed"  # phase 2: no usable exported model
    PROBE_FAILED = "probe_failed"  # phase 2: the causality probe failed
    OVER_BUDGET = "over_budget"  # phase 1 trained (or would have) outside its time budget
    CANCELLED = "cancelled"  # the runner was stopped (Ctrl-C) while it ran

    def is_failure(self) -> bool:
        """A terminal failure, a cancel included."""
        return self in _FAILURES

    def is_fault(self) -> bool:
        """A failure of the code's own doing: every failure but a cancel (which says nothing of the code)."""
        return self.is_failure() and self is not Status.CANCELLED

    def is_conclusive(self) -> bool:
        """Done, or failed by its own doing: what says something about the code (a cancel or owed work does not)."""
        return self is Status.DONE or self.is_fault()

    def is_unfinished(self) -> bool:
        """Owed work: a resumed night runs it (again) from the start."""
        return self in _UNFINISHED

    def is_finished(self) -> bool:
        return self not in _UNFINISHED and self is not Status.OK

    def can_move_to(self, other: Status) -> bool:
        """Whether the lifecycle allows `self -> other`."""
        return other in _MOVES.get(self, frozenset())

    @property
    def phrase(self) -> str:
        """How a row with this status ended, as the verb of a sentence ("crashed", "has not run yet")."""
        return _PHRASES[self]

    @classmethod
    def where(cls, predicate) -> tuple[Status, ...]:
        """The statuses a predicate holds for, e.g. `Status.where(Status.is_unfinished)` for a query."""
        return tuple(s for s in cls if predicate(s))


_FAILURES = frozenset({Status.CRASH, Status.TIMEOUT, Status.OOM, Status.GPU_OOM, Status.EXPORT_FAILED,
                       Status.PROBE_FAILED, Status.OVER_BUDGET, Status.CANCELLED})
_UNFINISHED = frozenset({Status.PROPOSED, Status.BUILT, Status.TRAINING, Status.EVALUATING})
_MOVES: dict[Status, frozenset[Status]] = {
    # -> crash before training: the infrastructure (image build, backend) kept failing.
    Status.PROPOSED: frozenset({Status.REJECTED, Status.BUILT, Status.CRASH}),
    Status.BUILT: frozenset({Status.TRAINING, Status.CRASH}),
    # training -> training and evaluating -> training: a resumed or requeued run starts over.
    Status.TRAINING: frozenset({Status.TRAINING, Status.EVALUATING, *_FAILURES}),
    Status.EVALUATING: frozenset({Status.TRAINING, Status.DONE, *_FAILURES}),
}
_PHRASES = {
    Status.PROPOSED: "has not run yet", Status.BUILT: "has not run yet",
    Status.TRAINING: "has not finished (it was training)",
    Status.EVALUATING: "has not finished (it was being evaluated)",
    Status.REJECTED: "was rejected (its diff was invalid)", Status.DONE: "finished", Status.OK: "exited cleanly",
    Status.CRASH: "crashed", Status.TIMEOUT: "timed out", Status.OOM: "ran out of host memory",
    Status.GPU_OOM: "went over its GPU memory cap", Status.EXPORT_FAILED: "failed to export its model",
    Status.PROBE_FAILED: "failed the causality probe", Status.OVER_BUDGET: "went over its time budget",
    Status.CANCELLED: "was cancelled",
}
# A phase that crashed with one of the harness's exit codes failed in the way the code names.
EXIT_STATUSES = {contract.EXIT_EXPORT_FAILED: Status.EXPORT_FAILED, contract.EXIT_PROBE_FAILED: Status.PROBE_FAILED,
                 contract.EXIT_GPU_OOM: Status.GPU_OOM}
