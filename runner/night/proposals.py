"""Getting the next experiment from the agent: context in, a valid diff (or a rejection) out.

An invalid diff (or a reply without one) is sent back to the agent with the reason, up to
`max_tries` times; then the proposal is recorded `rejected` with the last reason,
so the agent sees its own failure in the history next time (DESIGN §3.5–3.6).
Whatever the agent sends, and whichever agent, no proposal ends the night: a reply
that fails to be read or checked in any way is such a rejection, and what the
agent wrote is recorded as text the ledger can hold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import structlog

from runner.agents.base import Agent, AgentError, Context, HistoryRow, Proposal, Usage
from runner.agents.prompt import ReplyFormatError, harness_api_text
from runner.core.decision import KEEP
from runner.core.diffs import DiffRejected, error_text, validate_and_apply
from runner.core.figures import gain_text, runs_text
from runner.core.ledger import BASELINE, EXPERIMENT, Experiment
from runner.core.settings import project_text
from runner.night.records import PARSE_LOCK, Records
from sandbox.run_dir import RunDir
from sandbox.spec import Phase
from sandbox.status import Status

log = structlog.get_logger(__name__)

LOG_TAIL_BYTES = 16_384  # of the parent's training log: the prompt keeps its last lines


@dataclass(frozen=True)
class Best:
    """What proposals start from: the baseline, then each kept change."""

    exp_id: str
    value: float
    train_py: str


class Proposer:
    def __init__(self, agent: Agent, records: Records, root: Path, max_tries: int, machine: str = "") -> None:
        self.agent = agent
        self.records = records
        self.max_tries = max_tries
        self.machine = machine  # where each run runs and its budget, as the agent is told
        self._program = project_text(root, "program.md")
        self._harness_api = harness_api_text(project_text(root, "prepare.py"))

    def propose(self, parent: Best, baseline_mean: float) -> Experiment | None:
        """A `proposed` row, or None when every try was invalid. Agent errors propagate.

        One proposal at a time (agents need not be thread-safe; see PARSE_LOCK).
        """
        with PARSE_LOCK:
            return self._propose(parent, baseline_mean)

    def _propose(self, parent: Best, baseline_mean: float) -> Experiment | None:
        context = self.context(parent, baseline_mean)
        usage, proposal, reason = Usage(), None, ""
        for attempt in range(1, self.max_tries + 1):
            proposal, train_py, reason = self._attempt(context, parent)
            usage = _add_usage(usage, proposal.usage)
            if train_py is not None:
                return self._record(Status.PROPOSED, train_py, parent, proposal.description, proposal.diff, attempt, usage)
            log.info("proposal.rejected", attempt=attempt, reason=reason)
            context = dataclasses.replace(context, feedback=reason)
        self._record(Status.REJECTED, None, parent, proposal.description, proposal.diff, self.max_tries, usage,
                     reject_reason=reason)
        return None

    def _attempt(self, context: Context, parent: Best) -> tuple[Proposal, str | None, str]:
        """One proposal of the agent: (the proposal, its patched train.py or None, why it is refused)."""
        try:
            proposal = self.agent.propose(context)
        except ReplyFormatError as exc:  # a reply without a diff is refused like a diff that does not apply
            return Proposal(exc.description, "", exc.usage), None, exc.reason
        except AgentError:  # no reply (an outage, a misconfiguration): the night's to handle
            raise
        except Exception as exc:  # making or reading the proposal failed on what the reply or train.py held
            error = _storable(error_text(exc))
            log.warning("proposal.unreadable", agent=self.agent.name, error=error)
            return Proposal("", ""), None, f"the proposal could not be read ({error})"
        try:
            return proposal, validate_and_apply(proposal.diff, parent.train_py), ""
        except DiffRejected as exc:
            return proposal, None, exc.reason

    def _record(self, status, train_py, parent, description, diff, attempts, usage, **fields) -> Experiment:
        return self.records.add(kind=EXPERIMENT, status=status, train_py=train_py, parent_id=parent.exp_id,
                                description=_storable(description), diff=_storable(diff), agent=self.agent.name,
                                attempts=attempts, **dataclasses.asdict(usage), **fields)

    def context(self, parent: Best, baseline_mean: float) -> Context:
        """What the agent sees: the parent's train.py, the history with deltas, the last failure."""
        ledger = self.records.ledger
        rows = ledger.experiments(kinds=[EXPERIMENT])
        values = {r.id: r.decision_value for r in rows if r.decision == KEEP}
        values.update({r.id: baseline_mean for r in ledger.experiments(kinds=[BASELINE])})
        history = tuple(
            HistoryRow(
                exp_id=r.id,
                description=r.description,
                status=r.decision or r.status,
                val_bpb=r.val_bpb,
                delta=(r.val_bpb - values[r.parent_id]) if r.val_bpb is not None and r.parent_id in values else None,
                params=r.params,
                measured=_measured(r),
                reported=_reported(r),
                verdict=_verdict(r),
                error=r.error or "",
            )
            for r in rows
        )
        failures = [r for r in rows if r.status.is_failure() and r.log_tail]
        parent_log = RunDir(self.records.dir(parent.exp_id)).log(Phase.TRAIN)
        return Context(
            program=self._program,
            train_py=parent.train_py,
            harness_api=self._harness_api,
            history=history,
            best_val_bpb=parent.value,
            last_failure_log=failures[-1].log_tail if failures else "",
            parent_log=parent_log.read_text(errors="replace")[-LOG_TAIL_BYTES:] if parent_log.is_file() else "",
            machine=self.machine,
            seed=len(rows),
        )


def _measured(row: Experiment) -> dict[str, float]:
    """What the host and the harness measured of a run."""
    figures = {"train_s": row.train_seconds, "eval_s": row.eval_seconds,
               "peak_gpu_gib": row.peak_gpu_memory_bytes / 2**30 if row.peak_gpu_memory_bytes else None}
    return {key: value for key, value in figures.items() if value is not None}


def _reported(row: Experiment) -> dict[str, float]:
    """What a run's train.py reported about itself (untrusted; shown marked)."""
    said = row.reported
    figures = {"steps": said.get("num_steps"), "tokens_per_s": said.get("tokens_per_second"),
               "mfu_percent": said.get("mfu_percent")}
    return {key: value for key, value in figures.items() if value is not None}


def _verdict(row: Experiment) -> str:
    """The keep rule's verdict: its estimate of the gain over the best, and what a keep needed at that look."""
    if row.decision is None or not row.estimate:
        return ""
    needed = f"; a keep needed > {row.threshold:.4f}" if row.threshold is not None else ""
    return f"{row.decision}: gain {gain_text(row.estimate)} over {runs_text(row.estimate)}{needed}"


def _add_usage(a: Usage, b: Usage) -> Usage:
    return Usage(**{k: v + getattr(b, k) for k, v in dataclasses.asdict(a).items()})


def _storable(text: object) -> str:
    """What the agent sent, as text SQLite and a UTF-8 file can hold (a lone surrogate is kept as its escape)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")
