"""Who ends a run and how its end is told: the one supervision loop of both backends (DESIGN §3.4).

A backend starts the run and knows how to wait for it, kill it, meter it and read how it
ended (`Supervised`); everything else is decided here, alike for docker and process:

- the run is stopped by the first of: the cancel token (cancelled), the deadline
  (timeout), the host's budget account (over_budget), the GPU watchdog above the cap
  (gpu_oom), the kernel's OOM killer having killed one of its processes (oom: the rest
  is then ended too). The first to ask is the killer; the kill is sent at once, from
  whichever thread asked, and its reason is noted in the log;
- a killed run that has not exited `KILL_GRACE_S` later is reported as killed anyway,
  with a note, and left to the backend's `reap()`;
- a runner about to exit at once (a second Ctrl-C) ends every run it supervises with
  `kill_all_runs`, from any thread, and no run starts after it;
- the status comes from the killer, then the exit code and the kernel's OOM flag
  (`classify`), then the budget account (`settle_budget`), and the `RunResult` is built
  from it, the log's tail and what was measured.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from contract import TRACE_FILE, TraceError
from sandbox.budget_guard import Account
from sandbox.gpu_watchdog import GpuWatchdog, Reader
from sandbox.phase1_files import read_trace
from sandbox.runlog import LineLog
from sandbox.spec import CancelToken, Killer, RunResult, RunSpec
from sandbox.status import Status

log = structlog.get_logger(__name__)

POLL_S = 0.1  # how often the supervisor looks at the run and reads its meter (CPU time, memory)
KILL_GRACE_S = 30.0  # how long a killed run may take to end before it is reported and left to reap()
_SIGKILL_EXIT = 128 + signal.SIGKILL


@dataclass(frozen=True)
class Exit:
    """How a run ended, as its backend saw it."""

    exit_code: int | None  # None: it did not end (it survived the kill)
    oom_killed: bool | None  # the kernel's OOM killer killed one of its processes; None where nothing counts it
    peak_memory_bytes: int | None = None


class Supervised(Protocol):
    """One run of a backend, as the supervisor drives it."""

    def start(self) -> None:
        """Start the run's process; the deadline counts from here."""
        ...

    def wait(self, timeout_s: float) -> bool:
        """Whether the run's process has exited, waiting at most `timeout_s`."""
        ...

    def kill(self) -> None:
        """SIGKILL everything of the run; called once, from any thread."""
        ...

    def pids(self) -> set[int]:
        """Host PIDs of the run's processes (the GPU watchdog counts their memory)."""
        ...

    def meter(self) -> float | None:
        """The CPU seconds the run has used so far (None: unknown); a backend that samples memory notes its peak.
        Read at every poll, and once more after the exit (the run's final figure, where it still has one)."""
        ...

    def oom_seen(self) -> bool:
        """Whether the kernel's OOM killer has killed a process of the run that otherwise lives on."""
        ...

    def report(self) -> Exit:
        """After the supervisor is done with it: reap the run and say how it ended."""
        ...


def classify(killer: Killer, exit_code: int | None, oom_killed: bool | None) -> tuple[Status, Killer]:
    """How a run ended, from who stopped it, its exit code and the kernel's OOM flag.

    Where nothing counts OOM kills (`oom_killed` None), a SIGKILL that the host did not
    send came from the kernel's OOM killer: it is the only other sender."""
    by_killer = {Killer.CANCEL: Status.CANCELLED, Killer.DEADLINE: Status.TIMEOUT, Killer.WATCHDOG: Status.GPU_OOM,
                 Killer.BUDGET: Status.OVER_BUDGET}
    if killer in by_killer:
        return by_killer[killer], killer
    if exit_code == 0:
        return Status.OK, Killer.NONE
    if oom_killed is None:
        oom_killed = killer is Killer.NONE and exit_code == _SIGKILL_EXIT
    if oom_killed:
        return Status.OOM, Killer.OOM_KILLER
    return Status.CRASH, Killer.NONE


def settle_budget(account: Account | None, exited_at: float, out_dir: Path, status: Status, killer: Killer,
                  line_log: LineLog) -> tuple[Status, Killer]:
    """After the process ended: a run that exited by itself but spent compute off its budget (beyond the step
    that straddled its end, which its trace in `out_dir` tells) is over_budget."""
    if account is None:
        return status, killer
    try:
        trace = read_trace(out_dir / TRACE_FILE)
    except TraceError:  # none, or not what the harness writes: no step is excused
        trace = None
    why = account.finish(exited_at, trace)
    if why and killer is Killer.NONE and status is Status.OK:  # a crash scores nothing anyway: it stays a crash
        line_log.note(f"over budget: {why}")
        return Status.OVER_BUDGET, Killer.BUDGET
    return status, killer


@dataclass
class Ending:
    """How a run ended, with what the host measured of it."""

    status: Status
    exit_code: int | None = None
    killer: Killer = Killer.NONE
    peak_host: int | None = None
    peak_gpu: int | None = None


class _Stopper:
    """Kills the run once, remembering who asked first (exit code 137 is ambiguous) and when."""

    def __init__(self, run: Supervised, line_log: LineLog) -> None:
        self._run, self._log = run, line_log
        self._lock = threading.Lock()
        self.killer = Killer.NONE
        self.at: float | None = None

    def stop(self, killer: Killer, why: str) -> None:
        with self._lock:
            if self.killer is not Killer.NONE:
                return
            self.killer, self.at = killer, time.monotonic()
        self._log.note(why)
        self._run.kill()


