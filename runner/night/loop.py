"""The night: baseline, then propose → validate → build → train → evaluate → decide, on every GPU.

One worker thread per GPU (or one for the CPU) runs experiments one at a time, so
no two runs ever share a GPU. While a worker's experiment runs, the next proposal
and its image are prepared in the background from the best train.py of that
moment (the parent actually used is recorded), so the GPU waits as little as
possible. Everything goes through the ledger first: a night killed at any point
resumes from it, re-running exactly the work that was in flight.

Order of a night:
  1. resume bookkeeping: rows left unfinished by an earlier runner become work owed;
  2. baseline: the unmodified train.py on R seeds, unless already done (a disturbed run's
     seed again), to measure the noise σ the keep rule starts from (DESIGN §3.7);
  3. experiments until the hours or the experiment count run out, or `interrupt()` (Ctrl-C, through
     runner.night.overnight). Both limits are totals of the night over all its invocations (runner.night.limits).

The night's heartbeat (runner.core.heartbeat) tells `status` that it runs. With `--prune-images`,
the images of experiments that were discarded or failed are removed as the night goes
(runner.night.pruning), and at the start what a killed invocation left.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import os
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from runner.agents.base import Agent, AgentConfigError, AgentError
from runner.core import decision
from runner.core.errors import UserError, low_on_space, machine_problem
from runner.core.figures import gain_text
from runner.core.gpus import Gpu
from runner.core.heartbeat import Heartbeat, this_runner
from runner.core.ledger import (BASELINE, EXPERIMENT, RERUN, Experiment, Ledger, LedgerUnavailable, budget_account,
                                outcome_fields)
from runner.core.plan import RunPlan
from runner.core.runs import flag_disturbed
from runner.core.settings import Settings, project_text
from runner.night.console import NightView, WorkerView
from runner.night.judge import Judge, next_seed
from runner.night.limits import NightLimits, proposals
from runner.night.notify import Notifier, Watch
from runner.night.placement import Local, Placement, RunFn, Slot
from runner.night.proposals import Best, Proposer
from runner.night.pruning import prune_images
from runner.night.records import Records
from sandbox.budget_guard import Allowance
from sandbox.experiment import ExperimentOutcome, run_experiment
from sandbox.run_dir import RunDir
from sandbox.spec import Backend, CancelToken, Phase
from sandbox.status import Status

log = structlog.get_logger(__name__)

AGENT_BACKOFF_S = (5.0, 300.0)  # first and longest wait after an agent error
CANCEL_POLL_S = 0.2  # how often a worker waiting for a proposal looks whether the night was cancelled
BASELINE_ROUNDS = 3  # rounds of baseline runs: the first, and reruns of seeds whose runs were disturbed


class NightError(UserError):
    """The night cannot start or cannot go on (one sentence for the user)."""


@dataclass(frozen=True)
class Dataset:
    path: Path  # $AR_CACHE/<source>
    manifest_hash: str


class _Prefetch:
    """The next experiment, proposed and built in a background thread."""

    def __init__(self, prepare: Callable[[], Experiment | None], builds: threading.Lock) -> None:
        self._prepare = prepare
        self._builds = builds  # held by a build under way (Night._images)
        self._done = threading.Event()
        self._row: Experiment | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, daemon=True, name="prefetch").start()

    def _run(self) -> None:
        try:
            self._row = self._prepare()
        except BaseException as exc:  # handed to the worker that waits
            self._error = exc
        finally:
            self._done.set()

    def wait(self, cancel: CancelToken) -> Experiment | None:
        """The prepared row. Once the night is cancelled, None without waiting for the agent (it may take minutes
        to answer; what it proposes is still recorded, owed to a resume, if the runner lives by then), but only
        after a build under way has ended (seconds), so that its builder is gone before the runner exits."""
        while not self._done.wait(CANCEL_POLL_S):
            if cancel.cancelled:
                with self._builds:
                    return None
        if self._error is not None:
            raise self._error
        return self._row


class Night:
    """One invocation of `overnight` over an existing or new ledger."""

    def __init__(
        self,
        settings: Settings,
        *,
        ledger: Ledger,
        backend: Backend,
        agent: Agent,
        gpus: list[Gpu],
        data: Dataset,
        run: RunFn = run_experiment,
        placement: Placement | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.backend = backend  # a cluster night: this machine's, whose recipe the nodes must have
        self.agent = agent
        self.data = data
        self.placement = placement or Local(backend, gpus, run)  # where experiments run: here (`gpus`) or a cluster
        self.profile = self.placement.profile
        self.time_budget = settings.time_budget(self.profile)
        self.slots = self.placement.slots()
        self.records = Records(ledger, settings.run_dir, self.profile)
        stall = settings.stall_minutes * 60 if settings.stall_minutes is not None else None
        self.watch = Watch(Notifier(settings.notify, settings.on_event), settings.tag, stall)
        self.proposer = Proposer(agent, self.records, settings.root, settings.max_diff_retries, self._machine())
        self.judge: Judge | None = None  # once the baseline has measured the noise
        self.baseline_mean: float | None = None
        self.allowance: Allowance | None = None  # measured on the baseline; None: the profile's defaults
        self.night_id: int | None = None
        self._pending: collections.deque[Experiment] = collections.deque()
        self._lock = threading.Lock()  # the pending queue, failure bookkeeping, proposal counts
        self._images = threading.Lock()  # a build and its record, or a prune: never both at once
        self._failed_on: dict[str, set[str]] = collections.defaultdict(set)  # row -> slots it failed on
        self.limits = NightLimits.of(settings, ledger)
        self._proposals = proposals(ledger)  # proposals of the night, resumes included (for --max-experiments)
        self._agent_errors = 0  # in a row
        self._stop = threading.Event()
        self._cancel = CancelToken()
        self._fatal: str | None = None
        self._last_infra_error = ""
        self._tick: Callable[[NightView], None] = lambda view: None
        self._finished: list[threading.Event] = []  # one per worker of the current round
        self._started = time.monotonic()
        left = self.limits.seconds_left(ledger)
        self._deadline = self._started + left if left is not None else None

    def _machine(self) -> str:
        """Where each experiment runs and for how long, as the agent is told."""
        gpu = next((slot.gpu for slot in self.slots if slot.gpu), None)
        if gpu is None or not gpu.memory_bytes:
            where = gpu.name if gpu else self.placement.gpu_name(self.slots[0]) or "the CPU (no GPU)"
        else:
            cap = self.settings.memory_cap.bytes_for(gpu.memory_bytes)
            where = (f"{gpu.name} with {gpu.memory_bytes / 2**30:.0f} GiB of GPU memory"
                     + (f", of which a run may hold {cap / 2**30:.0f} GiB" if cap else ""))
        return f"{where}; training stops after {self.time_budget:.0f} s (the harness's time budget)"

    # -- public -------------------------------------------------------------------

    @property
    def best(self) -> Best | None:
        return self.judge.best if self.judge else None

    def run(self, on_tick: Callable[[NightView], None] | None = None) -> str:
        """Run the night; return why it stopped ("interrupted" after `interrupt()`)."""
        if on_tick is not None:
            self._tick = on_tick
        self.night_id = self.records.night_id = self.ledger.start_night(self.settings.tag, self._record(),
                                                                         runner=this_runner())
        self.placement.record_inventory(self.ledger, self.night_id)
        reason = "interrupted"
        try:
            with Heartbeat(self.ledger, self.night_id):
                reason = self._night()
        except UserError as exc:  # the night cannot go on: say why once, record the end
            self._stop_for(exc)
            reason = "error"
        finally:
            self._end(reason)
            decided = [r for r in self.ledger.experiments(kinds=[EXPERIMENT]) if r.decision is not None]
            self.watch.ended(reason, sum(r.decision == decision.KEEP for r in decided), len(decided))
            self.watch.notifier.close()
        if self._fatal:
            raise NightError(self._fatal)
        return reason

    def _end(self, reason: str) -> None:
        """Record the night's end; a ledger that can no longer take it (a full disk) is said, not raised."""
        try:
            self.ledger.end_night(self.night_id, reason)
        except LedgerUnavailable as exc:
            log.error("night.end_unrecorded", error=str(exc))
            self._fatal = self._fatal or str(exc)
        log.info("night.end", reason=reason)

    def _stop_for(self, exc: Exception) -> None:
        """Stop the night for a problem no experiment caused, with one sentence for the user."""
        said = machine_problem(exc)
        if said is not None:  # the machine's (disk, ledger, sandbox): the user fixes it, then resumes
            said = f"the night stopped: {said.rstrip('.')}; resume it with --tag {self.settings.tag} once that is fixed."
        elif isinstance(exc, UserError):
            said = str(exc)
        else:  # a bug, not the experiment's doing
            log.exception("night.runner_failed")
            said = f"the runner failed unexpectedly ({type(exc).__name__}: {exc}); see events.jsonl."
        log.error("night.stopped", why=said)
        self._fatal = self._fatal or said
        self._stop.set()

    def interrupt(self) -> None:
        """Stop now, from any thread: cancel what runs (recorded `cancelled`), start nothing new; work proposed
        or built but not started stays owed to a resume. Never raised into the night: a KeyboardInterrupt at
        an arbitrary line (inside a lock, a condition's wait) left experiments unrecorded and runs behind."""
        self._stop.set()
        self._cancel.cancel()

    def view(self) -> NightView:
        now = time.monotonic()
        rows = self.ledger.experiments(night_id=self.night_id, kinds=[EXPERIMENT])
        finished = [r for r in rows if r.status.is_conclusive()]
        best = self.best
        return NightView(
            workers=tuple(WorkerView(s.name, s.exp_id, "retired" if s.retired else s.phase, now - s.since)
                          for s in self.slots),
            best_value=best.value if best else None,
            best_id=best.exp_id if best else None,
            finished=len(finished),
            kept=sum(r.decision == decision.KEEP for r in rows),
            per_hour=len(finished) / (max(now - self._started, 1.0) / 3600),
        )

    # -- the phases of a night -------------------------------------------------------------

    def _record(self) -> dict:
        return {
            **self.settings.record(),
            "hours": self.limits.hours,  # the night's limits as this invocation applies them
            "max_experiments": self.limits.max_experiments,
            "max_agent_usd": self.limits.max_agent_usd,
            "profile": self.profile,
            "time_budget": self.time_budget,
            "gpus": [s.gpu.uuid for s in self.slots if s.gpu],
            "backend": self.backend.name,
            "isolation": self.backend.isolation,
            **self.placement.record(),
            "agent": self.agent.name,
            "data_dir": str(self.data.path),
            "data_manifest_hash": self.data.manifest_hash,
        }

    def _night(self) -> str:
        rule = self.settings.rule
        log.info("night.start", tag=self.settings.tag, profile=self.profile, slots=[s.name for s in self.slots],
                 agent=self.agent.name, backend=self.backend.name, isolation=self.backend.isolation,
                 budget_s=self.time_budget, alpha=rule.alpha, max_runs=rule.max_runs,
                 min_delta=rule.min_delta, baseline_runs=self.settings.baseline_runs)
        self._check_data()
        reaped = self.backend.reap()
        if reaped:
            log.info("night.reaped", leftovers=reaped)
        self._prune()  # what a killed invocation left
        # A rerun's row is the morning command's own: the night never runs it, even while that command does.
        owed = [r for r in self.ledger.unfinished() if r.kind != RERUN]
        if owed:
            log.info("night.resume", owed=[f"{r.id}:{r.status}" for r in owed])
        self._queue(r for r in owed if r.kind == BASELINE)
        for _ in range(BASELINE_ROUNDS):
            self._queue(self._new_baselines())
            self._work(propose=False)
            if self._stop.is_set():
                return self._stop_reason()
            rows = self.ledger.experiments(kinds=[BASELINE], night_id=self.night_id)
            if any(r.status.is_failure() for r in rows) or not self._new_baselines(dry=True):
                break  # a failed baseline ends the night below; only disturbed ones are run again
        self.judge = self._start_judging()
        self._queue(r for r in owed if r.kind != BASELINE)
        self._queue(self.judge.settle_undecided())
        self._work(propose=True)
        if self._stop.is_set():
            return self._stop_reason()
        if self._past_deadline():
            return "hours"
        return "agent-budget" if self.limits.agent_budget_spent(self.ledger) else "max-experiments"

    def _stop_reason(self) -> str:
        return "error" if self._fatal else "interrupted"

    def _check_data(self) -> None:
        """Refuse to mix data: val_bpb on other data is not comparable."""
        for row in self.ledger.experiments(kinds=[BASELINE], statuses=[Status.DONE]):
            if row.data_hash and row.data_hash != self.data.manifest_hash:
                raise NightError(
                    f"{self.settings.run_dir} was measured on other data (manifest {row.data_hash[:12]}); "
                    "use the same --source or a new --tag."
                )

    def _new_baselines(self, dry: bool = False) -> list[Experiment]:
        """Baseline rows for the seeds still missing: R counted runs are needed (those in flight count);
        a disturbed run's seed is run again. `dry`: only say which would be added."""
        rows = flag_disturbed(self.ledger, self.ledger.experiments(kinds=[BASELINE]))
        counted = sum(r.counts or r.status.is_unfinished() for r in rows)
        missing = max(0, self.settings.baseline_runs - counted)
        if dry:
            return [None] * missing
        train_py = self.records.train_py(rows[0]) if rows else project_text(self.settings.root, "train.py")
        new = []
        for _ in range(missing):
            seed = next_seed(rows + new)
            new.append(self.records.add(kind=BASELINE, status=Status.PROPOSED, train_py=train_py, seed=seed,
                                        description="baseline" if seed is None else f"baseline (seed {seed})"))
        return new

    def _start_judging(self) -> Judge:
        """The noise and the best from the baselines (and any keep of an earlier invocation)."""
        rows = self.ledger.experiments(kinds=[BASELINE], night_id=self.night_id)
        failed = [r for r in rows if r.status != Status.DONE]
        if failed:
            raise NightError(
                f"the baseline train.py ended in {failed[0].status} ({failed[0].id}); "
                f"see {RunDir(self.records.dir(failed[0].id)).log(Phase.TRAIN)}."
            )
        runs = [r for r in self.ledger.experiments(kinds=[BASELINE], statuses=[Status.DONE]) if r.counts]
        if len(runs) < self.settings.baseline_runs:
            raise NightError(f"the baseline runs kept being disturbed (fewer steps than each other); "
                             f"see {self.records.run_dir / 'events.jsonl'} and free the machine.")
        self.baseline_mean = statistics.fmean(r.val_bpb for r in runs)
        kept = self.ledger.best_kept()
        start = kept or runs[0]
        best = Best(start.id, kept.decision_value if kept else self.baseline_mean, self.records.train_py(start))
        judge = Judge(self.records, self.settings.rule, best,
                      on_keep=lambda row: self.watch.kept(row.id, row.description, row.decision_value,
                                                          gain_text(row.estimate)))
        noise = judge.noise()
        smallest = decision.detectable_gain(self.settings.rule, noise, len(runs))
        self.ledger.set_noise(self.night_id, mean=self.baseline_mean, sigma=noise.sigma, df=noise.df, runs=len(runs),
                              threshold=smallest)
        self.allowance = Allowance.measured_from([budget_account(r) for r in runs], self.profile)
        self.ledger.set_allowance(self.night_id, dataclasses.asdict(self.allowance))
        log.info("night.noise", baseline_mean=self.baseline_mean, sigma=noise.sigma, df=noise.df, runs=len(runs),
                 detectable_gain=smallest, best=best.value, best_id=best.exp_id,
                 allowance=dataclasses.asdict(self.allowance))
        return judge

    # -- workers ---------------------------------------------------------------------------

    def _work(self, *, propose: bool) -> None:
        """Run a worker per slot until the work (or the night) is over.

        A row requeued by a worker that then retired its GPU is picked up by a new
        round as long as some slot is left.
        """
        while not self._stop.is_set():
            active = [s for s in self.slots if not s.retired]
            if not active:
                raise NightError(self._retired_message())
            self._finished = [threading.Event() for _ in active]
            for slot, finished in zip(active, self._finished):
                threading.Thread(target=self._worker, args=(slot, propose, finished), daemon=True,
                                 name=slot.name).start()
            self._join()
            if not self._pending or (propose and self._past_deadline()):
                return

    def _join(self) -> None:
        """Wait for the workers, redrawing the status line meanwhile."""
        for finished in self._finished:
            while not finished.wait(0.5):
                self._tick(self.view())
                self.watch.check_stall()

    def _worker(self, slot: Slot, propose: bool, finished: threading.Event) -> None:
        try:
            self._serve(slot, propose)
        except Exception as exc:
            self._stop_for(exc)
        finally:
            slot.show(None, "idle")
            finished.set()

    def _serve(self, slot: Slot, propose: bool) -> None:
        prefetch: _Prefetch | None = None
        while not self._stop.is_set() and not slot.retired and not (propose and self._past_deadline()):
            row = self._take(slot)
            if row is None and propose:
                prefetch = prefetch or self._prefetch()
                if prefetch is None:
                    break  # no more proposals this night
                row, prefetch = prefetch.wait(self._cancel), None
                if row is None:
                    continue  # rejected, or the agent failed
            if row is None:
                break
            if propose and not self._pending:
                prefetch = prefetch or self._prefetch()
            self._execute(slot, row)
        if prefetch is not None and not self._cancel.cancelled:
            row = prefetch.wait(self._cancel)  # at least it reaches the ledger as `built`: a resume runs it
            if row is not None and slot.retired:
                self._queue([row])  # another slot runs it tonight

    def _take(self, slot: Slot) -> Experiment | None:
        """The next owed row, but not one that just failed on this slot while others could run it."""
        with self._lock:
            active = {s.place for s in self.slots if not s.retired}
            for row in self._pending:
                tried = self._failed_on.get(row.id, set())
                if slot.place not in tried or active <= tried:
                    self._pending.remove(row)
                    return row
            return None

    def _queue(self, rows) -> None:
        with self._lock:
            self._pending.extend(rows)

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    # -- one experiment: propose, build, run, record, decide ---------------------------------

    def _prefetch(self) -> _Prefetch | None:
        """Start preparing the next experiment from the best of this moment, if the night may start another."""
        if self._stop.is_set() or self._past_deadline():
            return None
        with self._lock:
            if self.limits.max_experiments is not None and self._proposals >= self.limits.max_experiments:
                return None
            if self.limits.agent_budget_spent(self.ledger):
                return None  # the agent has cost what --max-agent-usd allows
            self._proposals += 1
        parent = self.judge.best
        return _Prefetch(lambda: self._prepare(parent), self._images)

    def _prepare(self, parent: Best) -> Experiment | None:
        try:
            row = self.proposer.propose(parent, self.baseline_mean)
        except AgentConfigError as exc:
            self._fatal = str(exc)
            self._stop.set()
            return None
        except AgentError as exc:
            self._agent_failed(exc)
            return None
        self._agent_errors = 0
        if row is None or self._stop.is_set():
            return row
        try:
            return self._build(row)
        except Exception as exc:  # the worker retries the build and counts the failure
            log.warning("experiment.build_failed", exp=row.id, error=str(exc))
            return row

    def _agent_failed(self, exc: AgentError) -> None:
        """Record, wait a little longer each time, go on: an agent outage never ends the night."""
        with self._lock:
            self._agent_errors += 1
            self._proposals -= 1  # nothing was proposed
            errors = self._agent_errors
        first, longest = AGENT_BACKOFF_S
        wait = min(longest, first * 2 ** (errors - 1))
        log.warning("agent.error", agent=self.agent.name, error=str(exc), in_a_row=errors, retry_in_s=wait)
        self._stop.wait(wait)

    def _build(self, row: Experiment) -> Experiment:
        """The row's train.py, built where it runs (placement.build)."""
        with self._images:  # recorded before a prune may look: an image in use is never pruned
            if self._stop.is_set():
                return row  # the night stops: nothing more is built, the row stays owed
            return self.placement.build(self.records, row)

    def _prune(self) -> None:
        if self.settings.prune_images:
            with self._images:
                prune_images(self.placement.images(self.records), self.ledger.path)

    def _execute(self, slot: Slot, row: Experiment | None) -> None:
        """Run one experiment on `slot`, record it, decide it; run its confirmation if any."""
        while row is not None and not self._stop.is_set():
            self._check_space()
            try:
                slot.show(row.id, "building")
                row = self._build(row)
                if self._stop.is_set():
                    break  # stopped during the build: the row stays owed, a resume runs it
                outcome = self._run_phases(slot, row)
                self._check_space(outcome)
            except Exception as exc:  # the backend or the machine failed, not the experiment
                if low_on_space(self.settings.run_dir) or machine_problem(exc) is not None:
                    # The night stops and the row stays owed: it starts over on resume, so what its run
                    # wrote only holds space that the night's end needs.
                    shutil.rmtree(RunDir(self.records.dir(row.id)).out, ignore_errors=True)
                    self._check_space()
                    raise
                self._infra_failure(slot, row, exc)
                return
            slot.strikes = 0
            self._record_outcome(row, outcome)
            row = self.judge.after(row.id, may_confirm=not self._stop.is_set()) if self.judge else None
        self._prune()

    @functools.cached_property
    def recipe(self) -> str:
        """What this machine's images are built from (a cluster's nodes must build from the same)."""
        return self.backend.recipe()

    def _run_phases(self, slot: Slot, row: Experiment) -> ExperimentOutcome:
        gpu = slot.gpu
        self.ledger.update(
            row.id, night_id=self.night_id, backend=self.backend.name, isolation=self.backend.isolation,
            data_hash=self.data.manifest_hash, gpu_uuid=gpu.uuid if gpu else None,
            gpu_name=self.placement.gpu_name(slot), gpu_driver=gpu.driver if gpu else None, error=None,
            recipe=self.recipe, node=slot.node.name if slot.node else None, run_attempt=row.run_attempt + 1,
        )

        def on_phase(status: Status) -> None:  # called before each phase starts on the machine
            self.ledger.transition(row.id, status)
            slot.show(row.id, status)

        plan = RunPlan(exp_id=row.id, time_budget=self.time_budget, seed=row.seed,
                       deterministic=self.settings.deterministic, gpu_memory_cap=self.settings.memory_cap,
                       allowance=self.allowance)
        return self.placement.run(slot, self.records, self.ledger.get(row.id), plan, self.data.path,
                                  self.data.manifest_hash, self._cancel, on_phase)

    def _check_space(self, outcome: ExperimentOutcome | None = None) -> None:
        """No run starts while the runs directory's disk is (nearly) full, and a run that failed (or
        could not go on) then is put down to the disk: the night stops, the row stays owed."""
        if (outcome is None or outcome.status != Status.DONE) and low_on_space(self.settings.run_dir):
            self.watch.disk_full(str(self.settings.run_dir))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.settings.run_dir))

    def _record_outcome(self, row: Experiment, outcome: ExperimentOutcome) -> None:
        self.ledger.transition(row.id, outcome.status, **outcome_fields(outcome))
        log.info("experiment.finished", exp=row.id, kind=row.kind, status=outcome.status, val_bpb=outcome.val_bpb,
                 seconds=outcome.phase_seconds)
        self.watch.ran(row.id, row.kind == EXPERIMENT, outcome.status.is_failure(), outcome.status)

    def _infra_failure(self, slot: Slot, row: Experiment, exc: Exception) -> None:
        """Requeue the row for another slot; a slot failing N times in a row leaves rotation."""
        limit = self.settings.gpu_failures
        error = f"{type(exc).__name__}: {exc}"
        slot.strikes += 1
        with self._lock:
            self._failed_on[row.id].add(slot.place)
            failures = len(self._failed_on[row.id])
        log.error("experiment.infrastructure_error", exp=row.id, slot=slot.name, error=error, strikes=slot.strikes)
        if failures >= limit:
            self.ledger.transition(row.id, Status.CRASH, error=f"infrastructure failed on {limit} slots: {error}")
        else:
            self.ledger.update(row.id, error=error)
            self._queue([self.ledger.get(row.id)])
        if slot.strikes >= limit or self.placement.lost(exc):
            self._last_infra_error = error
            for each in self._slots_of(slot):
                each.retired = True
                log.warning("night.slot_retired", slot=each.name, gpu=each.gpu.uuid if each.gpu else None,
                            failures_in_a_row=slot.strikes, last_error=error)

    def _slots_of(self, slot: Slot) -> list[Slot]:
        """The slots that leave rotation with `slot`: those of the same place (a cluster's node is at fault)."""
        return [s for s in self.slots if s.place == slot.place]

    def _retired_message(self) -> str:
        return (f"{self.placement.every} failed {self.settings.gpu_failures} times in a row with infrastructure errors "
                f"(last: {self._last_infra_error}); see events.jsonl.")

