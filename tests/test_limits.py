"""Limits mean what they say: totals of the night across resumes, a heartbeat for `status`, pruned images.

The night runs the loop tests' fake sandbox and scripted agent (fast); the limits are
checked through the real command line where a user meets them.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.core.figures import figures
from runner.core.heartbeat import Heartbeat, this_runner
from runner.core.ledger import BASELINE, EXPERIMENT, Ledger, LedgerUnavailable
from runner.core.settings import Settings
from runner.night.loop import Dataset, Night
from runner.night.pruning import prune_images
from sandbox.processes import process_identity
from tests.doubles import FakeBackend, ScriptedAgent, change, garbage
from tests.recorded_night import cli, flat


def night_in(project, agent, backend, tag="t", **settings):
    """A night of the project under its own runs/ (where `overnight` looks) and its ledger."""
    settings = Settings(root=project, tag=tag, budget=1.0, **settings)
    ledger = Ledger(settings.run_dir / "ledger.sqlite")
    return Night(settings, ledger=ledger, backend=backend, agent=agent, gpus=[],
                 data=Dataset(project.parent / "data", "datahash")), ledger


def run_night(project, *steps, backend=None, **settings):
    night, ledger = night_in(project, ScriptedAgent(*steps), backend or FakeBackend(), **settings)
    try:
        return night.run(), [(r.status, r.decision) for r in ledger.experiments(kinds=[EXPERIMENT])]
    finally:
        ledger.close()


def overnight(project, *args):
    """`autoresearch overnight --tag t` in the project directory, as a user resumes a night."""
    return CliRunner().invoke(main, ["overnight", "--tag", "t", "--gpus", "none", "--agent", "search", *args],
                              catch_exceptions=False)


def set_times(project, night_id, *, started, heartbeat=None, ended=None, runner=None):
    """Move one invocation of the night into the past (as it would read hours later)."""
    with closing(sqlite3.connect(project / "runs" / "t" / "ledger.sqlite")) as db, db:
        db.execute("UPDATE nights SET started_at=?, heartbeat_at=?, ended_at=?, runner=? WHERE id=?",
                   (started.isoformat(), heartbeat.isoformat() if heartbeat else None,
                    ended.isoformat() if ended else None, runner, night_id))


# -- --max-experiments -------------------------------------------------------------------------


def test_max_experiments_counts_the_whole_night_rejected_proposals_included(project):
    assert run_night(project, garbage, max_experiments=1, max_diff_retries=1) == ("max-experiments",
                                                                                  [("rejected", None)])
    # a resume asking for 2 in all makes one more proposal, not two
    reason, rows = run_night(project, change(LR=0.2), change(LR=0.3), max_experiments=2)
    assert (reason, rows) == ("max-experiments", [("rejected", None), ("done", "keep")])
    # a resume that says nothing runs under the night's last limit: spent, so it ends at once
    agent = ScriptedAgent(change(LR=0.3))
    night, ledger = night_in(project, agent, FakeBackend())
    night.run()
    assert len(ledger.experiments(kinds=[EXPERIMENT])) == 2 and agent.contexts == []
    assert ledger.nights()[-1].settings["max_experiments"] == 2  # recorded for the next resume
    ledger.close()


def test_a_resume_with_its_limit_spent_ends_at_once_in_one_sentence(project, monkeypatch):
    run_night(project, change(LR=0.2), max_experiments=1)
    monkeypatch.chdir(project)
    result = overnight(project)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "night t has made its 1 experiments (--max-experiments 1" in lines[0]
    assert "pass a larger --max-experiments to go on" in lines[0]
    ledger = Ledger(project / "runs" / "t" / "ledger.sqlite")
    assert len(ledger.nights()) == 1  # nothing started
    ledger.close()


def test_work_owed_by_a_killed_invocation_is_finished_though_the_limit_is_reached(project):
    run_night(project, change(LR=0.2), max_experiments=1)
    ledger = Ledger(project / "runs" / "t" / "ledger.sqlite")
    (row,) = ledger.experiments(kinds=[EXPERIMENT])
    owed = ledger.add(kind=EXPERIMENT, status="proposed", parent_id=row.id, description="owed by a kill",
                      diff=row.diff)
    (project / "runs" / "t" / owed.id).mkdir()
    (project / "runs" / "t" / owed.id / "train.py").write_text((project / "runs" / "t" / row.id / "train.py")
                                                              .read_text().replace("LR = 0.2", "LR = 0.25"))
    ledger.close()
    reason, rows = run_night(project, change(LR=0.3), max_experiments=2)
    assert reason == "max-experiments" and [status for status, _ in rows] == ["done", "done"]  # no third


# -- --max-agent-usd -----------------------------------------------------------------------------


def test_the_agent_budget_stops_proposals_once_spent_and_a_resume_says_so(project, monkeypatch):
    """Each scripted proposal costs $0.50: with $1.20 allowed, the third crosses it and is the last."""
    steps = [change(LR=round(0.1 + 0.01 * n, 3)) for n in range(1, 7)]
    reason, rows = run_night(project, *steps, max_agent_usd=1.2)
    assert reason == "agent-budget" and len(rows) == 3
    ledger = Ledger(project / "runs" / "t" / "ledger.sqlite")
    assert ledger.nights()[-1].settings["max_agent_usd"] == 1.2 and figures(ledger, project / "runs" / "t").agent_usd == 1.5
    ledger.close()
    monkeypatch.chdir(project)
    result = overnight(project)  # a resume that says nothing: the night's last limit, spent
    lines = result.output.strip().splitlines()
    assert result.exit_code == 0 and len(lines) == 1, result.output
    assert lines[0] == ("night t's agent has cost $1.50 of its $1.2 (--max-agent-usd, every start counted); pass a "
                        "larger --max-agent-usd to go on.")
    reason, rows = run_night(project, *steps, max_agent_usd=2.0)  # a larger one: one more proposal crosses it
    assert reason == "agent-budget" and len(rows) == 4
    status = CliRunner().invoke(cli(), ["status", "--runs-dir", str(project / "runs")])
    assert "agent cost $2.00 of $2 (--max-agent-usd)" in flat(status.output)


def test_a_bad_agent_budget_is_one_sentence(project, monkeypatch):
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, ["overnight", "--tag", "t", "--max-agent-usd", "0"])
    assert result.exit_code == 1 and result.output.strip() == "Error: --max-agent-usd must be a positive amount."


# -- --hours -----------------------------------------------------------------------------------


def test_hours_add_up_the_running_periods_not_the_gaps_between(project, monkeypatch):
    run_night(project, change(LR=0.2), max_experiments=1)
    now = datetime.now(timezone.utc)
    # it started ten hours ago and was killed after 30 min (its last heartbeat): 9.5 hours of gap
    set_times(project, 1, started=now - timedelta(hours=10), heartbeat=now - timedelta(hours=9.5),
              runner=f"{this_runner().split()[0]} 1:0")
    monkeypatch.chdir(project)
    result = overnight(project, "--hours", "0.5", "--max-experiments", "5")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [
        "night t has run its 0.5 hours (--hours 0.5, every start counted); pass a larger --hours to go on."]
    # with an hour, half of it is left: the night goes on (the agent is asked, then the hours count down)
    night, ledger = night_in(project, ScriptedAgent(change(LR=0.3)), FakeBackend(), hours=1.0, max_experiments=2)
    assert night.limits.seconds_left(ledger) == pytest.approx(1800)
    night.run()
    assert [r.status for r in ledger.experiments(kinds=[EXPERIMENT])] == ["done", "done"]
    ledger.close()


# -- status and the heartbeat --------------------------------------------------------------------


def status(project):
    result = CliRunner().invoke(cli(), ["status", "--json", "--runs-dir", str(project / "runs")])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_status_reads_the_heartbeat_not_the_last_event(project):
    run_night(project, change(LR=0.2), max_experiments=1)
    ledger = Ledger(project / "runs" / "t" / "ledger.sqlite")
    open_id = ledger.start_night("t", ledger.nights()[0].settings, runner=this_runner())
    ledger.close()
    host = this_runner().split()[0]
    now = datetime.now(timezone.utc)
    assert status(project)["state"] == "running"  # this process: alive, a fresh heartbeat

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_runner = f"{host} {process_identity(dead.pid)}"
    dead.wait()
    set_times(project, open_id, started=now - timedelta(seconds=5), heartbeat=now, runner=dead_runner)
    fig = status(project)  # killed a moment ago: its heartbeat is fresh, its process gone
    assert fig["state"] == "stopped" and fig["state_note"].startswith("(last seen ")

    seen = now - timedelta(minutes=10)
    set_times(project, open_id, started=now - timedelta(hours=1), heartbeat=seen, runner=this_runner())
    fig = status(project)  # alive but silent for ten minutes (a full disk, a hang): not running
    assert fig["state"] == "stopped" and f"(last seen {seen:%Y-%m-%d %H:%M:%S} UTC, 10 min ago)" in fig["state_note"]
    assert fig["wall_seconds"] == pytest.approx(ledger_seconds(project, 0) + 50 * 60, abs=1)
    panel = flat(CliRunner().invoke(cli(), ["status", "--runs-dir", str(project / "runs")]).output)
    assert f"stopped (last seen {seen:%Y-%m-%d %H:%M:%S} UTC" in panel and "--tag t" in panel


def ledger_seconds(project, index):
    ledger = Ledger(project / "runs" / "t" / "ledger.sqlite")
    night = ledger.nights()[index]
    ledger.close()
    return (datetime.fromisoformat(night.ended_at) - datetime.fromisoformat(night.started_at)).total_seconds()


def test_the_heartbeat_beats_while_the_block_runs(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    night_id = ledger.start_night("t", {})
    first = ledger.nights()[0].heartbeat_at
    with Heartbeat(ledger, night_id, every=0.01):
        for _ in range(1000):  # bounded: a beat every 10 ms
            if ledger.nights()[0].heartbeat_at != first:
                break
            time.sleep(0.01)
    assert ledger.nights()[0].heartbeat_at > first
    ledger.close()


def test_a_beat_the_ledger_cannot_take_is_logged_and_the_next_one_is_tried(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    night_id = ledger.start_night("t", {})
    first = ledger.nights()[0].heartbeat_at
    real, failed = ledger.heartbeat, []

    def full_once(night: int) -> None:
        if not failed:
            failed.append(night)
            raise LedgerUnavailable("no space is left on the disk holding the ledger.")
        real(night)

    monkeypatch.setattr(ledger, "heartbeat", full_once)
    with Heartbeat(ledger, night_id, every=0.01) as beating:
        for _ in range(1000):  # bounded: a beat every 10 ms
            if ledger.nights()[0].heartbeat_at != first:
                break
            time.sleep(0.01)
        assert beating._thread.is_alive()
    assert failed == [night_id] and ledger.nights()[0].heartbeat_at > first
    ledger.close()


# -- pruning images -------------------------------------------------------------------------------


def test_discarded_and_failed_images_go_the_baseline_and_kept_ones_stay(project):
    backend = FakeBackend()
    reason, rows = run_night(project, change(LR=0.2), change(LR=0.05), change(BEHAVIOUR="crash"), backend=backend,
                             max_experiments=3)
    assert rows == [("done", "keep"), ("done", "discard"), ("crash", None)]
    # the resume starts from the kept LR 0.2 and goes back to the baselines' train.py: discarded, their image
    reason, rows = run_night(project, change(LR=0.1), backend=backend, max_experiments=4)
    assert rows[3] == ("done", "discard")
    ledger = Ledger(project / "runs" / "t" / "ledger.sqlite")
    base = ledger.experiments(kinds=[BASELINE])[0].image
    kept, worse, crashed, revert = (r.image for r in ledger.experiments(kinds=[EXPERIMENT]))
    assert revert == base and len({base, kept, worse, crashed}) == 4
    assert set(backend.images) == {base, kept}  # pending review: kept for review, rerun and verify
    assert prune_images(backend, ledger.path) == []  # nothing left to do, nothing done twice
    ledger.close()


def test_an_image_another_night_needs_stays(project, tmp_path):
    backend = FakeBackend()
    other = tmp_path / "other"
    other.mkdir()
    for name in ("prepare.py", "program.md"):
        (other / name).write_text((project / name).read_text())
    (other / "train.py").write_text((project / "train.py").read_text().replace("LR = 0.1", "LR = 0.05"))
    night, ledger = night_in(other, ScriptedAgent(), backend, tag="u", runs_dir=project / "runs", hours=1e-9)
    night.run()  # its baselines run the train.py that night t discards
    needed = ledger.experiments(kinds=[BASELINE])[0].image
    ledger.close()
    reason, rows = run_night(project, change(LR=0.05), backend=backend, max_experiments=1)
    assert rows == [("done", "discard")] and needed in backend.images


def test_a_resume_prunes_what_a_night_run_without_pruning_left(project):
    backend = FakeBackend()
    run_night(project, change(LR=0.05), backend=backend, max_experiments=1, prune_images=False)
    ledger = Ledger(project / "runs" / "t" / "ledger.sqlite")
    (discarded,) = ledger.experiments(kinds=[EXPERIMENT])
    ledger.close()
    assert discarded.decision == "discard" and discarded.image in backend.images
    run_night(project, backend=backend)  # nothing left to run: it only prunes
    assert discarded.image not in backend.images and len(backend.images) == 1  # the baselines'
