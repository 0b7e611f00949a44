"""The training budget enforced from outside train.py's process, by the host's own clock.

Anything inside the process can be patched by train.py, the harness's `Budget` included,
so the host keeps its own account of phase 1:

- **start-up**: from the start of the process until the harness announces the timed budget
  (`contract.BUDGET_START_MARK` on the log, timed when the host reads it). The budget must
  start within the start-up allowance.
- **budget**: from that moment the process has the budget plus the export allowance to exit;
  then the host kills it. Announcing late only moves time into start-up (bounded above);
  announcing early only shortens the run. On the CPU profile the budget is CPU time
  (`cpu_threads` × the budget's seconds of the run's processes, as the harness counts its
  own), so other load on the machine stretches the run instead of shortening its
  training; the wall clock then only bounds liveness (CPU_WALL_STRETCH).
- **compute outside the budget**: the busy seconds of the run's GPU (NVML utilisation)
  or, on the CPU profile, the CPU seconds of the run's processes (the kernel's
  accounting, which other load on the machine does not inflate) before the
  announcement (imports, compilation, warm-up) and after the budget (export) must stay
  within what honest runs needed. Training hidden in start-up or after the budget is
  caught this way even inside the wall allowances, which are only liveness bounds and
  can be generous: a slow or loaded machine stretches wall time, not compute.
- **the step that straddles the budget's end**: the loop ends at the first step that finds
  the budget done, so an honest run computes up to one step past it; a large model's step
  can be longer than the allowance after the budget. That step is excused: the median of
  the run's timed steps in its trace (written by train.py, parsed strictly: a long last
  step is not a typical one), no longer than the host's own mean step (its compute during
  the budget over the trace's steps), than MAX_STEP_SHARE of that compute, or than the
  after-budget allowance itself (measured on the night's honest baselines). A trace that
  claims a few long steps can therefore gain at most one more allowance: a few seconds of
  a 300 s budget, however long it claims its steps were.

Allowances come from measurement: `Allowance.measured_from` takes the figures of
honest runs (the night's baselines) with a margin; before any run is measured,
defaults apply. A run that breaks the account ends `over_budget`.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass

from contract import BUDGET_START_MARK, Trace

WALL_MARGIN, MIN_WALL_S = 2.0, 15.0  # wall allowances: liveness bounds, never less than MIN_WALL_S
COMPUTE_MARGIN, MIN_COMPUTE_S = 1.5, 3.0  # compute allowances: the measured figure x margin, at least the floor
# On top of them, a share of what the run itself spent during its budget: the untimed warm-up steps
# and the export grow with the model, so a child with a larger model than the baseline's is not
# taken for a cheat. It is also the slack a cheat has: 5 % of the budget's compute.
SCALE_SHARE = 0.05
MAX_STEP_SHARE = 0.2  # the longest step straddling the budget's end that is excused: a fifth of the budget's compute
REPLAY_STRETCH = 1.25  # a replayed rerun stops at the recorded step count, which may take a little longer
# CPU profile: the wall time a budget of CPU time may take on a loaded machine (a liveness bound only:
# three nights on two cores gave one run a sixth of the machine).
CPU_WALL_STRETCH = 10.0


@dataclass(frozen=True)
class Allowance:
    """What phase 1 may spend outside its training budget."""

    startup_s: float  # wall seconds from process start to the budget's start
    export_s: float  # wall seconds after the budget until the process has exited
    busy_before_s: float  # GPU-busy seconds before the budget started
    busy_after_s: float  # GPU-busy seconds after the budget ended
    cpu_before_s: float  # CPU profile: CPU seconds of the run before the budget started
    cpu_after_s: float  # CPU profile: CPU seconds of the run after the budget ended
    measured: bool = False

    @classmethod
    def default(cls, profile: str) -> Allowance:
        """Before anything is measured: a cold torch.compile on the GPU, a slow laptop on the CPU."""
        if profile == "gpu":  # the GPU's busy time decides there; the CPU figures are not used
            return cls(startup_s=180.0, export_s=60.0, busy_before_s=30.0, busy_after_s=10.0, cpu_before_s=30.0,
                       cpu_after_s=15.0)
        return cls(startup_s=60.0, export_s=30.0, busy_before_s=0.0, busy_after_s=0.0, cpu_before_s=30.0,
                   cpu_after_s=15.0)

    @classmethod
    def measured_from(cls, accounts: list[dict], profile: str) -> Allowance:
        """Allowances from the `Account.report()` of honest runs (the worst of them, with a margin)."""
        usable = [a for a in accounts if a.get("started_after_s") is not None and a.get("exited_after_s") is not None]
        if not usable:
            return cls.default(profile)

        def worst(key: str, margin: float, floor: float) -> float:
            values = [a[key] for a in usable if a.get(key) is not None]
            return max(floor, margin * max(values)) if values else floor

        wall, compute = (WALL_MARGIN, MIN_WALL_S), (COMPUTE_MARGIN, MIN_COMPUTE_S)
        return cls(startup_s=worst("started_after_s", *wall), export_s=worst("exited_after_s", *wall),
                   busy_before_s=worst("busy_before_s", *compute), busy_after_s=worst("busy_after_s", *compute),
                   cpu_before_s=worst("cpu_before_s", *compute), cpu_after_s=worst("cpu_after_s", *compute),
                   measured=True)


@dataclass(frozen=True)
class BudgetRule:
    """The budget of one phase-1 run and what it may spend beside it."""

    budget_s: float
    allowance: Allowance
    replay: bool = False  # rerun --exact: the budget ends at a recorded step, not at a time
    cpu_threads: int | None = None  # CPU profile: the budget is CPU time of this many threads

    @property
    def wall_stretch(self) -> float:
        """CPU profile: every wall bound stretches, since other load slows the run; compute decides there."""
        return CPU_WALL_STRETCH if self.cpu_threads else 1.0

    @property
    def budget_wall_s(self) -> float:
        """How long the budget may last by the wall clock (on the CPU profile only a liveness bound)."""
        return self.budget_s * (REPLAY_STRETCH if self.replay else 1.0) * self.wall_stretch

    @property
    def startup_wall_s(self) -> float:
        return self.allowance.startup_s * self.wall_stretch

    @property
    def export_wall_s(self) -> float:
        return self.allowance.export_s * self.wall_stretch

    @property
    def budget_cpu_s(self) -> float | None:
        """CPU profile: the CPU seconds of the budget."""
        if not self.cpu_threads:
            return None
        return self.budget_s * self.cpu_threads * (REPLAY_STRETCH if self.replay else 1.0)


class Account:
    """The host's account of one phase-1 run; fed by the log and the GPU watchdog, asked by the supervisor."""

    def __init__(self, rule: BudgetRule, started: float | None = None) -> None:
        self.rule = rule
        self.process_started = time.monotonic() if started is None else started
        self.budget_started: float | None = None
        self.budget_ended: float | None = None  # CPU profile: when the budget's CPU time was used up
        self.exited: float | None = None
        self.busy = {"before": 0.0, "during": 0.0, "after": 0.0}  # GPU-busy seconds
        self.cpu = {"before": 0.0, "during": 0.0, "after": 0.0}  # CPU seconds of the run's processes
        self._gpu_metered = False
        self._cpu_total: float | None = None  # the largest cumulative CPU figure seen
        self._cpu_at = self.process_started  # when it was read
        self._steps: tuple[float, ...] = ()  # the timed steps of the run's trace, known at its exit
        self._lock = threading.Lock()

    def on_line(self, line: str) -> None:
        if self.budget_started is None and line.strip() == BUDGET_START_MARK:
            self.budget_started = time.monotonic()

    def _budget_end(self) -> float | None:
        """When the budget ends (or ended) on the host's clock; None before it started."""
        if self.budget_started is None:
            return None
        if self.budget_ended is not None:
            return self.budget_ended
        return self.budget_started + self.rule.budget_wall_s

    def _window_end(self) -> float:
        """Where the budget's period ends in the account: on the CPU profile when its CPU time is used up,
        however long the wall clock says that took (only liveness uses the wall there); else at _budget_end."""
        if self.rule.budget_cpu_s is not None:
            return self.budget_ended if self.budget_ended is not None else math.inf
        return self._budget_end()

    def _spread(self, amount: float, start: float, end: float, into: dict[str, float]) -> None:
        """Share `amount`, spent evenly over [start, end], among the periods before, during and after the budget."""
        if self.budget_started is None:
            into["before"] += amount
            return
        edges = (self.budget_started, self._window_end())
        windows = {"before": (-math.inf, edges[0]), "during": edges, "after": (edges[1], math.inf)}
        length = end - start
        for period, (low, high) in windows.items():
            if length <= 0:  # an instant: all of it where it fell
                if low <= end < high:
                    into[period] += amount
            else:
                into[period] += amount * max(0.0, min(end, high) - max(start, low)) / length

    def on_gpu_busy(self, seconds: float, start: float, end: float) -> None:
        """The GPU ran kernels for `seconds` of the sampling period [start, end] (monotonic clock)."""
        with self._lock:
            self._gpu_metered = True
            self._spread(seconds, start, end, self.busy)

    def on_cpu_total(self, cpu_seconds: float, at: float | None = None) -> None:
        """The run's processes have used `cpu_seconds` of CPU time in all, as sampled at `at`."""
        at = time.monotonic() if at is None else at
        with self._lock:
            if self._cpu_total is not None and cpu_seconds > self._cpu_total:
                self._spread(cpu_seconds - self._cpu_total, self._cpu_at, at, self.cpu)
                self._end_cpu_budget(at)
            if self._cpu_total is None or cpu_seconds > self._cpu_total:
                self._cpu_total = cpu_seconds
            self._cpu_at = at

    def _end_cpu_budget(self, at: float) -> None:
        """CPU profile: CPU time beyond the budget's counts as after it, and the budget has ended."""
        budget = self.rule.budget_cpu_s
        if budget is None or self.budget_ended is not None or self.cpu["during"] < budget:
            return
        self.cpu["after"] += self.cpu["during"] - budget
        self.cpu["during"] = budget
        self.budget_ended = at

    def overdue(self, now: float | None = None) -> str | None:
        """Why the run must be stopped now (it has had all the time the budget allows, or has
        already spent more compute outside the budget than it may), or None."""
        now = time.monotonic() if now is None else now
        if self.budget_started is None:
            if now - self.process_started > self.rule.startup_wall_s:
                return f"the training budget did not start within the start-up allowance of {self.rule.startup_wall_s:.0f} s"
            return self._off_budget(final=False)
        with self._lock:
            end = self._budget_end()
        if now > end + self.rule.export_wall_s:
            return (f"still running {self.rule.export_wall_s:.0f} s after its {self.rule.budget_s:g} s budget ended "
                    "(training past the budget)")
        return self._off_budget(final=False)

    def finish(self, exited: float | None = None, trace: Trace | None = None) -> str | None:
        """At the process's exit: why it spent compute off the budget, or None. `trace`, the run's budget
        trace parsed strictly (None: none, or not valid), tells the step that straddled the budget's end."""
        self.exited = time.monotonic() if exited is None else exited
        self._steps = trace.step_seconds[trace.warmup_steps:] if trace is not None else ()
        if self.budget_started is None:
            return "the training budget never started (train.py must step prepare.Budget)"
        return self._off_budget(final=True)

    def _straddle(self, during: float, allowed_after: float) -> float:
        """The compute excused after the budget for the step that straddled its end (see the module's doc):
        the trace's median step (per thread on the CPU profile, as the harness counts it) bounded by the
        host's mean step, by MAX_STEP_SHARE of the budget's compute and by the after-budget allowance;
        none without a trace."""
        if not self._steps:
            return 0.0
        median = statistics.median(self._steps) * (self.rule.cpu_threads or 1)
        return min(median, during / len(self._steps), MAX_STEP_SHARE * during, allowed_after)

    def _meter(self) -> tuple[dict[str, float], tuple[float, float], str, float] | None:
        """The compute that counts (spent per period, allowed before and after, its name, the most the budget
        can take), or None while nothing is metered: on a GPU its busy time, else the run's CPU time."""
        allowance = self.rule.allowance
        with self._lock:
            if self._gpu_metered:  # on a GPU the GPU's time is the compute; the CPU compiles meanwhile
                return (dict(self.busy), (allowance.busy_before_s, allowance.busy_after_s), "the GPU was busy",
                        self.rule.budget_wall_s)  # busy seconds of one GPU fit in its wall seconds
            if self._cpu_total is not None:
                return (dict(self.cpu), (allowance.cpu_before_s, allowance.cpu_after_s), "the run used the CPU",
                        self.rule.budget_cpu_s or math.inf)
        return None

    def _excused(self) -> float | None:
        meter = self._meter()
        return None if meter is None else self._straddle(meter[0]["during"], meter[1][1])

    def _off_budget(self, final: bool) -> str | None:
        """Why the compute spent outside the budget is more than allowed, or None.

        Before the exit (`final` false) a run is stopped as soon as the verdict cannot change:
        its compute after the budget only grows, and is held to the allowance with the longest
        step any trace could have excused; its compute before the budget is held to the allowance
        with the share of the most compute the budget itself can take."""
        meter = self._meter()
        if meter is None:
            return None
        spent, allowed, what, most = meter
        share = SCALE_SHARE * spent["during"]  # a larger model's warm-up steps and export cost more
        before_share = share if final else SCALE_SHARE * most
        step = (self._straddle(spent["during"], allowed[1]) if final
                else min(MAX_STEP_SHARE * spent["during"], allowed[1]))
        for period, limit, when in (("before", allowed[0] + before_share, "before the budget started"),
                                    ("after", allowed[1] + share + step, "after the budget ended")):
            if spent[period] > limit:
                return f"{what} {spent[period]:.1f} s {when} (allowed {limit:.1f} s): training outside the budget"
        return None

    def report(self) -> dict:
        """The figures an allowance is measured from (seconds; None where not seen)."""
        start, end = self.budget_started, self.exited
        budget_end = self._budget_end()
        return {
            "budget_s": self.rule.budget_s,
            "started_after_s": None if start is None else start - self.process_started,
            "exited_after_s": None if budget_end is None or end is None else max(0.0, end - budget_end),
            "busy_before_s": self.busy["before"] if self._gpu_metered else None,
            "busy_during_s": self.busy["during"] if self._gpu_metered else None,
            "busy_after_s": self.busy["after"] if self._gpu_metered else None,
            "cpu_before_s": self.cpu["before"] if self._cpu_total is not None else None,
            "cpu_during_s": self.cpu["during"] if self._cpu_total is not None else None,
            "cpu_after_s": self.cpu["after"] if self._cpu_total is not None else None,
            # the compute after the budget excused for the step that straddled its end (busy or CPU seconds)
            "step_excused_s": self._excused() if self.exited is not None else None,
            "allowance": asdict(self.rule.allowance),
        }