class _Live:
    """The runs this process supervises, so that a runner exiting at once leaves none of them running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stoppers: set[_Stopper] | None = set()  # None once all were killed: no run starts any more

    def start(self, run: Supervised, stopper: _Stopper) -> bool:
        """Start `run` unless all were killed; under the lock, so that no start slips past `kill_all`."""
        with self._lock:
            if self._stoppers is None:
                return False
            run.start()
            self._stoppers.add(stopper)
            return True

    def discard(self, stopper: _Stopper) -> None:
        with self._lock:
            if self._stoppers is not None:
                self._stoppers.discard(stopper)

    def kill_all(self, why: str) -> None:
        with self._lock:
            stoppers, self._stoppers = self._stoppers or set(), None
        for stopper in stoppers:
            stopper.stop(Killer.CANCEL, why)


_LIVE = _Live()


def kill_all_runs(why: str) -> None:
    """Kill every run supervised in this process now, and start none after: for a runner that exits at once.
    A run killed already (cancelled, say) is not killed again."""
    _LIVE.kill_all(why)


class Supervisor:
    """One run from its spec to its `RunResult`: its log, its budget account and its supervision.

    Use it as a context manager: the log is closed however the backend leaves the block.
    """

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.created = time.monotonic()
        self.account = Account(spec.budget) if spec.budget is not None else None  # phase 1 only
        self.log = LineLog(spec.log_path, on_line=self.account.on_line if self.account else None)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()

    def supervise(self, run: Supervised, cancel: CancelToken | None, gpu_reader: Reader | None = None) -> Ending:
        """Start `run`, stop it when someone must, and say how it ended."""
        spec, account = self.spec, self.account
        stopper = _Stopper(run, self.log)
        if not _LIVE.start(run, stopper):
            self.log.note("not started: the runner is stopping at once")
            return Ending(Status.CANCELLED, killer=Killer.CANCEL)
        started = time.monotonic()
        if account is not None:
            account.process_started = started
        watchdog = self._watchdog(run, stopper, gpu_reader)
        try:
            self._watch(run, stopper, cancel, started)
        finally:
            _LIVE.discard(stopper)
            if watchdog is not None:
                watchdog.stop()
        exited_at = time.monotonic()
        if account is not None and (cpu_seconds := run.meter()) is not None:  # the run's final figure
            account.on_cpu_total(cpu_seconds, exited_at)
        ended = run.report()
        status, killer = classify(stopper.killer, ended.exit_code, ended.oom_killed)
        status, killer = settle_budget(account, exited_at, spec.out_dir, status, killer, self.log)
        if status is Status.OOM:
            self.log.note(f"killed by the kernel's OOM killer (memory limit {spec.limits.memory_bytes} bytes)")
        return Ending(status, ended.exit_code, killer, ended.peak_memory_bytes,
                      watchdog.peak_bytes if watchdog is not None else None)

    def _watch(self, run: Supervised, stopper: _Stopper, cancel: CancelToken | None, started: float) -> None:
        """Until the run has exited, or has outlived its kill by the grace."""
        spec, account = self.spec, self.account
        while not run.wait(POLL_S):
            now = time.monotonic()
            if stopper.at is not None:
                if now - stopper.at > KILL_GRACE_S:
                    self.log.note(f"the run did not end {KILL_GRACE_S:g} s after it was killed; it is left to reap")
                    log.error("supervision.unkillable", run_id=spec.run_id, killer=stopper.killer.value)
                    return
                continue
            cpu_seconds = run.meter()  # every poll: where no final figure comes, the last is at most a poll old
            if account is not None and cpu_seconds is not None:
                account.on_cpu_total(cpu_seconds, now)
            if cancel is not None and cancel.cancelled:
                stopper.stop(Killer.CANCEL, "cancelled by the runner")
            elif now - started >= spec.deadline_s:
                stopper.stop(Killer.DEADLINE, f"deadline of {spec.deadline_s:g} s reached")
            elif account is not None and (overdue := account.overdue(now)):
                stopper.stop(Killer.BUDGET, f"over budget: {overdue}")
            elif run.oom_seen():
                stopper.stop(Killer.OOM_KILLER, "a process of the run was killed for memory: ending the rest")

    def _watchdog(self, run: Supervised, stopper: _Stopper, reader: Reader | None) -> GpuWatchdog | None:
        """With a GPU: track its peak memory and busy time, kill the run above the cap (if one is set)."""
        spec, account = self.spec, self.account
        if not spec.gpu_uuid:
            return None
        watchdog = GpuWatchdog(
            spec.gpu_uuid, spec.limits.gpu_memory_bytes, pids=run.pids,
            on_exceed=lambda used: stopper.stop(
                Killer.WATCHDOG, f"GPU memory {used} bytes above the cap of {spec.limits.gpu_memory_bytes} bytes"),
            reader=reader, on_busy=account.on_gpu_busy if account is not None else None,
        )
        watchdog.start()
        return watchdog

    def result(self, ending: Ending, isolation: str, runtime: str = "") -> RunResult:
        """The run's `RunResult`; closes its log first, so that the tail is the log's last lines."""
        self.log.close()
        return RunResult(
            status=ending.status, exit_code=ending.exit_code, killed_by=ending.killer,
            wall_seconds=time.monotonic() - self.created, log_path=self.spec.log_path,
            peak_host_memory_bytes=ending.peak_host, peak_gpu_memory_bytes=ending.peak_gpu,
            isolation=isolation, log_tail="\n".join(self.log.tail),
            budget=self.account.report() if self.account is not None else None, runtime=runtime,
        )
