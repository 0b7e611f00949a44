"""A night's limits are totals: `--max-experiments`, `--hours` and `--max-agent-usd` count every invocation of its tag.

What counts, from the ledger alone:
- an experiment is a proposal of the agent: every `experiment` row, whatever became of it
  (kept, discarded, failed, cancelled, or rejected as an invalid diff: the agent was paid
  for each). Baseline runs, confirmation runs and the morning's reruns are the runner's own
  and do not count.
- an hour is wall time the night's runner ran: the sum over invocations from start to end
  (to the last heartbeat for one that was killed, see runner.core.heartbeat). The time between a
  stop and a resume does not count, nor does preparing data or images before a start.
- a dollar is what the agent's proposals cost, as recorded with each (the API's usage, priced by
  the agent; a coding agent's own report); a proposal already under way when the limit is
  reached (one per GPU at most) is still made and run.

A resume may pass new limits: a limit given replaces the night's (it is still a total,
counted from the night's first start); a limit left out is the one the night last ran with.
Work owed by a killed invocation (an experiment in flight, a candidate awaiting its next
run) was counted when it was proposed, so it is still finished once `--max-experiments` is
reached; `--hours` starts nothing once spent. A resume with nothing left to do ends at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from runner.core.figures import agent_usd, night_settings
from runner.core.heartbeat import ran_seconds
from runner.core.ledger import EXPERIMENT, Ledger
from runner.core.settings import Settings


def proposals(ledger: Ledger) -> int:
    """The agent's proposals so far in the night (what `--max-experiments` counts)."""
    return len(ledger.experiments(kinds=[EXPERIMENT]))


def seconds_run(ledger: Ledger, now: datetime | None = None) -> float:
    """Wall seconds the night's invocations ran so far (what `--hours` counts)."""
    now = now or datetime.now(timezone.utc)
    return sum(ran_seconds(night, now) for night in ledger.nights())


@dataclass(frozen=True)
class NightLimits:
    hours: float | None  # None: no limit
    max_experiments: int | None
    max_agent_usd: float | None = None

    @classmethod
    def of(cls, settings: Settings, ledger: Ledger) -> NightLimits:
        """The limits given now, else those the night last ran with."""
        recorded = night_settings(ledger)
        return cls(
            hours=settings.hours if settings.hours is not None else recorded.get("hours"),
            max_experiments=(settings.max_experiments if settings.max_experiments is not None
                             else recorded.get("max_experiments")),
            max_agent_usd=(settings.max_agent_usd if settings.max_agent_usd is not None
                           else recorded.get("max_agent_usd")),
        )

    def agent_budget_spent(self, ledger: Ledger) -> bool:
        """Whether the agent has cost what `--max-agent-usd` allows (False: no such limit)."""
        return self.max_agent_usd is not None and agent_usd(ledger) >= self.max_agent_usd

    def seconds_left(self, ledger: Ledger) -> float | None:
        """Wall seconds the night may still run (None: no `--hours`)."""
        return None if self.hours is None else self.hours * 3600 - seconds_run(ledger)

    def proposals_left(self, ledger: Ledger) -> int | None:
        """Proposals the agent may still make (None: no `--max-experiments`)."""
        return None if self.max_experiments is None else self.max_experiments - proposals(ledger)

    def spent(self, ledger: Ledger, tag: str) -> str | None:
        """One sentence when a resume would have nothing to do under these limits, else None."""
        seconds = self.seconds_left(ledger)
        if seconds is not None and seconds <= 0:
            return (f"night {tag} has run its {self.hours:g} hours (--hours {self.hours:g}, every start "
                    f"counted); pass a larger --hours to go on.")
        owed = ledger.unfinished() or ledger.undecided()
        left = self.proposals_left(ledger)
        if left is not None and left <= 0 and not owed:
            return (f"night {tag} has made its {proposals(ledger)} experiments (--max-experiments "
                    f"{self.max_experiments}, every start counted); pass a larger --max-experiments to go on.")
        if self.agent_budget_spent(ledger) and not owed:
            return (f"night {tag}'s agent has cost ${agent_usd(ledger):.2f} of its ${self.max_agent_usd:g} "
                    f"(--max-agent-usd, every start counted); pass a larger --max-agent-usd to go on.")
        return None
