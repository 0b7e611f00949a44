"""The supervision loop both backends share, driven with a scripted run: who ends it, and how it is told."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from contract import BUDGET_START_MARK, TRACE_FILE
from sandbox import supervision
from sandbox.budget_guard import Account, Allowance, BudgetRule
from sandbox.gpu_watchdog import GpuSample
from sandbox.runlog import LineLog
from sandbox.spec import CancelToken, Killer, Limits, Phase, RunSpec
from sandbox.status import Status
from sandbox.supervision import Exit, Supervisor, classify, settle_budget


@pytest.mark.parametrize(
    ("killer", "exit_code", "oom", "expected"),
    [
        (Killer.NONE, 0, False, (Status.OK, Killer.NONE)),
        (Killer.NONE, 0, True, (Status.OK, Killer.NONE)),
        (Killer.NONE, 1, False, (Status.CRASH, Killer.NONE)),
        (Killer.NONE, 137, True, (Status.OOM, Killer.OOM_KILLER)),
        (Killer.NONE, 137, False, (Status.CRASH, Killer.NONE)),
        (Killer.DEADLINE, 137, False, (Status.TIMEOUT, Killer.DEADLINE)),
        (Killer.DEADLINE, 137, True, (Status.TIMEOUT, Killer.DEADLINE)),
        (Killer.WATCHDOG, 137, False, (Status.GPU_OOM, Killer.WATCHDOG)),
        (Killer.CANCEL, 137, False, (Status.CANCELLED, Killer.CANCEL)),
        (Killer.BUDGET, 137, False, (Status.OVER_BUDGET, Killer.BUDGET)),
        (Killer.NONE, 137, None, (Status.OOM, Killer.OOM_KILLER)),  # nothing counts OOM kills: nobody else sends SIGKILL
        (Killer.NONE, 1, None, (Status.CRASH, Killer.NONE)),
        (Killer.OOM_KILLER, 137, True, (Status.OOM, Killer.OOM_KILLER)),
    ],
)
def test_classify(killer, exit_code, oom, expected):
    assert classify(killer, exit_code, oom) == expected


class ScriptedRun:
    """A run that exits by itself after `exits_after_s` (None: never), or on a kill unless `unkillable`."""

    def __init__(self, exit_code: int = 0, exits_after_s: float | None = None, oom_killed: bool | None = False,
                 oom_seen_after_s: float | None = None, unkillable: bool = False, cpu_per_s: float = 0.0) -> None:
        self.exit_code, self.exits_after_s, self.oom_killed = exit_code, exits_after_s, oom_killed
        self.oom_seen_after_s, self.unkillable, self.cpu_per_s = oom_seen_after_s, unkillable, cpu_per_s
        self.exited = threading.Event()
        self.kills = 0
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        if self.exits_after_s is not None:
            threading.Timer(self.exits_after_s, self.exited.set).start()

    def wait(self, timeout_s: float) -> bool:
        return self.exited.wait(timeout_s)

    def kill(self) -> None:
        self.kills += 1
        if not self.unkillable:
            self.exit_code = 137
            self.exited.set()

    def pids(self) -> set[int]:
        return {4242}

    def meter(self) -> float | None:
        return self.cpu_per_s * (time.monotonic() - self.started)

    def oom_seen(self) -> bool:
        return self.oom_seen_after_s is not None and time.monotonic() - self.started >= self.oom_seen_after_s

    def report(self) -> Exit:
        return Exit(self.exit_code if self.exited.is_set() else None, self.oom_killed, 2**20)


def _spec(tmp_path: Path, **overrides) -> RunSpec:
    fields = dict(run_id="scripted", image="none", phase=Phase.TRAIN, command=["true"], log_path=tmp_path / "run.log",
                  out_dir=tmp_path / "out", deadline_s=30.0)
    return RunSpec(**{**fields, **overrides})


def _supervise(spec: RunSpec, run: ScriptedRun, cancel: CancelToken | None = None, gpu_reader=None, lines=()):
    with Supervisor(spec) as supervisor:
        for line in lines:
            supervisor.log.feed(f"{line}\n".encode())
        ending = supervisor.supervise(run, cancel, gpu_reader)
        return supervisor.result(ending, "scripted")


def test_a_run_that_exits_zero_is_ok(tmp_path):
    result = _supervise(_spec(tmp_path), ScriptedRun(exits_after_s=0.2))
    assert (result.status, result.exit_code, result.killed_by) == (Status.OK, 0, Killer.NONE)
    assert result.peak_host_memory_bytes == 2**20 and result.isolation == "scripted" and result.budget is None


def test_a_nonzero_exit_is_a_crash(tmp_path):
    result = _supervise(_spec(tmp_path), ScriptedRun(exit_code=3, exits_after_s=0.2))
    assert (result.status, result.exit_code, result.killed_by) == (Status.CRASH, 3, Killer.NONE)


def test_the_deadline_kills_it_as_a_timeout(tmp_path):
    run = ScriptedRun()
    result = _supervise(_spec(tmp_path, deadline_s=0.5), run)
    assert (result.status, result.killed_by, run.kills) == (Status.TIMEOUT, Killer.DEADLINE, 1)
    assert "deadline of 0.5 s reached" in result.log_tail


def test_the_cancel_token_kills_it_as_cancelled(tmp_path):
    cancel = CancelToken()
    threading.Timer(0.3, cancel.cancel).start()
    result = _supervise(_spec(tmp_path), ScriptedRun(), cancel)
    assert (result.status, result.killed_by) == (Status.CANCELLED, Killer.CANCEL)
    assert "cancelled by the runner" in result.log_tail


def test_the_gpu_watchdog_kills_it_above_the_cap(tmp_path):
    def run_holds_a_gib(gpu_uuid: str) -> GpuSample:
        return GpuSample({4242: 2**30, 1: 2**32})  # another process's memory does not count

    spec = _spec(tmp_path, gpu_uuid="GPU-fake", limits=Limits(gpu_memory_bytes=2**29))
    result = _supervise(spec, ScriptedRun(), gpu_reader=run_holds_a_gib)
    assert (result.status, result.killed_by) == (Status.GPU_OOM, Killer.WATCHDOG)
    assert result.peak_gpu_memory_bytes == 2**30 and "above the cap" in result.log_tail


def test_the_kernels_oom_flag_is_an_oom(tmp_path):
    result = _supervise(_spec(tmp_path), ScriptedRun(exit_code=137, exits_after_s=0.2, oom_killed=True))
    assert (result.status, result.killed_by) == (Status.OOM, Killer.OOM_KILLER)
    assert "OOM killer" in result.log_tail


def test_a_sigkill_nobody_on_the_host_sent_is_an_oom_where_nothing_counts_them(tmp_path):
    uncounted = _supervise(_spec(tmp_path), ScriptedRun(exit_code=137, exits_after_s=0.2, oom_killed=None))
    assert (uncounted.status, uncounted.killed_by) == (Status.OOM, Killer.OOM_KILLER)
    counted = _supervise(_spec(tmp_path), ScriptedRun(exit_code=137, exits_after_s=0.2, oom_killed=False))
    assert (counted.status, counted.killed_by) == (Status.CRASH, Killer.NONE)


def test_one_process_killed_for_memory_ends_the_whole_run_as_an_oom(tmp_path):
    run = ScriptedRun(oom_seen_after_s=0.3, oom_killed=True)
    result = _supervise(_spec(tmp_path), run)
    assert (result.status, result.killed_by, run.kills) == (Status.OOM, Killer.OOM_KILLER, 1)


def test_a_budget_that_never_starts_is_over_budget(tmp_path):
    rule = BudgetRule(1.0, Allowance(startup_s=0.1, export_s=0.5, busy_before_s=0, busy_after_s=0, cpu_before_s=100,
                                     cpu_after_s=100), cpu_threads=1)
    result = _supervise(_spec(tmp_path, budget=rule), ScriptedRun())
    assert (result.status, result.killed_by) == (Status.OVER_BUDGET, Killer.BUDGET)
    assert "over budget" in result.log_tail and result.budget["started_after_s"] is None


def test_compute_off_the_budget_makes_a_clean_exit_over_budget(tmp_path):
    """The run announces its budget late and exits within it by itself; its CPU time before the mark is more than
    the allowance at the exit (while it ran, the share of a budget it might still use was on top)."""
    rule = BudgetRule(100.0, Allowance(startup_s=60, export_s=60, busy_before_s=0, busy_after_s=0, cpu_before_s=0.1,
                                     cpu_after_s=100), cpu_threads=1)
    run = ScriptedRun(exits_after_s=1.5, cpu_per_s=1.0)
    with Supervisor(_spec(tmp_path, budget=rule)) as supervisor:
        threading.Timer(1.0, lambda: supervisor.log.feed(f"{BUDGET_START_MARK}\n".encode())).start()
        result = supervisor.result(supervisor.supervise(run, None), "scripted")
    assert (result.status, result.killed_by, run.kills) == (Status.OVER_BUDGET, Killer.BUDGET, 0), result.log_tail
    assert result.budget["cpu_before_s"] > 0.5


def test_the_first_to_ask_is_the_killer(tmp_path):
    cancel = CancelToken()
    cancel.cancel()
    run = ScriptedRun()
    result = _supervise(_spec(tmp_path, deadline_s=0.0), run, cancel)
    assert (result.status, result.killed_by, run.kills) == (Status.CANCELLED, Killer.CANCEL, 1)


def test_a_run_that_outlives_its_kill_is_reported_and_left_to_reap(tmp_path, monkeypatch):
    monkeypatch.setattr(supervision, "KILL_GRACE_S", 0.3)
    run = ScriptedRun(unkillable=True)
    result = _supervise(_spec(tmp_path, deadline_s=0.2), run)
    assert (result.status, result.killed_by, result.exit_code) == (Status.TIMEOUT, Killer.DEADLINE, None)
    assert "did not end" in result.log_tail and run.kills == 1


def test_the_log_holds_the_runs_lines_then_the_reason(tmp_path):
    result = _supervise(_spec(tmp_path, deadline_s=0.5), ScriptedRun(), lines=["step 1", "step 2"])
    assert (tmp_path / "run.log").read_text().splitlines() == ["step 1", "step 2", "[sandbox] deadline of 0.5 s reached"]
    assert result.log_tail.splitlines()[-1] == "[sandbox] deadline of 0.5 s reached"


def test_the_runs_trace_tells_the_step_that_straddled_the_budgets_end(tmp_path):
    """5 steps of 4 CPU seconds in a budget of 16 (8 s on two threads), the last one mostly after it: excused
    when the trace in /out says so, and as the harness writes it; anything else in its place excuses nothing."""
    trace = {"time_budget": 8.0, "warmup_steps": 0, "num_steps": 5, "progress": [0.0, 0.225, 0.475, 0.725, 0.975],
             "step_seconds": [1.8, 2.0, 2.0, 2.0, 2.0]}
    allowance = Allowance(startup_s=15, export_s=15, busy_before_s=3, busy_after_s=3, cpu_before_s=3, cpu_after_s=3)

    def settle(text: str | None) -> tuple[Status, Killer]:
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        (out / TRACE_FILE).unlink(missing_ok=True)
        if text is not None:
            (out / TRACE_FILE).write_text(text)
        account = Account(BudgetRule(8.0, allowance, cpu_threads=2), started=1000.0)
        account.on_cpu_total(0.0, at=1000.0)
        account.budget_started = 1000.0
        account.on_cpu_total(21.1, at=1012.0)  # 3.6 s of the last step and 1.5 s of export after the budget
        line_log = LineLog(tmp_path / "run.log")
        try:
            return settle_budget(account, 1012.5, out, Status.OK, Killer.NONE, line_log)
        finally:
            line_log.close()

    assert settle(json.dumps(trace)) == (Status.OK, Killer.NONE)
    over = (Status.OVER_BUDGET, Killer.BUDGET)
    assert settle(None) == over
    assert settle(json.dumps({**trace, "step_seconds": [1.8, 2.0, 2.0, 2.0, "2.0"]})) == over
    assert settle(json.dumps({**trace, "extra": 1})) == over
    assert settle(json.dumps(trace).replace("1.8", "NaN")) == over
