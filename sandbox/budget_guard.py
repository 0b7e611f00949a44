"""The training budget enforced from outside train.py's process, by the host's own clock.

Anything inside the process can be patched by train.py, the harness's `Budget` included,
so the host keeps its own account of phase 1:

- **start-up**: from the start of the process until the harness announces the timed budget
  (`contract.BUDGET_START_MARK` on the log, timed when the host reads it). The budget must
  start within the start-up allowance.
- **budget**: from that moment the process has the budget plus the export allowance to exit;
  then the host kills it. Announcing late only moves time into start-up (bounded above);
  announcing early only shortens the run.
- **GPU work outside the budget**: where NVML reports the GPU's utilisation, the busy
  seconds before the announcement (compilation, warm-up steps) and after the budget
  (export) must stay within what honest runs needed, so training hidden in start-up or
  after the budget is caught on the GPU even inside the wall allowances.

Allowances come from measurement: `Allowance.measured` takes the start-up, export and
busy figures of honest runs (the night's baselines) with a margin; before any run is
measured, generous defaults apply. A run that breaks the account ends `over_budget`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from contract import BUDGET_START_MARK

MARGIN, MIN_WALL_S, MIN_BUSY_S = 1.5, 5.0, 3.0  # measured figure x MARGIN, but never less than these
REPLAY_STRETCH = 1.25  # a replayed rerun stops at the recorded step count, which may take a little longer


@dataclass(frozen=True)
class Allowance:
    """What phase 1 may spend outside its training budget."""

    startup_s: float  # wall seconds from process start to the budget's start
    export_s: float  # wall seconds after the budget until the process has exited
    busy_before_s: float  # GPU-busy seconds before the budget started
    busy_after_s: float  # GPU-busy seconds after the budget ended
    measured: bool = False

    @classmethod
    def default(cls, profile: str) -> Allowance:
        """Before anything is measured: a cold torch.compile on the GPU, a slow laptop on the CPU."""
        if profile == "gpu":
            return cls(startup_s=180.0, export_s=60.0, busy_before_s=60.0, busy_after_s=30.0)
        return cls(startup_s=60.0, export_s=30.0, busy_before_s=0.0, busy_after_s=0.0)

    @classmethod
    def measured_from(cls, accounts: list[dict], profile: str) -> Allowance:
        """Allowances from the `Account.report()` of honest runs (the worst of them, with a margin)."""
        usable = [a for a in accounts if a.get("started_after_s") is not None and a.get("exited_after_s") is not None]
        if not usable:
            return cls.default(profile)

        def worst(key: str, floor: float) -> float:
            values = [a[key] for a in usable if a.get(key) is not None]
            return max(floor, MARGIN * max(values)) if values else floor

        return cls(startup_s=worst("started_after_s", MIN_WALL_S), export_s=worst("exited_after_s", MIN_WALL_S),
                   busy_before_s=worst("busy_before_s", MIN_BUSY_S), busy_after_s=worst("busy_after_s", MIN_BUSY_S),
                   measured=True)


@dataclass(frozen=True)
class BudgetRule:
    """The budget of one phase-1 run and what it may spend beside it."""

    budget_s: float
    allowance: Allowance
    replay: bool = False  # rerun --exact: the budget ends at a recorded step, not at a time

    @property
    def budget_wall_s(self) -> float:
        return self.budget_s * (REPLAY_STRETCH if self.replay else 1.0)


class Account:
    """The host's account of one phase-1 run; fed by the log and the GPU watchdog, asked by the supervisor."""

    def __init__(self, rule: BudgetRule, started: float | None = None) -> None:
        self.rule = rule
        self.process_started = time.monotonic() if started is None else started
        self.budget_started: float | None = None
        self.exited: float | None = None
        self.busy = {"before": 0.0, "during": 0.0, "after": 0.0}
        self._gpu_metered = False
        self._lock = threading.Lock()

    def on_line(self, line: str) -> None:
        if self.budget_started is None and line.strip() == BUDGET_START_MARK:
            self.budget_started = time.monotonic()

    def _period(self, at: float) -> str:
        if self.budget_started is None or at < self.budget_started:
            return "before"
        return "during" if at < self.budget_started + self.rule.budget_wall_s else "after"

    def on_gpu_busy(self, seconds: float, at: float | None = None) -> None:
        """`seconds` of the GPU's time spent running kernels, in the sample that ended at `at`."""
        with self._lock:
            self._gpu_metered = True
            self.busy[self._period(time.monotonic() if at is None else at)] += seconds

    def overdue(self, now: float | None = None) -> str | None:
        """Why the run must be stopped now (it has had all the time the budget allows), or None."""
        now = time.monotonic() if now is None else now
        allowance = self.rule.allowance
        if self.budget_started is None:
            if now - self.process_started > allowance.startup_s:
                return f"the training budget did not start within the start-up allowance of {allowance.startup_s:.0f} s"
            return None
        end = self.budget_started + self.rule.budget_wall_s + allowance.export_s
        if now > end:
            return (f"still running {allowance.export_s:.0f} s after its {self.rule.budget_wall_s:g} s budget "
                    "(training past the budget)")
        return None

    def finish(self, exited: float | None = None) -> str | None:
        """At the process's exit: why it spent compute off the budget, or None."""
        self.exited = time.monotonic() if exited is None else exited
        allowance = self.rule.allowance
        if self.budget_started is None:
            return "the training budget never started (train.py must step prepare.Budget)"
        with self._lock:
            before, after = self.busy["before"], self.busy["after"]
        if self._gpu_metered and before > allowance.busy_before_s:
            return (f"the GPU was busy {before:.1f} s before the budget started (allowed {allowance.busy_before_s:.1f} s): "
                    "training outside the budget")
        if self._gpu_metered and after > allowance.busy_after_s:
            return (f"the GPU was busy {after:.1f} s after the budget ended (allowed {allowance.busy_after_s:.1f} s): "
                    "training outside the budget")
        return None

    def report(self) -> dict:
        """The figures an allowance is measured from (seconds; None where not seen)."""
        start, end = self.budget_started, self.exited
        budget_end = None if start is None else start + self.rule.budget_wall_s
        return {
            "budget_s": self.rule.budget_s,
            "started_after_s": None if start is None else start - self.process_started,
            "exited_after_s": None if budget_end is None or end is None else max(0.0, end - budget_end),
            "busy_before_s": self.busy["before"] if self._gpu_metered else None,
            "busy_during_s": self.busy["during"] if self._gpu_metered else None,
            "busy_after_s": self.busy["after"] if self._gpu_metered else None,
            "allowance": asdict(self.rule.allowance),
        }
